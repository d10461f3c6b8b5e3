"""A simulated sensor upgrade for RGB data sets: the same parts seen by a cheaper, different target sensor.

Real cross-sensor pairs are rare; this turns any MVTec-layout RGB category into a pixel-aligned RGB -> target pair
(the same file before and after the upgrade), so that paired-shot HyperTrans can be checked on real photographs. The
target sensor is grey, gamma-compressed and inverted (a different response curve), has 4x lower resolution, optical
blur and read noise. The noise is seeded by a key (e.g. the file's relative path), so a file always looks the same.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image, ImageFilter

RESOLUTION_DIVISOR = 4
BLUR_SIGMA = 1.5
NOISE_STD = 0.04


def simulate_sensor(image: Image.Image, key: str, size: int) -> Image.Image:
    """``image`` as the simulated target sensor sees it, ``size`` x ``size`` RGB; noise seeded by ``key`` (crc32)."""
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    grey = np.asarray(resized.convert("L"), dtype=np.float32) / 255
    inverted = 1.0 - grey**0.5  # another response curve
    low = Image.fromarray((inverted * 255).astype(np.uint8)).resize(
        (size // RESOLUTION_DIVISOR, size // RESOLUTION_DIVISOR), Image.BILINEAR
    )
    blurred = low.resize((size, size), Image.BILINEAR).filter(ImageFilter.GaussianBlur(BLUR_SIGMA))
    noise = np.random.default_rng(zlib.crc32(key.encode())).normal(0, NOISE_STD, (size, size))
    noisy = np.asarray(blurred, dtype=np.float32) / 255 + noise
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8)).convert("RGB")
