"""A simulated sensor upgrade for RGB data sets: the same parts seen by a cheaper, different target sensor.

Real cross-sensor pairs are rare; this turns any MVTec-layout RGB category into an RGB -> target pair (the same file
before and after the upgrade), so that paired-shot HyperTrans can be checked on real photographs. Two target sensors:

- ``grey`` (the default of every table): grey, gamma-compressed and inverted (a different response curve), 4x lower
  resolution, optical blur and read noise; pixel-aligned with the RGB camera.
- ``red``: a second, independent check of the same claims: a red-weighted mono response with an expanding curve (not
  inverted), 2x lower resolution, milder blur, read noise plus fixed-pattern row noise, and an RGB camera that is not
  registered to it (4 % zoom and a few pixels' offset), as two cameras mounted side by side are.

Noise is seeded by a key (e.g. the file's relative path), so a file always looks the same.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class SensorProfile:
    """How a simulated target sensor differs from the RGB camera.

    Attributes:
        channel_weights: RGB weights of the mono response (normalised to sum 1); ``None``: PIL's ITU-R 601-2 luma.
        gamma: exponent of the response curve on the mono signal in [0, 1].
        inverted: whether the response is inverted (bright parts look dark).
        resolution_divisor: the sensor's resolution is the image size divided by this.
        blur_sigma: optical blur (Gaussian sigma, pixels at the output size).
        noise_std: read noise (std, on [0, 1]).
        row_noise_std: fixed-pattern noise per row (std), the same for every image of the sensor.
        rgb_zoom: scale of the RGB camera's view relative to the target's (1: same field of view).
        rgb_offset: the RGB camera's offset ``(dx, dy)`` in output pixels relative to the target.

    """

    channel_weights: tuple[float, float, float] | None
    gamma: float
    inverted: bool
    resolution_divisor: int
    blur_sigma: float
    noise_std: float
    row_noise_std: float = 0.0
    rgb_zoom: float = 1.0
    rgb_offset: tuple[float, float] = (0.0, 0.0)


SENSORS: dict[str, SensorProfile] = {
    "grey": SensorProfile(None, gamma=0.5, inverted=True, resolution_divisor=4, blur_sigma=1.5, noise_std=0.04),
    "red": SensorProfile(
        (0.7, 0.3, 0.0),
        gamma=1.6,
        inverted=False,
        resolution_divisor=2,
        blur_sigma=1.0,
        noise_std=0.03,
        row_noise_std=0.02,
        rgb_zoom=1.04,
        rgb_offset=(4.0, -3.0),
    ),
}
FIXED_PATTERN_SEED = 7  # the row noise belongs to the sensor, not to an image


def simulate_sensor(image: Image.Image, key: str, size: int, sensor: str = "grey") -> Image.Image:
    """``image`` as the simulated target sensor sees it, ``size`` x ``size`` RGB; noise seeded by ``key`` (crc32).

    Raises:
        ValueError: ``sensor`` is not one of :data:`SENSORS`.

    """
    profile = sensor_profile(sensor)
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    if profile.channel_weights is None:
        mono = np.asarray(resized.convert("L"), dtype=np.float32) / 255
    else:
        weights = np.asarray(profile.channel_weights, dtype=np.float32)
        mono = np.asarray(resized, dtype=np.float32) / 255 @ (weights / weights.sum())
    response = np.clip(mono, 0, 1) ** profile.gamma
    if profile.inverted:
        response = 1.0 - response
    low = Image.fromarray((response * 255).astype(np.uint8)).resize(
        (size // profile.resolution_divisor, size // profile.resolution_divisor), Image.BILINEAR
    )
    blurred = low.resize((size, size), Image.BILINEAR).filter(ImageFilter.GaussianBlur(profile.blur_sigma))
    noise = np.random.default_rng(zlib.crc32(key.encode())).normal(0, profile.noise_std, (size, size))
    rows = np.random.default_rng(FIXED_PATTERN_SEED).normal(0, profile.row_noise_std, (size, 1))
    noisy = np.asarray(blurred, dtype=np.float32) / 255 + noise + rows
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8)).convert("RGB")


def rgb_view(image: Image.Image, size: int, sensor: str = "grey") -> Image.Image:
    """``image`` as the RGB camera beside ``sensor`` sees it: ``size`` x ``size``, zoomed and offset by the profile.

    The target sensor (and so the masks) keeps the image's own geometry; the RGB camera's view is the one displaced,
    with edge pixels repeated where it looks past the image.
    """
    profile = sensor_profile(sensor)
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    if profile.rgb_zoom == 1.0 and profile.rgb_offset == (0.0, 0.0):
        return resized
    # Output pixel (x, y) shows input pixel centre + (x - centre - dx) / zoom (PIL takes this inverse map), read from
    # the image padded by ``size`` on every side so that the view past the border repeats the edge.
    centre, zoom = (size - 1) / 2, profile.rgb_zoom
    dx, dy = profile.rgb_offset
    inverse = (1 / zoom, 0.0, centre - (centre + dx) / zoom + size, 0.0, 1 / zoom, centre - (centre + dy) / zoom + size)
    padded = np.pad(np.asarray(resized), ((size, size), (size, size), (0, 0)), mode="edge")
    return Image.fromarray(padded).transform((size, size), Image.AFFINE, inverse, resample=Image.BILINEAR)


def sensor_profile(sensor: str) -> SensorProfile:
    """Look up the profile named ``sensor``; a clear error naming the choices otherwise."""
    if sensor not in SENSORS:
        msg = f"sensor must be one of {sorted(SENSORS)}, got {sensor!r}."
        raise ValueError(msg)
    return SENSORS[sensor]
