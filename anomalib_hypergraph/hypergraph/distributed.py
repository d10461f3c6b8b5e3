"""Row gathering across torch.distributed ranks, for memory banks filled by data-parallel training.

Ranks hold different numbers of rows (a DistributedSampler shard, per-image patch counts), while ``all_gather`` needs
equal shapes: the row counts are gathered first, every rank pads to the largest count, and the padding is trimmed.
Plain torch.distributed (works with gloo on CPU and NCCL on GPU); nothing Lightning-specific.
"""

from __future__ import annotations

import torch
from torch import distributed


def _world_size() -> int:
    """Ranks taking part, 1 when torch.distributed is unavailable or not initialised."""
    if not (distributed.is_available() and distributed.is_initialized()):
        return 1
    return distributed.get_world_size()


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows every rank holds, in rank order; every rank receives the same result.

    A no-op (returns ``tensor`` itself) outside an initialised process group or with a single rank. All ranks must
    call it (it is a collective) with tensors of equal trailing shape and dtype; a rank may hold zero rows.

    Args:
        tensor: ``(n_rank, ...)`` rows of this rank.

    Returns:
        ``(sum of n_rank, ...)``.

    Raises:
        ValueError: if the ranks' trailing shapes differ (raised on every rank).

    """
    world_size = _world_size()
    if world_size == 1:
        return tensor
    if tensor.ndim == 0:
        msg = "gather_rows needs a tensor with a row dimension, got a scalar."
        raise ValueError(msg)
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    distributed.all_gather(shapes, shape)
    if any(not torch.equal(other[1:], shape[1:]) for other in shapes):
        msg = f"gather_rows: ranks hold rows of different shapes {[tuple(s.tolist()) for s in shapes]}."
        raise ValueError(msg)
    counts = [int(other[0]) for other in shapes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    received = [torch.empty_like(padded) for _ in range(world_size)]
    distributed.all_gather(received, padded)
    return torch.cat([rows[:count] for rows, count in zip(received, counts, strict=True)])
