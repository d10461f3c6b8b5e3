"""Seeds derived from H2VLR's one ``seed`` and a key, so that no random draw depends on torch's global generator.

Every random draw of H2VLR (random CLIP weights, each learnable module's initialisation, the order of the shots when
a support set is split into several steps, each shot's synthetic anomaly) runs under :func:`seeded` with a key that
names *what* is drawn (``"prompts"``, ``("anomaly", step, shot)``, ...). The draw is then the same whatever ran
before it, on every rank and whatever order the data loader delivered the shots in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

import torch

_SEED_BITS = 63


def derived_seed(seed: int, *key: Hashable) -> int:
    """Derive a 63-bit seed from ``seed`` and ``key`` (stable across processes and runs: SHA-256 of the repr)."""
    digest = hashlib.sha256(repr((int(seed), *key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << _SEED_BITS) - 1)


@contextmanager
def seeded(seed: int, *key: Hashable, device: torch.device | None = None) -> Iterator[None]:
    """Run the block on torch's generators seeded from ``(seed, *key)``; the global state is restored afterwards.

    Args:
        seed: the model's seed.
        key: what is drawn in the block.
        device: a CUDA device whose generator the block also uses (it is forked and seeded too).

    """
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derived_seed(seed, *key))
        yield
