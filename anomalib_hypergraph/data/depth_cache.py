"""Depth cache: depth PNGs rendered once from XYZ point clouds and kept in sync with them, outside the dataset.

Depth images are rendered from the ``xyz`` tiffs with :func:`~anomalib_hypergraph.data.depth.render_depth_image`
once and stored as PNG files OUTSIDE the dataset folder (the dataset is never written to). From then on a depth image
is read like any image (anomalib's ``read_image``), so ``anomalib predict --data <cache folder>`` feeds a model exactly
the pixels it was tested on, and anomalib's visualizer (which reopens ``image_path`` with PIL) shows them.

A cache folder holds ``render_parameters.json``: the render parameters and, per cached file, the size and
modification time of its source file. A cached file is re-rendered when the parameters changed (then every file the
index lists is deleted first) or when its source file changed. When a ground-truth mask's size differs from its depth
image's, a nearest-neighbour resized copy is cached as well, so masks always have the image's resolution.

Safety: a cache writes and deletes only inside its own folder. Every path, including each one read from the index,
is resolved (``..`` and symbolic links followed) and checked to lie inside the folder; an index entry that does not
is left alone with a warning. The folder may neither lie inside the dataset (or input) folder nor contain it.
"""

import json
import logging
import os
import tempfile
from pathlib import Path, PurePath

import numpy as np
from PIL import Image

from anomalib_hypergraph.data.depth import render_depth_image, resize_nearest, write_depth_png

logger = logging.getLogger(__name__)

CACHE_FOLDER_NAME = ".anomalib_hypergraph_cache"
CACHE_INDEX_FILE = "render_parameters.json"
CACHED_SUFFIX = ".png"


def default_cache_dir(root: str | Path) -> Path:
    """Default depth cache folder of a dataset root: a hidden sibling of ``root``, never inside it."""
    return Path(root).resolve().parent / CACHE_FOLDER_NAME


