"""Cross-domain few-shot datamodules (REFERENCES 1, 1.4): plenty of source-domain normals, k target-domain shots.

- :class:`CrossDomainDataModule` pairs any two anomalib datamodules (e.g. two ``Folder`` datamodules: images of the old
  camera as source, of the new camera as target).
- :class:`MVTec3DDomain` reads one domain (``rgb`` or ``depth``) of an MVTec 3D-AD category (the real dataset or the
  synthetic one of :mod:`anomalib_hypergraph.data.synthetic`); :class:`MVTec3DCrossDomain` pairs two domains of a
  category (the paper's protocol: RGB source, depth target).
- :class:`XYZFolder` renders a folder of XYZ ``.tiff`` point clouds for ``anomalib predict``.

Training batches of a cross-domain datamodule come as a dict ``{"source": DataLoader, "target": DataLoader}``
(Lightning combines them, cycling the short target loader); validation, test and prediction batches are the target
domain's test images with their masks.

Depth cache. Depth images are rendered from the ``xyz`` tiffs with
:func:`~anomalib_hypergraph.data.depth.render_depth_image` once and stored as PNG files OUTSIDE the dataset folder
(the dataset is never written to), by default in::

    <root>/../.anomalib_hypergraph_cache/<root name>/<category>/<split>/<label>/depth/NNN.png

(``cache_dir`` replaces ``<root>/../.anomalib_hypergraph_cache``). From then on a depth image is read like any image
(anomalib's ``read_image``), so ``anomalib predict --data <cache>/<root name>/<category>/test/<label>/depth`` feeds
a model exactly the pixels it was tested on, and :class:`XYZFolder` (rendering in memory) gives identical pixels.
Each category cache holds ``render_parameters.json``: the render parameters and, per cached file, the size and
modification time of its source file. A cached file is re-rendered when the parameters changed (then every file the
cache lists is deleted first) or when its source file changed. When a ground-truth mask's size differs from its depth
image's (``depth_size`` set), a nearest-neighbour resized copy is cached beside it (``<label>/gt/NNN.png``), so masks
always have the image's resolution.
"""

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from anomalib.data import AnomalibDataModule, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from anomalib.utils.attrs import get_nested_attr
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2.functional import to_dtype, to_image

from anomalib_hypergraph.data.depth import render_depth_image, resize_nearest, write_depth_png
from anomalib_hypergraph.data.few_shot import (
    ShotSelection,
    check_shot_arguments,
    dataset_location,
    few_shot_subset,
    normal_positions,
)

logger = logging.getLogger(__name__)

Domain = Literal["rgb", "depth"]
CACHE_FOLDER_NAME = ".anomalib_hypergraph_cache"
CACHE_INDEX_FILE = "render_parameters.json"
NORMAL_LABEL = "good"
XYZ_EXTENSIONS = (".tiff", ".tif")


def _describe(datamodule: AnomalibDataModule) -> str:
    """'Where' of a datamodule for error messages: class, root and category when it has them."""
    details = [f"{key}='{value}'" for key in ("root", "category") if (value := getattr(datamodule, key, None))]
    return f"{type(datamodule).__name__}({', '.join(details)})"


def _check_domain(domain: str, argument: str) -> None:
    if domain not in get_args(Domain):
        msg = f"{argument} must be one of {get_args(Domain)}, got {domain!r}."
        raise ValueError(msg)


