"""Depth images from organised point clouds: normalisation, holes, resizing, background removal, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from anomalib_hypergraph.data.depth import (
    XYZFormatError,
    read_xyz,
    render_depth_image,
    resize_nearest,
    write_depth_png,
    xyz_to_depth,
)


def grid_cloud(z: np.ndarray, spacing: float = 0.001) -> np.ndarray:
    """Organised cloud with X, Y on a metric grid and the given Z; pixels with z == 0 become holes (0, 0, 0)."""
    height, width = z.shape
    y, x = np.meshgrid(np.arange(height) * spacing + 0.01, np.arange(width) * spacing + 0.01, indexing="ij")
    cloud = np.stack([x, y, z], axis=-1).astype(np.float32)
    cloud[z == 0] = 0.0
    return cloud


@pytest.fixture
def random_cloud() -> np.ndarray:
    rng = np.random.default_rng(0)
    z = rng.uniform(0.5, 0.7, (40, 48))
    z[rng.uniform(size=z.shape) < 0.1] = 0.0
    return grid_cloud(z)


def test_valid_pixels_span_value_range_and_holes_are_zero(random_cloud: np.ndarray) -> None:
    depth = xyz_to_depth(random_cloud, fill_hole_passes=0)
    holes = np.all(random_cloud == 0, axis=-1)
    assert depth.shape == (40, 48, 3)
    assert depth.dtype == np.float32
    assert np.all(depth[holes] == 0.0)
    valid_values = depth[~holes][:, 0]
    assert valid_values.min() == pytest.approx(0.1, abs=1e-6)
    assert valid_values.max() == pytest.approx(0.9, abs=1e-6)
    # Min-max is linear in Z: the order of the points is kept.
    order = np.argsort(random_cloud[~holes][:, 2], kind="stable")
    assert np.all(np.diff(valid_values[order]) >= -1e-6)


def test_three_identical_channels(random_cloud: np.ndarray) -> None:
    depth = xyz_to_depth(random_cloud)
    np.testing.assert_array_equal(depth[..., 0], depth[..., 1])
    np.testing.assert_array_equal(depth[..., 0], depth[..., 2])


def test_one_pass_fills_one_pixel_holes_with_the_mean_of_valid_neighbours() -> None:
    z = (1.0 + np.arange(25, dtype=np.float64).reshape(5, 5)) / 10.0  # z = 0.1 ... 2.5, row-major
    z[0, 0] = 0.0  # a corner hole
    z[1, 1] = 0.0  # a hole next to it
    depth = xyz_to_depth(grid_cloud(z), fill_hole_passes=1)[..., 0]

    def normalised(z_value: float) -> float:  # min 0.2 (z[0, 1]), max 2.5 (z[4, 4]) -> [0.1, 0.9]
        return 0.1 + (z_value - 0.2) / (2.5 - 0.2) * 0.8

    # (1, 1): its valid neighbours are z = 0.2, 0.3, 0.6, 0.8, 1.1, 1.2, 1.3 (not the hole at (0, 0)).
    expected_centre = np.mean([normalised(value) for value in (0.2, 0.3, 0.6, 0.8, 1.1, 1.2, 1.3)])
    # (0, 0): its valid neighbours are z = 0.2 and 0.6 only; (1, 1) is filled in the same pass, so it does not count.
    expected_corner = (normalised(0.2) + normalised(0.6)) / 2
    assert depth[1, 1] == pytest.approx(expected_centre, abs=1e-6)
    assert depth[0, 0] == pytest.approx(expected_corner, abs=1e-6)
    assert depth[0, 0] == pytest.approx(0.1 + (0.4 - 0.2) / 2.3 * 0.8, abs=1e-6)


def test_holes_wider_than_the_passes_keep_their_centre_empty() -> None:
    z = np.full((9, 9), 0.5) + np.linspace(0.0, 0.1, 81).reshape(9, 9)
    z[3:6, 3:6] = 0.0  # a 3 x 3 hole: one pass fills its ring, the second pass its centre
    one_pass = xyz_to_depth(grid_cloud(z), fill_hole_passes=1)[..., 0]
    two_passes = xyz_to_depth(grid_cloud(z), fill_hole_passes=2)[..., 0]
    assert one_pass[4, 4] == 0.0
    ring = np.ones((3, 3), dtype=bool)
    ring[1, 1] = False
    assert np.all(one_pass[3:6, 3:6][ring] > 0.0)
    assert two_passes[4, 4] > 0.0
    # The centre's mean of 8 filled ring values lies within the range of the valid values.
    assert 0.1 <= two_passes[4, 4] <= 0.9


@pytest.mark.parametrize("size", [37, (100, 70), 48])
def test_nearest_resize_keeps_holes_without_interpolated_values(random_cloud: np.ndarray, size) -> None:
    depth = xyz_to_depth(random_cloud, size, fill_hole_passes=0)[..., 0]
    expected_shape = (size, size) if isinstance(size, int) else size
    assert depth.shape == expected_shape
    assert np.any(depth == 0.0)
    # No value between "hole" (0) and the valid range [0.1, 0.9] appears: nothing was blended with a hole.
    assert not np.any((depth > 0.0) & (depth < 0.1 - 1e-6))
    # Every output point is a copy of an input point.
    resized = resize_nearest(random_cloud, expected_shape)
    input_points = {tuple(point) for point in random_cloud.reshape(-1, 3).tolist()}
    assert all(tuple(point) in input_points for point in resized.reshape(-1, 3).tolist())


def test_resize_to_the_same_size_is_the_identity(random_cloud: np.ndarray) -> None:
    np.testing.assert_array_equal(resize_nearest(random_cloud, random_cloud.shape[:2]), random_cloud)


def test_background_removal_invalidates_the_plane_and_keeps_the_bump() -> None:
    size = 64
    y, x = np.meshgrid(np.linspace(-0.05, 0.05, size), np.linspace(-0.05, 0.05, size), indexing="ij")
    plane = 0.4 + 0.05 * x - 0.03 * y  # a tilted support plane
    bump = 0.02 * np.clip(1.0 - (x**2 + y**2) / 0.02**2, 0.0, None)  # 2 cm high, 2 cm radius
    cloud = np.stack([x, y, plane + bump], axis=-1).astype(np.float32)

    depth = xyz_to_depth(cloud, remove_background=True, background_distance=0.005, fill_hole_passes=0)[..., 0]
    kept = depth > 0
    # Distances along the plane's normal are at most the vertical height; above 7 mm the point is off the plane.
    assert np.all(kept[bump > 0.007])
    assert not np.any(kept[bump < 0.004])
    assert depth[kept].min() == pytest.approx(0.1, abs=1e-6)
    assert depth[kept].max() == pytest.approx(0.9, abs=1e-6)
    # Without removal the plane keeps values too.
    assert np.all(xyz_to_depth(cloud, fill_hole_passes=0)[..., 0] > 0)


def test_background_removal_needs_three_corners_with_points() -> None:
    z = np.full((20, 20), 0.3)
    z[:10, :] = 0.0  # the two top corners are holes
    with pytest.raises(XYZFormatError, match=r"scan_9\.tiff.*corner"):
        xyz_to_depth(grid_cloud(z), remove_background=True, source="scan_9.tiff")


def test_render_depth_image_quantises_and_matches_the_file_route(random_cloud: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "000.tiff"
    tifffile.imwrite(path, random_cloud, photometric="rgb")
    image = render_depth_image(path, 32)
    assert image.dtype == np.uint8
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image, np.round(xyz_to_depth(random_cloud, 32) * 255).astype(np.uint8))
    np.testing.assert_array_equal(image, render_depth_image(random_cloud, 32))
    # The PNG cache returns exactly these bytes.
    png = tmp_path / "cache" / "000.png"
    write_depth_png(png, image)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), image)
    assert [entry.name for entry in png.parent.iterdir()] == ["000.png"]  # no temporary file left behind


def test_write_depth_png_rejects_float_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"out\.png.*uint8"):
        write_depth_png(tmp_path / "out.png", np.zeros((4, 4, 3), dtype=np.float32))


def test_read_xyz_round_trip(random_cloud: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "001.tiff"
    tifffile.imwrite(path, random_cloud.astype(np.float64), photometric="rgb")
    cloud = read_xyz(path)
    assert cloud.dtype == np.float32
    np.testing.assert_array_equal(cloud, random_cloud)


def _bad_arrays() -> dict[str, tuple[np.ndarray, str]]:
    good = np.random.default_rng(1).uniform(0.1, 1.0, (6, 7, 3)).astype(np.float32)
    with_nan, with_inf = good.copy(), good.copy()
    with_nan[2, 3, 2] = np.nan
    with_inf[1, 1, 0] = np.inf
    return {
        "hxw": (good[..., 2], r"shape \(6, 7\).*expected.*\(H, W, 3\)"),
        "hxwx4": (np.concatenate([good, good[..., :1]], axis=-1), r"shape \(6, 7, 4\).*expected.*\(H, W, 3\)"),
        "int": ((good * 1000).astype(np.int32), r"dtype int32.*float"),
        "nan": (with_nan, r"1 NaN"),
        "inf": (with_inf, r"1 inf"),
        "zeros": (np.zeros_like(good), r"no valid point"),
    }


@pytest.mark.parametrize("case", ["hxw", "hxwx4", "int", "nan", "inf", "zeros"])
def test_bad_arrays_raise_errors_naming_the_source(case: str) -> None:
    array, message = _bad_arrays()[case]
    with pytest.raises(XYZFormatError, match=rf"bagel_017\.tiff.*{message}"):
        xyz_to_depth(array, source="bagel_017.tiff")
    with pytest.raises(XYZFormatError, match=rf"bagel_017\.tiff.*{message}"):
        render_depth_image(array, source="bagel_017.tiff")


@pytest.mark.parametrize("case", ["hxw", "hxwx4", "int", "nan", "inf", "zeros"])
def test_bad_files_raise_errors_naming_the_file(case: str, tmp_path: Path) -> None:
    array, message = _bad_arrays()[case]
    path = tmp_path / f"bad_{case}.tiff"
    tifffile.imwrite(path, array)
    with pytest.raises(XYZFormatError, match=rf"bad_{case}\.tiff.*{message}"):
        read_xyz(path)
    with pytest.raises(XYZFormatError, match=rf"bad_{case}\.tiff.*{message}"):
        render_depth_image(path)


def test_corrupt_and_missing_files_raise_errors_naming_the_file(tmp_path: Path) -> None:
    broken_header = tmp_path / "broken_header.tiff"
    broken_header.write_bytes(b"II*\x00 this is not really a tiff file" * 3)
    not_a_tiff = tmp_path / "not_a_tiff.tiff"
    not_a_tiff.write_bytes(np.random.default_rng(0).bytes(300))
    truncated = tmp_path / "truncated.tiff"
    tifffile.imwrite(truncated, np.ones((32, 32, 3), dtype=np.float32), photometric="rgb")
    truncated.write_bytes(truncated.read_bytes()[:200])
    for corrupt in (broken_header, not_a_tiff, truncated):
        with pytest.raises(XYZFormatError, match=rf"{corrupt.stem}\.tiff.*TIFF"):
            read_xyz(corrupt)
    with pytest.raises(XYZFormatError, match=r"missing\.tiff.*does not exist"):
        read_xyz(tmp_path / "missing.tiff")


def test_bad_value_range_and_image_size_are_rejected(random_cloud: np.ndarray) -> None:
    with pytest.raises(ValueError, match="value_range"):
        xyz_to_depth(random_cloud, value_range=(0.0, 0.9))
    with pytest.raises(ValueError, match="image_size"):
        xyz_to_depth(random_cloud, (32, 0))