def category_cache_dir(root: str | Path, category: str, cache_dir: str | Path | None = None) -> Path:
    """Folder of the cached depth images of one category: ``<cache_dir>/<root name>/<category>``.

    The root's name stays in the path so that anomalib (which finds the dataset name in an image path to build the
    visualisation file names) keeps ``<split>/<label>/depth`` in them, making them unique.
    """
    root = Path(root).resolve()
    base = default_cache_dir(root) if cache_dir is None else Path(cache_dir).resolve()
    return base / root.name / category


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
    """Depth PNGs (and resized masks) of one dataset folder, rendered once and kept in sync with their sources.

    Args:
        folder: Cache folder (e.g. :func:`category_cache_dir`).
        depth_size: Side (or (height, width)) of the rendered depth images; ``None``: the tiff's resolution.
        remove_background: Render with background-plane removal.
        protected: The folder the sources are read from (the dataset root, or a prediction input folder): the cache
            folder may neither lie inside it nor contain it.
        protected_name: What ``protected`` is, for the error message.

    Raises:
        ValueError: The cache folder lies inside ``protected`` or contains it.
        NotADirectoryError: The cache folder exists as a file.

    """

    def __init__(
        self,
        folder: str | Path,
        depth_size: int | tuple[int, int] | None,
        remove_background: bool,
        *,
        protected: str | Path,
        protected_name: str = "dataset folder",
    ) -> None:
        self.folder = Path(folder).resolve()
        protected = Path(protected).resolve()
        if self.folder.is_relative_to(protected):
            msg = (
                f"The depth cache folder '{self.folder}' lies inside the {protected_name} '{protected}'; the "
                f"{protected_name} is never written to: choose another cache_dir."
            )
            raise ValueError(msg)
        if protected.is_relative_to(self.folder):
            msg = (
                f"The depth cache folder '{self.folder}' contains the {protected_name} '{protected}'; a cache may "
                "delete the files it holds: choose another cache_dir."
            )
            raise ValueError(msg)
        if self.folder.exists() and not self.folder.is_dir():
            msg = f"The depth cache folder '{self.folder}' is a file, not a folder: choose another cache_dir."
            raise NotADirectoryError(msg)
        self.parameters = {"depth_size": depth_size, "remove_background": remove_background}
        self.index_path = self.folder / CACHE_INDEX_FILE
        self._files: dict[str, list[int]] = {}
        self._loaded = False

    def path_of(self, relative_path: str) -> Path | None:
        """Return the cached file ``relative_path``, or ``None`` when it would not be a PNG inside the cache folder.

        The path is resolved (``..`` and symbolic links followed) before the check, so neither ``../x.png``, an
        absolute path, nor a link inside the folder that points out of it passes.
        """
        if not isinstance(relative_path, str) or PurePath(relative_path).is_absolute():
            return None
        path = (self.folder / relative_path).resolve()
        if path.suffix != CACHED_SUFFIX or not path.is_relative_to(self.folder):
            return None
        return path

    def _writable_path(self, relative_path: str) -> Path:
        path = self.path_of(relative_path)
        if path is None:
            msg = f"Refusing to write '{relative_path}': it is not a PNG file inside the depth cache '{self.folder}'."
            raise ValueError(msg)
        return path

    def _load(self) -> None:
        """Read the index; when the render parameters changed, delete every file it lists and start empty."""
        if self._loaded:
            return
        self._loaded = True
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return
        files = index.get("files") if isinstance(index, dict) else None
        files = files if isinstance(files, dict) else {}
        unsafe = sorted(str(relative_path) for relative_path in files if self.path_of(relative_path) is None)
        if unsafe:
            logger.warning(
                "The depth cache index '%s' lists %d entries that are not PNG files inside the cache (left alone, "
                "never deleted): %s",
                self.index_path,
                len(unsafe),
                ", ".join(unsafe),
            )
        safe = {path: signature for path, signature in files.items() if str(path) not in unsafe}
        if index.get("parameters") == self.parameters:
            self._files = safe
            return
        logger.info("Render parameters of %s changed: re-rendering its depth images.", self.folder)
        for relative_path in safe:
            path = self.path_of(relative_path)
            if path is not None and path.is_file():
                path.unlink()

    def _save(self) -> None:
        try:
            _write_json_atomically(self.index_path, {"parameters": self.parameters, "files": self._files})
        except OSError as error:
            raise OSError(self._unwritable_message(error)) from error

    def _unwritable_message(self, error: OSError) -> str:
        return f"Cannot write the depth cache '{self.folder}' ({error}); choose a writable folder with cache_dir."

    def _is_fresh(self, relative_path: str, source: Path) -> bool:
        path = self._writable_path(relative_path)
        return path.is_file() and self._files.get(relative_path) == _source_signature(source)

    def _store(self, relative_path: str, image: np.ndarray, source: Path) -> Path:
        path = self._writable_path(relative_path)
        try:
            write_depth_png(path, image)
        except OSError as error:
            raise OSError(self._unwritable_message(error)) from error
        self._files[relative_path] = _source_signature(source)
        return path

    def depth_image(self, xyz_path: Path, relative_path: str) -> Path:
        """Path of the cached depth PNG of ``xyz_path`` (rendered now if missing or stale).

        Raises:
            XYZFormatError: The tiff is not a valid point cloud (the message names it).
            ValueError: ``relative_path`` is not a PNG inside the cache.

        """
        self._load()
        if self._is_fresh(relative_path, xyz_path):
            return self._writable_path(relative_path)
        image = render_depth_image(
            xyz_path, self.parameters["depth_size"], remove_background=self.parameters["remove_background"]
        )
        return self._store(relative_path, image, xyz_path)

    def mask_of_size(self, mask_path: Path, size: tuple[int, int], relative_path: str) -> Path:
        """``mask_path`` itself if its (width, height) is ``size``, else a cached nearest-neighbour resized copy."""
        with Image.open(mask_path) as mask:
            if mask.size == size:
                return mask_path
        self._load()
        if self._is_fresh(relative_path, mask_path):
            return self._writable_path(relative_path)
        with Image.open(mask_path) as mask_file:
            mask = np.asarray(mask_file.convert("L"))
        return self._store(relative_path, resize_nearest(mask, (size[1], size[0])), mask_path)

    def flush(self) -> None:
        """Write the index (after a batch of :meth:`depth_image` / :meth:`mask_of_size` calls)."""
        if self._loaded:
            self._save()
