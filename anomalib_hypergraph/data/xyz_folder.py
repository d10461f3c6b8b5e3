"""Prediction straight from XYZ point clouds: :class:`XYZFolder` for ``anomalib predict``.

Every ``.tiff`` point cloud is rendered to a depth image once, into a depth cache
(:mod:`~anomalib_hypergraph.data.depth_cache`) outside the input folder, by default::

    $XDG_CACHE_HOME/anomalib_hypergraph/xyz_folder/<hash of the input folder>/<input folder name>/<relative path>.png

(``~/.cache`` when ``XDG_CACHE_HOME`` is unset; ``cache_dir`` replaces ``.../xyz_folder/<hash>``). Items point at
these PNGs (``image_path``; ``source_path`` in the samples is the tiff): the model reads the very pixels the
MVTec 3D-AD datamodules cache for the same files, and anomalib's visualizer, which reopens ``image_path`` with PIL,
draws the depth image the model saw. The cached path ends in ``<input folder name>/<relative path>`` and the
datamodule's ``name`` is the input folder's name, so anomalib's output file of each item keeps the item's path below
the input folder: files of equal names in different sub-folders never share an output file.
"""

import hashlib
import os
from pathlib import Path

import pandas as pd
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, Split
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Transform

from anomalib_hypergraph.data.depth import XYZ_EXTENSIONS
from anomalib_hypergraph.data.depth_cache import DepthCache
from anomalib_hypergraph.data.image_files import check_images

CACHE_NAMESPACE = Path("anomalib_hypergraph") / "xyz_folder"


def list_xyz_files(path: str | Path) -> list[Path]:
    """List the ``.tiff``/``.tif`` file ``path``, or every one under the folder ``path`` (recursively), sorted.

    Paths are absolute (resolved), whatever ``path`` is relative to.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no tiff file.
        ValueError: ``path`` is a file, but not a tiff.

    """
    path = Path(path).resolve()
    if path.is_file():
        if path.suffix.lower() not in XYZ_EXTENSIONS:
            msg = f"XYZ path '{path}' is a file but not a point cloud ({'/'.join(XYZ_EXTENSIONS)}) nor a folder."
            raise ValueError(msg)
        return [path]
    if not path.is_dir():
        msg = f"XYZ path '{path}' does not exist (expected a .tiff point cloud or a folder of them)."
        raise FileNotFoundError(msg)
    files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix.lower() in XYZ_EXTENSIONS)
    if not files:
        msg = f"No XYZ point cloud ({'/'.join(XYZ_EXTENSIONS)}) found at '{path}'."
        raise FileNotFoundError(msg)
    return files


def input_folder(path: str | Path) -> Path:
    """Return the folder of an XYZ input: ``path`` itself, or the folder holding the tiff ``path`` (resolved)."""
    resolved = Path(path).resolve()
    return resolved.parent if resolved.is_file() else resolved


def default_xyz_cache_dir(folder: Path) -> Path:
    """``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/anomalib_hypergraph/xyz_folder/<hash of the resolved folder>``."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    return user_cache / CACHE_NAMESPACE / digest


class XYZFolderDataset(AnomalibDataset):
    """Unlabelled point clouds, rendered to cached depth PNGs (the ``image_path`` of the items).

    Args:
        path: A ``.tiff`` point cloud or a folder searched recursively.
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render with background-plane removal.
        cache_dir: Base folder of the depth cache (``None``: see the module docstring).
        augmentations: anomalib augmentations (the model's resize is added by the datamodule).

    Raises:
        ValueError: Two tiffs render to the same PNG (``a.tif`` and ``a.tiff``), or the cache would lie inside the
            input folder.
        XYZFormatError: A tiff is not a valid point cloud (the message names it).

    """

    def __init__(
        self,
        path: str | Path,
        *,
        depth_size: int | None = None,
        remove_background: bool = False,
        cache_dir: str | Path | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.depth_size = depth_size
        self.remove_background = remove_background
        files = list_xyz_files(path)
        folder = input_folder(path)
        base = default_xyz_cache_dir(folder) if cache_dir is None else Path(cache_dir)
        cache = DepthCache(
            base / folder.name, depth_size, remove_background, protected=folder, protected_name="input folder"
        )
        sources: dict[str, Path] = {}
        for file in files:
            relative_path = file.relative_to(folder).with_suffix(".png").as_posix()
            if relative_path in sources:
                msg = f"'{sources[relative_path]}' and '{file}' would render to the same depth image '{relative_path}'."
                raise ValueError(msg)
            sources[relative_path] = file
        images = [str(cache.depth_image(file, relative_path)) for relative_path, file in sources.items()]
        cache.flush()
        samples = pd.DataFrame(
            {
                "image_path": images,
                "source_path": [str(file) for file in sources.values()],
                "mask_path": [""] * len(images),
                "label_index": [int(LabelName.UNKNOWN)] * len(images),
                "split": [Split.TEST.value] * len(images),
            }
        )
        samples.attrs["task"] = "classification"
        self.samples = samples
        check_images({"predict": self})


class XYZFolder(AnomalibDataModule):
    """Prediction input straight from XYZ point clouds.

    Usage: ``anomalib predict --data anomalib_hypergraph.data.XYZFolder --data.path <folder of .tiff> ...``.

    Every tiff is rendered with the given ``depth_size`` / ``remove_background`` (use the values the model was
    trained with) into a depth cache outside ``path`` (see the module docstring); the pixels equal those of the
    MVTec 3D-AD datamodules' cached depth PNGs of the same files. Predict and test loaders yield ``ImageBatch``
    (image, image_path = the cached PNG). There are no labels: no training or validation data, so
    ``anomalib predict`` needs ``--ckpt_path`` for few-shot models (without it anomalib validates first). ``name`` is
    the input folder's name, so visualisations keep the sub-folder structure under ``path`` (unique file names).

    Args:
        path: A ``.tiff`` point cloud or a folder searched recursively.
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render with background-plane removal.
        cache_dir: Base folder of the depth cache (``None``: under the user cache folder, see the module docstring).
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
        cache_dir: str | Path | None = None,
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
        self.cache_dir = cache_dir

    @property
    def name(self) -> str:
        """Name of the input folder (the folder itself, or the tiff's folder)."""
        return input_folder(self.path).name

    def _setup(self, _stage: str | None = None) -> None:
        """List the point clouds and render them into the depth cache."""
        self.test_data = XYZFolderDataset(
            self.path, depth_size=self.depth_size, remove_background=self.remove_background, cache_dir=self.cache_dir
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