class CrossDomainDataModule(AnomalibDataModule):
    """Pair of anomalib datamodules: all normal training images of ``source``, k normal shots of ``target``.

    Training: ``train_dataloader()`` returns ``{"source": DataLoader, "target": DataLoader}`` over
    :attr:`source_train_data` (every normal training image of ``source``) and :attr:`target_train_data` (the k shots;
    also ``train_data``). Validation and test are ``target``'s, split as ``target`` splits them. ``name`` and
    ``category`` are ``target``'s. The wrapped datamodules' own batch sizes and worker counts are not used: this
    datamodule's apply to every loader. ``source``'s training augmentations apply to the source images, ``target``'s
    to the rest.

    Args:
        source: Datamodule of the source domain (plenty of normal images).
        target: Datamodule of the target domain (shots from its training set; val/test from it).
        k_shot: Number of target shots.
        shot_selection: ``"first"`` (first k in sorted path order, the papers' protocol) or ``"random"`` (seeded).
        seed: Seed of the ``"random"`` selection.
        train_batch_size: Batch size of both training loaders.
        eval_batch_size: Batch size of the validation, test and prediction loaders.
        num_workers: Workers of every loader.

    Attributes:
        shots: Paths of the chosen target images (after ``setup``), sorted.

    """

    def __init__(
        self,
        source: AnomalibDataModule,
        target: AnomalibDataModule,
        *,
        k_shot: int = 1,
        shot_selection: ShotSelection = "first",
        seed: int = 0,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        check_shot_arguments(k_shot, shot_selection)
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=target.train_augmentations,
            val_augmentations=target.val_augmentations,
            test_augmentations=target.test_augmentations,
            seed=seed,
        )
        self.source = source
        self.target = target
        self.source_augmentations = source.train_augmentations
        self.k_shot = k_shot
        self.shot_selection = shot_selection
        self.shots: list[str] = []
        self.source_train_data: AnomalibDataset
        self.target_train_data: AnomalibDataset

    @property
    def name(self) -> str:
        """Name of the target datamodule (anomalib derives result and visualisation paths from it)."""
        return self.target.name

    @property
    def category(self) -> str:
        """Category of the target datamodule."""
        return self.target.category

    @category.setter
    def category(self, category: str) -> None:
        self.target.category = category

    def prepare_data(self) -> None:
        """Let both datamodules prepare (e.g. download) their data."""
        self.source.prepare_data()
        self.target.prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        """Set up both datamodules, keep every source normal and k target shots, take val/test from the target."""
        self._setup_source(_stage)
        self.target.setup(_stage)
        source_normals = normal_positions(self.source.train_data)
        if len(source_normals) == 0:
            msg = (
                f"The source datamodule {_describe(self.source)} has no normal training images "
                f"({dataset_location(self.source.train_data)})."
            )
            raise ValueError(msg)
        if len(normal_positions(self.target.train_data)) == 0:
            msg = (
                f"The target datamodule {_describe(self.target)} has no normal training images to take shots from "
                f"({dataset_location(self.target.train_data)})."
            )
            raise ValueError(msg)
        self.source_train_data = self.source.train_data.subsample(source_normals.tolist())
        self.target_train_data = few_shot_subset(
            self.target.train_data, self.k_shot, strategy=self.shot_selection, seed=self.seed
        )
        self.train_data = self.target_train_data
        self.shots = self.target_train_data.samples["image_path"].astype(str).tolist()
        self.test_data = self.target.test_data
        if hasattr(self.target, "val_data"):
            self.val_data = self.target.val_data

    def _setup_source(self, stage: str | None) -> None:
        """Set up the source datamodule (only its ``train_data`` is used)."""
        self.source.setup(stage)

    def _create_test_split(self) -> None:
        """Nothing to do: the target datamodule has made its test split in its own ``setup``."""

    def _create_val_split(self) -> None:
        """Nothing to do: the target datamodule has made its validation split in its own ``setup``."""

    def _update_augmentations(self) -> None:
        """Give the source images their augmentations (plus the model's resize) as anomalib does for the others."""
        super()._update_augmentations()
        source_data = getattr(self, "source_train_data", None)
        if source_data is None:
            return
        model_transform = get_nested_attr(self, "trainer.model.pre_processor.transform", None)
        if model_transform:
            self._update_subset_augmentations(source_data, self.source_augmentations, model_transform)
        else:
            source_data.augmentations = self.source_augmentations

    def _train_loader(self, dataset: AnomalibDataset) -> DataLoader:
        return DataLoader(
            dataset=dataset,
            shuffle=True,
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or dataset.collate_fn,
        )

    def train_dataloader(self) -> dict[str, DataLoader]:
        """``{"source": all source normals, "target": the k target shots}``, both shuffled."""
        return {
            "source": self._train_loader(self.source_train_data),
            "target": self._train_loader(self.target_train_data),
        }


# ----------------------------------------------------------------------------------------------------------------
# MVTec 3D-AD
# ----------------------------------------------------------------------------------------------------------------


