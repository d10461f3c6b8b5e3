"""Depth images from MVTec 3D-AD organised point clouds (REFERENCES 1.4, the 3DSR recipe that HyperTrans uses).

An MVTec 3D-AD ``xyz/NNN.tiff`` is an organised point cloud: an H x W x 3 float32 array holding the X, Y, Z
coordinates seen by each camera pixel; pixels the scanner could not measure hold exactly (0, 0, 0). A depth image is
made from it in these steps:

1. nearest-neighbour resize of the XYZ array (an invalid point stays exactly 0; no value is ever interpolated
   between a measured point and a hole),
2. optional background-plane removal (plane through the mean XYZ of the four image corners; points close to it
   become invalid),
3. the Z channel, min-max normalised per image over the valid points to ``value_range`` (default [0.1, 0.9]), so
   that 0 is reserved for invalid pixels,
4. hole filling: a few passes in which every invalid pixel with a valid 3 x 3 neighbour takes their mean,
5. replication to 3 channels, so that ImageNet backbones take the image as they take RGB.

:func:`render_depth_image` quantises the result to uint8: this is the image that is cached as PNG and read back by
every consumer (test, predict), see its docstring for why.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

XYZ_EXTENSIONS = (".tiff", ".tif")

# Hole filling looks at the 8 neighbours of a pixel (a 3 x 3 window without its centre, which is invalid anyway).
_NEIGHBOUR_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


class XYZFormatError(ValueError):
    """An organised point cloud (file or array) is not a valid H x W x 3 float XYZ array."""


def read_xyz(path: str | Path) -> np.ndarray:
    """Read an MVTec 3D-AD organised point cloud TIFF.

    Args:
        path: ``.tiff`` file holding an H x W x 3 float array (X, Y, Z per pixel, invalid points exactly 0).

    Returns:
        The point cloud as an (H, W, 3) float32 array.

    Raises:
        XYZFormatError: The file is missing, unreadable or corrupt, or its content is not a valid point cloud
            (wrong shape, non-float dtype, NaN/inf values, no valid point). The message names the file.

    """
    path = Path(path)
    if not path.is_file():
        msg = f"XYZ point cloud file '{path}' does not exist (expected an MVTec 3D-AD xyz/NNN.tiff file)."
        raise XYZFormatError(msg)
    try:
        array = tifffile.imread(path)
    except Exception as error:  # tifffile raises many error types for corrupt files; all mean "not a readable TIFF"
        msg = f"Cannot read XYZ point cloud '{path}' as a TIFF file ({type(error).__name__}: {error})."
        raise XYZFormatError(msg) from error
    if array.size == 0:  # tifffile returns an empty array for some broken files (e.g. a bad first-page offset)
        msg = f"Cannot read XYZ point cloud '{path}': the TIFF file holds no image data (corrupt or truncated?)."
        raise XYZFormatError(msg)
    return validate_xyz(array, source=str(path))


def validate_xyz(xyz: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Check that ``xyz`` is an organised point cloud and return it as float32.

    Args:
        xyz: Candidate point cloud.
        source: Name of the file the array came from, used in error messages.

    Returns:
        ``xyz`` as a C-contiguous (H, W, 3) float32 array.

    Raises:
        XYZFormatError: Wrong shape, non-float dtype, NaN or inf values, or not a single valid (non-zero) point.

    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.shape[0] == 0 or xyz.shape[1] == 0:
        msg = (
            f"XYZ point cloud '{source}' has shape {tuple(xyz.shape)}; expected an organised point cloud of shape "
            "(H, W, 3) with the X, Y, Z coordinates of each pixel."
        )
        raise XYZFormatError(msg)
    if not np.issubdtype(xyz.dtype, np.floating):
        msg = f"XYZ point cloud '{source}' has dtype {xyz.dtype}; expected a float array (MVTec 3D-AD uses float32)."
        raise XYZFormatError(msg)
    finite = np.isfinite(xyz)
    if not finite.all():
        num_nan = int(np.isnan(xyz).sum())
        num_inf = int((~finite).sum()) - num_nan
        msg = (
            f"XYZ point cloud '{source}' contains {num_nan} NaN and {num_inf} inf values; expected finite "
            "coordinates with invalid points stored as exactly 0."
        )
        raise XYZFormatError(msg)
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    if not valid_point_mask(xyz).any():
        msg = f"XYZ point cloud '{source}' has no valid point: every coordinate is 0."
        raise XYZFormatError(msg)
    return xyz


def valid_point_mask(xyz: np.ndarray) -> np.ndarray:
    """(H, W) bool mask of measured points: a point is invalid when all three of its coordinates are exactly 0."""
    return np.any(xyz != 0, axis=-1)


def _target_size(image_size: int | tuple[int, int] | None, height: int, width: int) -> tuple[int, int]:
    """Output (height, width) for ``image_size`` (``None`` keeps the input size; an int gives a square)."""
    if image_size is None:
        return height, width
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(side, (int, np.integer)) and side > 0 for side in size):
        msg = f"image_size must be a positive int or a (height, width) pair of positive ints, got {image_size!r}."
        raise ValueError(msg)
    return int(size[0]), int(size[1])


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W, ...) array to ``size`` = (height, width).

    Every output pixel copies the input pixel under its centre, so values are copied, never mixed: invalid points
    (exact zeros) stay exact zeros and no value between a hole and a measured point can appear.
    """
    height, width = array.shape[:2]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64), width - 1)
    return array[rows[:, None], cols[None, :]]


