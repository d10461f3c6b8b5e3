"""Exact, chunked top-k search by cosine similarity, batched over independent graphs.

H2VLR joins patches to their most similar patches (structural hyperedges), prompts to their most similar patches
(semantic hyperedges) and query patches to a support gallery (visual anomaly map), always by cosine similarity, and
for a whole batch of images at once. :func:`~.knn.chunked_knn` ranks by Euclidean distance over one set of vectors;
here vectors are normalised to unit length and ranked by their dot product, with a leading batch axis.

Memory: the reference set is walked in blocks of ``chunk_size`` rows while a running top-k is kept, so the largest
temporary is ``B x Q x chunk_size`` similarities, never ``Q x R`` for a large reference set (a support gallery of many
shots). Under ``torch.export`` (ONNX) the loop is unrolled over the fixed reference size, so the graph stays free of
data-dependent shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def _check_batched(name: str, tensor: torch.Tensor) -> None:
    if tensor.ndim != 3:
        msg = f"cosine_topk expects {name} of shape (B, n, C), got {tuple(tensor.shape)}."
        raise ValueError(msg)


def cosine_topk(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int = 4096,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the ``k`` most cosine-similar reference rows of every query row, per batch element.

    Args:
        query: ``(B, Q, C)`` query vectors.
        reference: ``(B, R, C)`` reference vectors, or ``(R, C)`` shared by every batch element.
        k: number of neighbours per query row, ``1 <= k <= R`` (``R - 1`` with ``exclude_self``).
        exclude_self: ``query`` and ``reference`` are the same vectors and row i may not choose itself (used to
            join each patch to its *other* most similar patches). Only the index is excluded.
        chunk_size: reference rows per block.
        normalized: the inputs already have unit length (skips the normalisation).

    Returns:
        ``(similarity, index)``, both ``(B, Q, k)``: cosine similarities in descending order and int64 indices into
        the reference rows.

    Raises:
        ValueError: on malformed shapes, an impossible ``k`` or a non-positive ``chunk_size``.

    """
    _check_batched("query", query)
    if reference.ndim == 2:
        reference = reference.unsqueeze(0).expand(query.shape[0], -1, -1)
    _check_batched("reference", reference)
    if reference.shape[0] != query.shape[0] or reference.shape[2] != query.shape[2]:
        msg = (
            "cosine_topk: query (B, Q, C) and reference (B, R, C) must agree in B and C, got "
            f"{tuple(query.shape)} and {tuple(reference.shape)}."
        )
        raise ValueError(msg)
    if exclude_self and reference.shape[1] != query.shape[1]:
        msg = (
            "cosine_topk: exclude_self=True means query is reference, but they have "
            f"{query.shape[1]} and {reference.shape[1]} rows."
        )
        raise ValueError(msg)
    if chunk_size < 1:
        msg = f"cosine_topk: chunk_size must be >= 1, got {chunk_size}."
        raise ValueError(msg)
    available = reference.shape[1] - int(exclude_self)
    if not 1 <= k <= available:
        msg = (
            f"cosine_topk: k must be between 1 and the number of available references ({available}"
            f"{', self excluded' if exclude_self else ''}), got k={k}."
        )
        raise ValueError(msg)
    if not normalized:
        query = F.normalize(query, dim=-1)
        reference = F.normalize(reference, dim=-1)

    num_reference = reference.shape[1]
    best_similarity = query.new_empty((*query.shape[:2], 0))
    best_index = torch.empty((*query.shape[:2], 0), dtype=torch.long, device=query.device)
    for start in range(0, num_reference, chunk_size):
        stop = min(start + chunk_size, num_reference)
        block = torch.bmm(query, reference[:, start:stop].transpose(1, 2))  # (B, Q, stop - start)
        if exclude_self:
            rows = torch.arange(query.shape[1], device=query.device)[:, None]
            columns = torch.arange(start, stop, device=query.device)[None, :]
            block = block.masked_fill(rows == columns, -torch.inf)
        block_similarity, block_index = torch.topk(block, min(k, stop - start), dim=-1)
        candidates = torch.cat([best_similarity, block_similarity], dim=-1)
        candidate_index = torch.cat([best_index, block_index + start], dim=-1)
        best_similarity, position = torch.topk(candidates, min(k, candidates.shape[-1]), dim=-1)
        best_index = torch.gather(candidate_index, -1, position)
    return best_similarity, best_index


def nearest_cosine_similarity(
    query: torch.Tensor, gallery: torch.Tensor, *, chunk_size: int = 4096, normalized: bool = False
) -> torch.Tensor:
    """Similarity of every query row to its most similar gallery row: ``max_j cos(q, g_j)``.

    Args:
        query: ``(B, Q, C)``.
        gallery: ``(R, C)`` shared by the batch, or ``(B, R, C)`` per batch element.
        chunk_size: gallery rows per block.
        normalized: inputs already have unit length.

    Returns:
        ``(B, Q)`` similarities in [-1, 1].

    """
    similarity, _ = cosine_topk(query, gallery, 1, chunk_size=chunk_size, normalized=normalized)
    return similarity[..., 0]
