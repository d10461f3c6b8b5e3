"""The simulated sensors behind the sensor-shift benchmark sets: seeded, geometry-preserving where it must be."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomalib_hypergraph.data.sensor_shift import SENSORS, rgb_view, simulate_sensor

SIZE = 64


@pytest.fixture
def scene() -> Image.Image:
    """A bright square on a dark, colour-graded background (a part with an edge the sensors must keep in place)."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[..., 0] = (cols * 3).astype(np.uint8)
    image[..., 2] = (rows * 2).astype(np.uint8)
    image[20:44, 24:40] = 230
    return Image.fromarray(image)


@pytest.mark.parametrize("sensor", sorted(SENSORS))
def test_a_file_always_looks_the_same_and_files_differ_by_noise(scene: Image.Image, sensor: str) -> None:
    first = np.asarray(simulate_sensor(scene, "train/good/000.png", SIZE, sensor))
    again = np.asarray(simulate_sensor(scene, "train/good/000.png", SIZE, sensor))
    other = np.asarray(simulate_sensor(scene, "train/good/001.png", SIZE, sensor))
    assert first.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_the_sensors_see_the_scene_differently(scene: Image.Image) -> None:
    grey = np.asarray(simulate_sensor(scene, "a.png", SIZE, "grey"), dtype=float)[..., 0]
    red = np.asarray(simulate_sensor(scene, "a.png", SIZE, "red"), dtype=float)[..., 0]
    square, background = (slice(26, 38), slice(28, 36)), (slice(0, 10), slice(50, 64))
    # grey inverts its response: the bright square is darker than the background; red keeps it brighter.
    assert grey[square].mean() < grey[background].mean()
    assert red[square].mean() > red[background].mean()


def test_the_target_keeps_the_scene_geometry_and_the_red_rgb_camera_is_displaced(scene: Image.Image) -> None:
    def square_centre(image: np.ndarray) -> np.ndarray:
        bright = image.mean(axis=-1) > 200
        return np.argwhere(bright).mean(axis=0)

    original = square_centre(np.asarray(scene))
    np.testing.assert_allclose(square_centre(np.asarray(rgb_view(scene, SIZE, "grey"))), original, atol=0.5)
    dx, dy = SENSORS["red"].rgb_offset
    displaced = square_centre(np.asarray(rgb_view(scene, SIZE, "red")))
    np.testing.assert_allclose(displaced - original, (dy, dx), atol=1.5)


def test_an_unknown_sensor_is_named_in_the_error(scene: Image.Image) -> None:
    with pytest.raises(ValueError, match=r"sensor must be one of .*'thermal'"):
        simulate_sensor(scene, "a.png", SIZE, "thermal")