def _corner_means(xyz: np.ndarray, valid: np.ndarray, corner_fraction: float) -> list[np.ndarray]:
    """Mean XYZ of the valid points of each of the four corner patches (patches without valid points are skipped)."""
    height, width = valid.shape
    patch_height = max(1, round(corner_fraction * height))
    patch_width = max(1, round(corner_fraction * width))
    rows = (slice(0, patch_height), slice(height - patch_height, height))
    cols = (slice(0, patch_width), slice(width - patch_width, width))
    means = []
    for row_slice in rows:
        for col_slice in cols:
            patch_valid = valid[row_slice, col_slice]
            if patch_valid.any():
                means.append(xyz[row_slice, col_slice][patch_valid].astype(np.float64).mean(axis=0))
    return means


def background_plane_mask(
    xyz: np.ndarray,
    valid: np.ndarray,
    *,
    background_distance: float = 0.005,
    corner_fraction: float = 0.05,
    source: str = "<array>",
) -> np.ndarray:
    """(H, W) bool mask of valid points within ``background_distance`` of the background plane.

    The plane passes through the mean XYZ of the valid points of the four corner patches (side ``corner_fraction``
    of the image height/width): the corners of an MVTec 3D-AD image show the support the object lies on. With four
    corner means the plane is their least-squares fit (smallest singular vector of the centred means); three suffice.

    Raises:
        XYZFormatError: Fewer than three corner patches hold a valid point, or their means lie on a line.

    """
    corners = _corner_means(xyz, valid, corner_fraction)
    if len(corners) < 3:
        msg = (
            f"Cannot remove the background plane of '{source}': only {len(corners)} of the 4 corner patches "
            f"(corner_fraction={corner_fraction}) hold valid points, 3 are needed to define a plane."
        )
        raise XYZFormatError(msg)
    points = np.stack(corners)
    centre = points.mean(axis=0)
    _, singular_values, right_vectors = np.linalg.svd(points - centre)
    if singular_values[1] <= 1e-9 * max(singular_values[0], 1e-30):
        msg = f"Cannot remove the background plane of '{source}': the corner patches lie on a line."
        raise XYZFormatError(msg)
    normal = right_vectors[-1]
    distance = np.abs((xyz.astype(np.float64) - centre) @ normal)
    return valid & (distance < background_distance)


def fill_holes(depth: np.ndarray, valid: np.ndarray, passes: int) -> np.ndarray:
    """Fill invalid pixels from their valid 3 x 3 neighbours, ``passes`` times.

    In each pass, every invalid pixel with at least one valid neighbour takes the mean of its valid neighbours and
    becomes valid for the next pass (so one pass closes holes up to 2 pixels wide, two passes up to 4 pixels wide
    from their border inwards). Pixels that stay invalid keep the value 0.

    Args:
        depth: (H, W) values, 0 at invalid pixels.
        valid: (H, W) bool mask of valid pixels.
        passes: Number of filling passes (0: no filling).

    Returns:
        A filled (H, W) float32 copy of ``depth``.

    """
    if passes < 0:
        msg = f"fill_hole_passes must be >= 0, got {passes}."
        raise ValueError(msg)
    height, width = depth.shape
    values = np.where(valid, depth, 0.0).astype(np.float64)
    valid = valid.copy()
    for _ in range(passes):
        if valid.all():
            break
        padded_values = np.pad(values, 1)
        padded_valid = np.pad(valid, 1).astype(np.float64)
        neighbour_sum = np.zeros_like(values)
        neighbour_count = np.zeros_like(values)
        for dy, dx in _NEIGHBOUR_OFFSETS:
            window = (slice(1 + dy, 1 + dy + height), slice(1 + dx, 1 + dx + width))
            neighbour_sum += padded_values[window]
            neighbour_count += padded_valid[window]
        fillable = ~valid & (neighbour_count > 0)
        values[fillable] = neighbour_sum[fillable] / neighbour_count[fillable]
        valid = valid | fillable
    return values.astype(np.float32)


