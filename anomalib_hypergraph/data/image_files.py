"""Image files as our datamodules read them: checked once at setup, 16-bit images read at full range.

anomalib reads every image with ``PIL.Image.open(path).convert("RGB")``, which clips 16-bit values at 255: a 16-bit
depth PNG (what depth sensors write) becomes an almost white image. Our datasets (:mod:`.mvtec3d`,
:mod:`.xyz_folder`) and the datasets of the anomalib datamodules that :class:`~anomalib_hypergraph.data.FewShot` and
:class:`~anomalib_hypergraph.data.CrossDomainDataModule` wrap read them at full range instead:

    16-bit scaling: a 16-bit grayscale image (PIL modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, or ``I`` holding
    values in 0..65535) is read as ``value / 65535`` in float32, replicated to 3 channels.

This is what anomalib does with an 8-bit grayscale image (``value / 255``, 3 channels), over the 16-bit range; the
scale is fixed, not per image, so absolute depth stays comparable between images and the full 16-bit precision
reaches the model. 8-bit images are read by anomalib, unchanged. The datasets that hold 16-bit images are logged
(how many, where, and the scaling). anomalib's visualizer reopens ``image_path`` with PIL for the background of its
pictures, so there a 16-bit image is still shown clipped; the scores are computed on the full-range image.

Every image and every mask a datamodule will read is opened and decoded once at setup (:func:`check_images`), so a
truncated, unreadable or unsupported file fails there with its name, instead of in the middle of training with a
bare ``OSError: image file is truncated``.

The same holds for anomalib's ``PredictDataset`` (the folder given to ``anomalib predict --data <folder>`` or
``Engine.predict(data_path=...)``): :func:`check_images` reads its files the same way, and our models call it on
every dataset of their runs (``anomalib_hypergraph.models.run_guard``), so a folder given to ``predict`` is read
exactly as the training images were.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib import TaskType
from anomalib.data import ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.predict import PredictDataset
from anomalib.data.utils import LabelName, read_mask
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import to_image
from torchvision.tv_tensors import Mask

logger = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
INTEGER_MODE = "I"  # 32-bit integers; a 16-bit PNG opens in this mode with some Pillow versions
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
SIXTEEN_BIT_MAX = 65535
SIXTEEN_BIT_SCALING = "value / 65535, replicated to 3 channels"
_READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


class ImageFileError(ValueError):
    """An image or mask file is missing, unreadable, truncated, or of a pixel format that cannot be read faithfully."""


def common_folder(paths: Sequence[str]) -> str:
    """Return the deepest folder holding all ``paths`` (says *where* images were looked for in messages)."""
    if not paths:
        return "<no files>"
    folders = [os.path.dirname(os.path.abspath(path)) for path in paths]
    try:
        return os.path.commonpath(folders)
    except ValueError:  # paths on different drives (Windows): no common folder
        return ", ".join(sorted(set(folders)))


def decode(path: str | Path, what: str = "image") -> tuple[str, tuple | None]:
    """Decode ``path`` once (all of it: a truncated file fails here) and return its PIL mode.

    Returns:
        (mode, extrema): extrema are the (min, max) pixel values for mode ``I``, else ``None``.

    Raises:
        ImageFileError: The file is missing, unreadable or truncated (the message names it and says ``what`` it is).

    """
    try:
        with Image.open(path) as image:
            image.load()
            return image.mode, image.getextrema() if image.mode == INTEGER_MODE else None
    except FileNotFoundError as error:
        msg = f"The {what} file '{path}' does not exist."
        raise ImageFileError(msg) from error
    except _READ_ERRORS as error:
        msg = f"Cannot read {what} '{path}' ({type(error).__name__}: {error}); is the file truncated or corrupt?"
        raise ImageFileError(msg) from error


def inspect_image(path: str | Path) -> bool:
    """Decode the image ``path`` once and say whether it is read at full 16-bit range.

    Returns:
        ``True`` for a 16-bit grayscale image (read by :func:`read_image_full_range`), ``False`` for an 8-bit one
        (read by anomalib).

    Raises:
        ImageFileError: The file is missing, unreadable or truncated, or its pixel format is not supported (32-bit
            float, or 32-bit integers outside 0..65535). The message names the file.

    """
    mode, extrema = decode(path)
    if mode in EIGHT_BIT_MODES:
        return False
    if mode in SIXTEEN_BIT_MODES:
        return True
    if extrema is not None and extrema[0] >= 0 and extrema[1] <= SIXTEEN_BIT_MAX:
        return True
    detail = f" with values {extrema[0]}..{extrema[1]}" if extrema is not None else ""
    msg = (
        f"The image '{path}' has the PIL mode '{mode}'{detail}, which cannot be read faithfully; supported are 8-bit "
        f"images ({', '.join(EIGHT_BIT_MODES)}) and 16-bit grayscale images (values 0..{SIXTEEN_BIT_MAX})."
    )
    raise ImageFileError(msg)


def is_sixteen_bit(path: str | Path) -> bool:
    """Whether ``path`` is a 16-bit grayscale image (reads the file header only)."""
    with Image.open(path) as image:
        return image.mode in SIXTEEN_BIT_MODES or image.mode == INTEGER_MODE


def read_image_full_range(path: str | Path) -> torch.Tensor:
    """(3, H, W) float32 image of a 16-bit grayscale file, scaled ``value / 65535`` (the module's 16-bit scaling).

    Raises:
        ImageFileError: Values outside 0..65535 (a 32-bit integer image).

    """
    with Image.open(path) as image:
        values = np.asarray(image).astype(np.float32)
    if values.min() < 0 or values.max() > SIXTEEN_BIT_MAX:
        msg = f"The image '{path}' holds values {values.min():.0f}..{values.max():.0f}, outside the 16-bit range."
        raise ImageFileError(msg)
    return to_image(np.repeat(values[..., None] / SIXTEEN_BIT_MAX, 3, axis=-1))


def full_range_item(dataset: AnomalibDataset, index: int) -> ImageItem:
    """``dataset[index]`` as anomalib builds it, except that a 16-bit image is read at full range.

    8-bit images go through anomalib's own ``AnomalibDataset.__getitem__``; a 16-bit image is read with
    :func:`read_image_full_range` and gets its mask, augmentations and label as anomalib gives them.
    """
    row = dataset.samples.iloc[index]
    if not is_sixteen_bit(row.image_path):
        return AnomalibDataset.__getitem__(dataset, index)
    image = read_image_full_range(row.image_path)
    empty_mask = Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
    gt_mask = None
    if dataset.task == TaskType.SEGMENTATION and row.label_index != LabelName.UNKNOWN:
        gt_mask = read_mask(row.mask_path, as_tensor=True) if row.label_index == LabelName.ABNORMAL else empty_mask
    if dataset.augmentations and dataset.task == TaskType.SEGMENTATION:
        image, augmented_mask = dataset.augmentations(image, empty_mask if gt_mask is None else gt_mask)
        gt_mask = None if gt_mask is None else augmented_mask
    elif dataset.augmentations:
        image = dataset.augmentations(image)
    return ImageItem(
        image=image,
        gt_mask=gt_mask,
        gt_label=None if row.label_index == LabelName.UNKNOWN else torch.tensor(row.label_index),
        image_path=row.image_path,
        mask_path=row.mask_path,
    )


def full_range_predict_item(dataset: PredictDataset, index: int) -> ImageItem:
    """``dataset[index]`` of anomalib's ``PredictDataset``, except that a 16-bit image is read at full range."""
    path = dataset.image_filenames[index]
    if not is_sixteen_bit(path):
        return PredictDataset.__getitem__(dataset, index)
    image = read_image_full_range(path)
    if dataset.transform:
        image = dataset.transform(image)
    return ImageItem(image=image, image_path=str(path))


class FullRangeImageDataset(AnomalibDataset):
    """Base of our own image datasets: anomalib's dataset, reading 16-bit images at full range."""

    reads_full_range = True

    def __getitem__(self, index: int) -> ImageItem:
        """Return the item of ``index`` (see :func:`full_range_item`)."""
        return full_range_item(self, index)


# anomalib's dataset classes whose items we can read at full range: the anomalib ``__getitem__`` we replace, and ours.
_FULL_RANGE_READERS: dict[type, tuple[Callable, Callable]] = {
    AnomalibDataset: (AnomalibDataset.__getitem__, full_range_item),
    PredictDataset: (PredictDataset.__getitem__, full_range_predict_item),
}
_FULL_RANGE_CLASSES: dict[type, type] = {}
_CHECKED: weakref.WeakSet[Dataset] = weakref.WeakSet()  # datasets whose files check_images has read


def _rebuild_full_range_dataset(plain_class: type, state: dict) -> Dataset:
    """Unpickle a dataset that :func:`enable_full_range` converted (its class is made at run time)."""
    dataset = object.__new__(full_range_class(plain_class))
    dataset.__dict__.update(state)
    return dataset


def _reduce_full_range_dataset(dataset: Dataset) -> tuple:
    return _rebuild_full_range_dataset, (type(dataset).plain_class, dataset.__dict__)


def _full_range_reader(plain_class: type) -> Callable | None:
    """Return the full-range ``__getitem__`` for ``plain_class`` (``None``: the class reads items its own way)."""
    for base, (anomalib_getitem, full_range_getitem) in _FULL_RANGE_READERS.items():
        if issubclass(plain_class, base) and plain_class.__getitem__ is anomalib_getitem:
            return full_range_getitem
    return None


def full_range_class(plain_class: type) -> type:
    """Subclass of the anomalib dataset class ``plain_class`` whose items read 16-bit images at full range.

    ``plain_class`` is an ``AnomalibDataset`` (items from :func:`full_range_item`) or a ``PredictDataset`` (items
    from :func:`full_range_predict_item`) that does not override ``__getitem__``. One class per dataset class, with
    the same name (anomalib derives ``dataset.name`` from it) and nothing but ``__getitem__`` changed, so an existing
    dataset can be switched to it in place. Instances pickle (DataLoader workers started with ``spawn``) and deep-copy
    (``subsample``) as instances of the converted class.
    """
    if plain_class not in _FULL_RANGE_CLASSES:
        getitem = _full_range_reader(plain_class)
        if getitem is None:
            msg = f"{plain_class.__name__} reads its items with its own __getitem__; it cannot be converted."
            raise TypeError(msg)
        _FULL_RANGE_CLASSES[plain_class] = type(
            plain_class.__name__,
            (plain_class,),
            {
                "__getitem__": getitem,
                "__reduce__": _reduce_full_range_dataset,
                "__module__": __name__,
                "reads_full_range": True,
                "plain_class": plain_class,
            },
        )
    return _FULL_RANGE_CLASSES[plain_class]


def reads_full_range(dataset: Dataset) -> bool:
    """Whether ``dataset`` already reads 16-bit images at full range (and had its files checked when it was made)."""
    return getattr(type(dataset), "reads_full_range", False)


def enable_full_range(dataset: Dataset) -> None:
    """Make ``dataset`` (an ``AnomalibDataset`` or ``PredictDataset``) read its 16-bit images at full range, in place.

    Raises:
        ImageFileError: The dataset's class reads its items with its own ``__getitem__`` (not anomalib's image
            reading), so the 16-bit images cannot be read at full range through it.

    """
    if reads_full_range(dataset):
        return
    if _full_range_reader(type(dataset)) is None:
        msg = (
            f"{type(dataset).__name__} holds 16-bit images but reads its items with its own __getitem__; they cannot "
            "be read at full range through it. Convert them to 8-bit, or read them with an anomalib Folder dataset."
        )
        raise ImageFileError(msg)
    dataset.__class__ = full_range_class(type(dataset))


def needs_image_check(dataset: object) -> bool:
    """Whether ``dataset`` is an anomalib image dataset whose files :func:`check_images` has not read yet."""
    return isinstance(dataset, AnomalibDataset | PredictDataset) and not (
        reads_full_range(dataset) or dataset in _CHECKED
    )


def _files_to_read(dataset: AnomalibDataset | PredictDataset) -> tuple[list[str], list[str]]:
    """(image paths, mask paths) that the dataset's ``__getitem__`` reads (masks: anomalous segmentation items)."""
    if isinstance(dataset, PredictDataset):
        return [str(path) for path in dataset.image_filenames], []
    samples = dataset.samples
    images = samples["image_path"].astype(str).tolist()
    masks: list[str] = []
    if dataset.task == TaskType.SEGMENTATION and "mask_path" in samples.columns:
        anomalous = samples["label_index"] == LabelName.ABNORMAL
        masks = samples.loc[anomalous, "mask_path"].astype(str).tolist()
    return images, masks


def check_images(datasets: Mapping[str, AnomalibDataset | PredictDataset | None]) -> None:
    """Decode every image and mask of ``datasets`` once; make the ones holding 16-bit images read them at full range.

    A file that belongs to several datasets (e.g. test and validation) is read once. The 16-bit images found are
    logged per dataset, with the scaling.

    Args:
        datasets: The datasets a datamodule (or a run) will read, by role (``"train"``, ``"test"``, ``"predict"``,
            ...; ``None``: absent): anomalib datasets, or anomalib's ``PredictDataset`` of a folder.

    Raises:
        ImageFileError: A file is unreadable, truncated or unsupported (the message names it), or a dataset that
            reads items its own way holds 16-bit images.

    """
    kinds: dict[str, bool] = {}
    masks_read: set[str] = set()
    for role, dataset in datasets.items():
        if dataset is None or len(dataset) == 0:
            continue
        images, masks = _files_to_read(dataset)
        for path in masks:
            if path not in masks_read:
                decode(path, what="mask")  # anomalib reads masks as 8-bit ("L", > 0): any readable mode will do
                masks_read.add(path)
        for path in images:
            if path not in kinds:
                kinds[path] = inspect_image(path)
        sixteen_bit = [path for path in images if kinds[path]]
        if sixteen_bit:
            enable_full_range(dataset)
            logger.info(
                "%d of %d %s images of %s under '%s' are 16-bit grayscale: read at full range (%s), not clipped at "
                "255 as anomalib's read_image would.",
                len(sixteen_bit),
                len(images),
                role,
                getattr(dataset, "name", type(dataset).__name__),
                common_folder(sixteen_bit),
                SIXTEEN_BIT_SCALING,
            )
        _CHECKED.add(dataset)