def default_cache_dir(root: str | Path) -> Path:
    """Default depth cache folder of a dataset root: a hidden sibling of ``root``, never inside it."""
    return Path(root).resolve().parent / CACHE_FOLDER_NAME


def category_cache_dir(root: str | Path, category: str, cache_dir: str | Path | None = None) -> Path:
    """Folder of the cached depth images of one category: ``<cache_dir>/<root name>/<category>``.

    The root's name stays in the path so that anomalib (which finds the dataset name in an image path to build the
    visualisation file names) keeps ``<split>/<label>/depth`` in them, making them unique.

    Raises:
        ValueError: The folder would lie inside the dataset folder ``root``.

    """
    root = Path(root).resolve()
    base = default_cache_dir(root) if cache_dir is None else Path(cache_dir).resolve()
    folder = base / root.name / category
    if folder.is_relative_to(root):
        msg = f"cache_dir '{base}' lies inside the dataset folder '{root}'; the dataset is never written to."
        raise ValueError(msg)
    return folder


def _source_signature(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _write_json_atomically(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".json", prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(content, file, indent=1)
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class DepthCache:
    """Depth PNGs (and resized masks) of one category, rendered once and kept in sync with their sources.

    Args:
        folder: Cache folder of the category (see :func:`category_cache_dir`).
        depth_size: Side (or (height, width)) of the rendered depth images; ``None``: the tiff's resolution.
        remove_background: Render with background-plane removal.

    """

    def __init__(self, folder: Path, depth_size: int | None, remove_background: bool) -> None:
        self.folder = folder
        self.parameters = {"depth_size": depth_size, "remove_background": remove_background}
        self.index_path = folder / CACHE_INDEX_FILE
        self._files: dict[str, list[int]] = {}
        self._loaded = False

    def _load(self) -> None:
        """Read the index; when the render parameters changed, delete every file it lists and start empty."""
        if self._loaded:
            return
        self._loaded = True
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        files = index.get("files", {}) if isinstance(index, dict) else {}
        if index.get("parameters") == self.parameters:
            self._files = files
            return
        logger.info("Render parameters of %s changed: re-rendering its depth images.", self.folder)
        for relative_path in files:
            (self.folder / relative_path).unlink(missing_ok=True)

    def _save(self) -> None:
        try:
            _write_json_atomically(self.index_path, {"parameters": self.parameters, "files": self._files})
        except OSError as error:
            raise OSError(self._unwritable_message(error)) from error

    def _unwritable_message(self, error: OSError) -> str:
        return f"Cannot write the depth cache '{self.folder}' ({error}); choose a writable folder with cache_dir."

    def _is_fresh(self, relative_path: str, source: Path) -> bool:
        return (self.folder / relative_path).is_file() and self._files.get(relative_path) == _source_signature(source)

    def depth_image(self, xyz_path: Path, relative_path: str) -> Path:
        """Path of the cached depth PNG of ``xyz_path`` (rendered now if missing or stale).

        Raises:
            XYZFormatError: The tiff is not a valid point cloud (the message names it).

        """
        self._load()
        if not self._is_fresh(relative_path, xyz_path):
            image = render_depth_image(
                xyz_path, self.parameters["depth_size"], remove_background=self.parameters["remove_background"]
            )
            try:
                write_depth_png(self.folder / relative_path, image)
            except OSError as error:
                msg = (
                    f"Cannot write the depth cache '{self.folder}' ({error}); choose a writable folder with cache_dir."
                )
                raise OSError(msg) from error
            self._files[relative_path] = _source_signature(xyz_path)
        return self.folder / relative_path

    def mask_of_size(self, mask_path: Path, size: tuple[int, int], relative_path: str) -> Path:
        """``mask_path`` itself if its (width, height) is ``size``, else a cached nearest-neighbour resized copy."""
        with Image.open(mask_path) as mask:
            if mask.size == size:
                return mask_path
        self._load()
        if not self._is_fresh(relative_path, mask_path):
            with Image.open(mask_path) as mask_file:
                mask = np.asarray(mask_file.convert("L"))
            write_depth_png(self.folder / relative_path, resize_nearest(mask, (size[1], size[0])))
            self._files[relative_path] = _source_signature(mask_path)
        return self.folder / relative_path

    def flush(self) -> None:
        """Write the index (after a batch of :meth:`depth_image` / :meth:`mask_of_size` calls)."""
        if self._loaded:
            self._save()


def list_categories(root: Path) -> list[str]:
    """Sub-folders of an MVTec 3D-AD root that look like categories (they hold a ``train`` or ``test`` folder)."""
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and ((entry / "train").is_dir() or (entry / "test").is_dir())
    )


def check_mvtec3d_category(root: str | Path, category: str) -> Path:
    """Return the category folder ``root/category`` after checking it exists.

    Raises:
        FileNotFoundError: ``root`` is missing, or ``category`` is not in it (the message lists the categories found).

    """
    root = Path(root)
    if not root.is_dir():
        msg = f"MVTec 3D-AD root folder '{root}' does not exist (expected <root>/<category>/train/good/...)."
        raise FileNotFoundError(msg)
    category_folder = root / category
    if not category_folder.is_dir():
        msg = f"Category '{category}' not found in '{root}'; categories found: {list_categories(root)}."
        raise FileNotFoundError(msg)
    return category_folder


def make_mvtec3d_domain_samples(
    category_folder: Path, split: str, domain: Domain, cache: DepthCache | None = None
) -> pd.DataFrame:
    """Build the samples DataFrame of one split of an MVTec 3D-AD category, seen in one domain.

    Every ``<split>/<label>/`` folder is read: ``rgb/*.png`` for the RGB domain, ``xyz/*.tiff`` (rendered through
    ``cache``) for the depth domain. ``label_index`` is 0 for ``good`` and 1 otherwise. ``mask_path`` is
    ``<label>/gt/<stem>.png`` when that file exists (resized through ``cache`` to the depth image's size if needed);
    it is ``""`` for normal training images and for normal images without a mask file (anomalib gives normal images
    an all-zero mask and never reads their mask file).

    Raises:
        FileNotFoundError: The split folder is missing, a label folder has no images of the domain, or an anomalous
            image has no mask (the message names the expected file).
        XYZFormatError: A point cloud is not valid (the message names the file).

    """
    split_folder = category_folder / split
    if not split_folder.is_dir():
        msg = f"MVTec 3D-AD split folder '{split_folder}' does not exist."
        raise FileNotFoundError(msg)
    image_folder_name = "rgb" if domain == "rgb" else "xyz"
    extensions = (".png",) if domain == "rgb" else XYZ_EXTENSIONS
    rows = []
    for label_folder in sorted(entry for entry in split_folder.iterdir() if entry.is_dir()):
        image_folder = label_folder / image_folder_name
        files = sorted(path for path in image_folder.glob("*") if path.suffix.lower() in extensions)
        if not files:
            msg = f"No {domain} images ({'/'.join(extensions)}) found in '{image_folder}'."
            raise FileNotFoundError(msg)
        label = label_folder.name
        label_index = LabelName.NORMAL if label == NORMAL_LABEL else LabelName.ABNORMAL
        for source_path in files:
            image_path = source_path
            if domain == "depth":
                if cache is None:
                    msg = "The depth domain needs a DepthCache to render the xyz point clouds into."
                    raise ValueError(msg)
                image_path = cache.depth_image(source_path, f"{split}/{label}/depth/{source_path.stem}.png")
            mask_path = label_folder / "gt" / f"{source_path.stem}.png"
            if label_index == LabelName.NORMAL and split == Split.TRAIN.value:
                mask = ""  # normal training images have no mask in anomalib (it never reads one for label 0)
            elif mask_path.is_file():
                if cache is not None:
                    with Image.open(image_path) as image:
                        image_size = image.size
                    mask_path = cache.mask_of_size(mask_path, image_size, f"{split}/{label}/gt/{source_path.stem}.png")
                mask = str(mask_path)
            elif label_index == LabelName.NORMAL:
                mask = ""
            else:
                msg = f"Ground-truth mask '{mask_path}' of the anomalous image '{source_path}' does not exist."
                raise FileNotFoundError(msg)
            rows.append(
                {
                    "path": str(category_folder),
                    "split": split,
                    "label": label,
                    "image_path": str(image_path),
                    "mask_path": mask,
                    "label_index": int(label_index),
                    "source_path": str(source_path),
                }
            )
    if cache is not None:
        cache.flush()
    if not rows:
        msg = f"No image folders found in '{split_folder}' (expected <label>/{image_folder_name}/...)."
        raise FileNotFoundError(msg)
    samples = pd.DataFrame(rows)
    # MVTec 3D-AD gives every anomalous image a mask (checked above): the task is segmentation on every split.
    samples.attrs["task"] = "segmentation"
    return samples


class MVTec3DDomainDataset(AnomalibDataset):
    """One split of an MVTec 3D-AD category in one domain (RGB images, or depth images rendered from ``xyz``).

    The samples DataFrame has anomalib's columns (``image_path``, ``mask_path``, ``label_index``, ``split``, ...) plus
    ``source_path`` (the rgb png or xyz tiff the image comes from); depth ``image_path`` values are cached PNGs.

    Args:
        root: Dataset root (``<root>/<category>/<split>/<label>/{rgb,xyz,gt}``).
        category: Category folder name.
        domain: ``"rgb"`` or ``"depth"``.
        split: ``"train"`` or ``"test"`` (or any split folder, e.g. ``"validation"``).
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render depth with background-plane removal.
        cache_dir: Base folder of the depth cache (``None``: next to ``root``; see :func:`category_cache_dir`).
        augmentations: anomalib augmentations.

    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        domain: Domain,
        split: str | Split,
        *,
        depth_size: int | None = None,
        remove_background: bool = False,
        cache_dir: str | Path | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        _check_domain(domain, "domain")
        split = split.value if isinstance(split, Split) else split
        category_folder = check_mvtec3d_category(root, category)
        cache = (
            DepthCache(category_cache_dir(root, category, cache_dir), depth_size, remove_background)
            if domain == "depth"
            else None
        )
        self.root = Path(root)
        self.domain = domain
        self.split = split
        self.category = category
        self.samples = make_mvtec3d_domain_samples(category_folder, split, domain, cache)


class MVTec3DDomain(AnomalibDataModule):
    """One domain of an MVTec 3D-AD category as a plain anomalib datamodule (train = train/good, test = test/*).

    Usable on its own (e.g. ``FewShot(MVTec3DDomain(domain="depth"))`` or a depth-only baseline) and as either side
    of :class:`MVTec3DCrossDomain`. ``name`` is the root folder's name (e.g. ``MVTec3D``), as for anomalib's own
    ``MVTec3D``: anomalib finds it in the image paths to give visualisations unique file names.

    Args:
        root: Dataset root.
        category: Category folder name.
        domain: ``"rgb"`` or ``"depth"``.
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render depth with background-plane removal.
        cache_dir: Base folder of the depth cache (``None``: ``<root>/../.anomalib_hypergraph_cache``).
        train_batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: Loader workers.
        train_augmentations: Augmentations of the training images.
        val_augmentations: Augmentations of the validation images.
        test_augmentations: Augmentations of the test images.
        augmentations: Augmentations of any split without its own.
        val_split_mode: As anomalib (default: the test set, as anomalib's ``MVTec3D``).
        val_split_ratio: As anomalib.
        seed: Seed of anomalib's random splits.

    """

    def __init__(
        self,
        root: str | Path = "./datasets/MVTec3D",
        category: str = "bagel",
        *,
        domain: Domain = "depth",
        depth_size: int | None = None,
        remove_background: bool = False,
        cache_dir: str | Path | None = None,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        _check_domain(domain, "domain")
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=TestSplitMode.FROM_DIR,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.root = Path(root)
        self.category = category
        self.domain = domain
        self.depth_size = depth_size
        self.remove_background = remove_background
        self.cache_dir = cache_dir

    @property
    def name(self) -> str:
        """The dataset root folder's name (it appears in every image path, cached depth images included)."""
        return self.root.resolve().name

    def make_dataset(self, split: Split) -> MVTec3DDomainDataset:
        """Read (and for depth, render) one split of the category in this datamodule's domain."""
        return MVTec3DDomainDataset(
            root=self.root,
            category=self.category,
            domain=self.domain,
            split=split,
            depth_size=self.depth_size,
            remove_background=self.remove_background,
            cache_dir=self.cache_dir,
        )

    def _setup(self, _stage: str | None = None) -> None:
        """Read (and for depth, render) the train and test splits."""
        self.train_data = self.make_dataset(Split.TRAIN)
        self.test_data = self.make_dataset(Split.TEST)


class MVTec3DCrossDomain(CrossDomainDataModule):
    """Cross-domain few-shot on an MVTec 3D-AD category (REFERENCES 1.4): e.g. RGB source, k depth shots.

    Source: every ``train/good`` image in ``source_domain``; target: k ``train/good`` shots in ``target_domain``;
    validation/test: the ``test`` split in ``target_domain`` with its ground-truth masks. Works on the real dataset and
    on :func:`~anomalib_hypergraph.data.synthetic.generate_synthetic_mvtec3d` output. Depth images are cached outside
    the dataset (see the module docstring). The ``validation`` folder (normal images only) is not used.

    Args:
        root: Dataset root (``<root>/<category>/{train,validation,test}/<label>/{rgb,xyz,gt}``).
        category: Category folder name.
        source_domain: ``"rgb"`` or ``"depth"``.
        target_domain: ``"rgb"`` or ``"depth"``.
        k_shot: Number of target shots.
        shot_selection: ``"first"`` (first k sorted, the paper's protocol) or ``"random"`` (seeded).
        seed: Seed of the shot selection and of anomalib's random validation splits.
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render depth with background-plane removal.
        cache_dir: Base folder of the depth cache (``None``: ``<root>/../.anomalib_hypergraph_cache``).
        train_batch_size: Batch size of both training loaders.
        eval_batch_size: Validation/test batch size.
        num_workers: Loader workers.
        val_split_mode: As anomalib (default: the test set, as anomalib's ``MVTec3D``).
        val_split_ratio: As anomalib.

    """

    def __init__(
        self,
        root: str | Path = "./datasets/MVTec3D",
        category: str = "bagel",
        *,
        source_domain: Domain = "rgb",
        target_domain: Domain = "depth",
        k_shot: int = 1,
        shot_selection: ShotSelection = "first",
        seed: int = 0,
        depth_size: int | None = None,
        remove_background: bool = False,
        cache_dir: str | Path | None = None,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
    ) -> None:
        _check_domain(source_domain, "source_domain")
        _check_domain(target_domain, "target_domain")
        shared = {
            "root": root,
            "category": category,
            "depth_size": depth_size,
            "remove_background": remove_background,
            "cache_dir": cache_dir,
            "train_batch_size": train_batch_size,
            "eval_batch_size": eval_batch_size,
            "num_workers": num_workers,
        }
        super().__init__(
            source=MVTec3DDomain(domain=source_domain, val_split_mode=ValSplitMode.NONE, **shared),
            target=MVTec3DDomain(
                domain=target_domain,
                val_split_mode=val_split_mode,
                val_split_ratio=val_split_ratio,
                seed=seed,
                **shared,
            ),
            k_shot=k_shot,
            shot_selection=shot_selection,
            seed=seed,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
        )
        self.root = Path(root)
        self.source_domain = source_domain
        self.target_domain = target_domain

    def _setup_source(self, stage: str | None) -> None:
        """Read only the source domain's training split (its test split is never used, so never rendered)."""
        del stage  # the source split is read the same way whatever the stage
        self.source.train_data = self.source.make_dataset(Split.TRAIN)


# ----------------------------------------------------------------------------------------------------------------
# Prediction on raw point clouds
# ----------------------------------------------------------------------------------------------------------------


def list_xyz_files(path: str | Path) -> list[Path]:
    """List the ``.tiff``/``.tif`` file ``path``, or every one under the folder ``path`` (recursively), sorted.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no tiff file.

    """
    path = Path(path)
    if path.is_file():
        files = [path] if path.suffix.lower() in XYZ_EXTENSIONS else []
    elif path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix.lower() in XYZ_EXTENSIONS)
    else:
        msg = f"XYZ path '{path}' does not exist (expected a .tiff point cloud or a folder of them)."
        raise FileNotFoundError(msg)
    if not files:
        msg = f"No XYZ point cloud ({'/'.join(XYZ_EXTENSIONS)}) found at '{path}'."
        raise FileNotFoundError(msg)
    return files


class XYZFolderDataset(AnomalibDataset):
    """Unlabelled point clouds rendered in memory to depth images (same pixels as the cached PNGs).

    Args:
        path: A ``.tiff`` point cloud or a folder searched recursively.
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render with background-plane removal.
        augmentations: anomalib augmentations (the model's resize is added by the datamodule).

    """

    def __init__(
        self,
        path: str | Path,
        *,
        depth_size: int | None = None,
        remove_background: bool = False,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.depth_size = depth_size
        self.remove_background = remove_background
        files = [str(file) for file in list_xyz_files(path)]
        samples = pd.DataFrame(
            {
                "image_path": files,
                "mask_path": [""] * len(files),
                "label_index": [int(LabelName.UNKNOWN)] * len(files),
                "split": [Split.TEST.value] * len(files),
            }
        )
        samples.attrs["task"] = "classification"
        self.samples = samples

    def __getitem__(self, index: int) -> ImageItem:
        """Render the point cloud and return it as anomalib's ``read_image`` would return its PNG."""
        image_path = str(self.samples.iloc[index].image_path)
        depth = render_depth_image(image_path, self.depth_size, remove_background=self.remove_background)
        image = to_dtype(to_image(depth), torch.float32, scale=True)
        if self.augmentations:
            image = self.augmentations(image)
        return ImageItem(image=image, image_path=image_path)


class XYZFolder(AnomalibDataModule):
    """Prediction input straight from XYZ point clouds.

    Usage: ``anomalib predict --data anomalib_hypergraph.data.XYZFolder --data.path <folder of .tiff> ...``.

    Every tiff is rendered in memory with the given ``depth_size`` / ``remove_background`` (use the values the model
    was trained with); the pixels equal those of the cached depth PNGs of the same files. Predict and test loaders
    yield ``ImageBatch`` (image, image_path). There are no labels: no training or validation data, so
    ``anomalib predict`` needs ``--ckpt_path`` for few-shot models (without it anomalib validates first). ``name`` is
    the folder's name, so visualisations keep the sub-folder structure under ``path`` (unique file names).

    Args:
        path: A ``.tiff`` point cloud or a folder searched recursively.
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render with background-plane removal.
        eval_batch_size: Batch size.
        num_workers: Loader workers.
        augmentations: Augmentations applied to the images.

    """

    def __init__(
        self,
        path: str | Path,
        *,
        depth_size: int | None = None,
        remove_background: bool = False,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=eval_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            test_augmentations=augmentations,
        )
        self.path = Path(path)
        self.depth_size = depth_size
        self.remove_background = remove_background

    @property
    def name(self) -> str:
        """Name of the folder (or of the tiff's folder)."""
        resolved = self.path.resolve()
        return resolved.name if resolved.is_dir() else resolved.parent.name

    def _setup(self, _stage: str | None = None) -> None:
        """List the point clouds."""
        self.test_data = XYZFolderDataset(
            self.path, depth_size=self.depth_size, remove_background=self.remove_background
        )

    def train_dataloader(self) -> DataLoader:
        """XYZFolder only predicts.

        Raises:
            RuntimeError: Always: there is no training data.

        """
        msg = (
            f"XYZFolder('{self.path}') holds unlabelled point clouds for prediction only; it has no training data. "
            "Train with MVTec3DCrossDomain (or another datamodule) and predict with XYZFolder."
        )
        raise RuntimeError(msg)

    def val_dataloader(self) -> DataLoader:
        """XYZFolder has no labelled validation data.

        Raises:
            RuntimeError: Always (for few-shot models, pass ``--ckpt_path`` so that anomalib does not validate).

        """
        msg = (
            f"XYZFolder('{self.path}') has no labelled validation data; predict from a trained checkpoint "
            "(--ckpt_path) so that anomalib does not need to validate first."
        )
        raise RuntimeError(msg)