def xyz_to_depth(
    xyz: np.ndarray,
    image_size: int | tuple[int, int] | None = None,
    *,
    remove_background: bool = False,
    background_distance: float = 0.005,
    value_range: tuple[float, float] = (0.1, 0.9),
    fill_hole_passes: int = 2,
    corner_fraction: float = 0.05,
    source: str = "<array>",
) -> np.ndarray:
    """Depth image of an organised point cloud (REFERENCES 1.4).

    Args:
        xyz: (H, W, 3) float point cloud, invalid points exactly 0.
        image_size: Output size: an int (square), (height, width), or ``None`` for the input size. The resize is
            nearest-neighbour on the XYZ array, so holes stay holes.
        remove_background: Make the background plane (see :func:`background_plane_mask`) invalid before
            normalising, so the depth range is spent on the object.
        background_distance: Points closer than this to the background plane (in the cloud's units; MVTec 3D-AD
            uses metres) are background.
        value_range: Valid depths are min-max mapped per image onto this range; invalid pixels are 0.
        fill_hole_passes: Passes of 3 x 3 mean hole filling over valid neighbours (see :func:`fill_holes`).
        corner_fraction: Side of each corner patch used for the background plane, as a fraction of the image side.
        source: Name of the file ``xyz`` came from, used in error messages.

    Returns:
        (H', W', 3) float32 depth image, the Z value replicated to 3 identical channels.

    Raises:
        XYZFormatError: ``xyz`` is not a valid point cloud, or background removal leaves no valid point or cannot
            fit the plane. The message names ``source``.

    """
    low, high = value_range
    if not 0 < low < high:
        msg = f"value_range must satisfy 0 < low < high (0 marks invalid pixels), got {value_range!r}."
        raise ValueError(msg)
    xyz = validate_xyz(xyz, source=source)
    xyz = resize_nearest(xyz, _target_size(image_size, *xyz.shape[:2]))
    valid = valid_point_mask(xyz)
    if remove_background:
        background = background_plane_mask(
            xyz, valid, background_distance=background_distance, corner_fraction=corner_fraction, source=source
        )
        valid = valid & ~background
        if not valid.any():
            msg = (
                f"Background removal left no valid point in '{source}' (background_distance={background_distance}); "
                "use a smaller background_distance or remove_background=False."
            )
            raise XYZFormatError(msg)
    depth_values = xyz[..., 2].astype(np.float64)
    valid_depths = depth_values[valid]
    lowest, highest = valid_depths.min(), valid_depths.max()
    if highest > lowest:
        normalised = low + (depth_values - lowest) / (highest - lowest) * (high - low)
    else:  # a flat cloud has no depth contrast; put it in the middle of the range
        normalised = np.full_like(depth_values, (low + high) / 2)
    depth = np.where(valid, normalised, 0.0)
    depth = fill_holes(depth, valid, fill_hole_passes)
    return np.repeat(depth[..., None], 3, axis=-1)


def render_depth_image(
    xyz_or_path: np.ndarray | str | Path,
    image_size: int | tuple[int, int] | None = None,
    **kwargs: object,
) -> np.ndarray:
    """uint8 depth image (H, W, 3) of a point cloud array or ``.tiff`` file: ``round(255 * xyz_to_depth(...))``.

    Why quantise: the depth image is cached as a PNG and every consumer (training, test, ``anomalib predict`` on the
    cached folder, prediction straight from ``.tiff`` files) reads these uint8 values. Feeding the float image at
    test time but the PNG at predict time would make the two disagree in the last bits and shift the scores; with
    one quantisation step in one place, the image a model sees is bit-identical whichever route it came by.

    Args:
        xyz_or_path: (H, W, 3) point cloud, or the path of an MVTec 3D-AD ``xyz`` TIFF.
        image_size: Output size (see :func:`xyz_to_depth`).
        **kwargs: Further keyword arguments of :func:`xyz_to_depth` (``remove_background``, ``value_range``, ...).

    Returns:
        (H, W, 3) uint8 image with three identical channels.

    """
    if isinstance(xyz_or_path, (str, Path)):
        kwargs.setdefault("source", str(xyz_or_path))
        xyz_or_path = read_xyz(xyz_or_path)
    depth = xyz_to_depth(xyz_or_path, image_size, **kwargs)
    return np.round(np.clip(depth, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_depth_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) or (H, W) image as PNG, atomically (a cache reader never sees a half-written file).

    Raises:
        ValueError: ``image`` is not uint8 of shape (H, W) or (H, W, 3).

    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        msg = f"Depth PNG '{path}' needs a uint8 (H, W) or (H, W, 3) image, got {image.dtype} {tuple(image.shape)}."
        raise ValueError(msg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(suffix=".png", prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            Image.fromarray(image).save(file, format="PNG")
        Path(temporary_name).replace(path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
