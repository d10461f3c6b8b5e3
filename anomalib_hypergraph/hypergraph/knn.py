"""Exact, chunked k-nearest-neighbour search and the soft incidence derived from it.

Hypergraph construction (one hyperedge per vertex: the vertex and its K nearest vertices) and inductive inference
(each query patch against a memory bank) both need exact Euclidean k-NN over tens of thousands of 768-d vectors. A
full ``torch.cdist`` would allocate a Q x R matrix (40 GB for 100k x 100k); here the distances are computed block by
block (at most ``chunk_size^2`` distances: ``chunk_size`` query rows x ``chunk_size`` reference rows, or fewer query
rows x proportionally more reference rows) while a running top-k per query row is kept, so the memory is
O(chunk_size^2 + Q * k) whatever the bank size. The references' squared norms are taken from the caller (a memory bank
caches them) or computed block by block, so no temporary of the bank's size is made either.

Selecting the k smallest of each block row is the costly step on a CPU (``torch.topk`` costs ~15x a row minimum), so
it goes through an exact group-minimum prefilter (:func:`smallest_per_row`).
"""

from __future__ import annotations

import torch

SQUARED_NORM_BLOCK = 4096  # rows per block when squared row norms are computed
PREFILTER_GROUP = 4  # columns per group in the top-k prefilter of smallest_per_row


def squared_row_norms(rows: torch.Tensor, block: int = SQUARED_NORM_BLOCK) -> torch.Tensor:
    """Squared Euclidean norm of every row of ``rows`` ``(R, C)``, ``(R,)``, computed block by block.

    The same values as ``rows.pow(2).sum(dim=1)`` (each row is reduced the same way), without its ``(R, C)``
    temporary: the extra memory is one block of rows.
    """
    return torch.cat([rows[start : start + block].pow(2).sum(dim=1) for start in range(0, rows.shape[0], block)])


def _block_ranking_distances(
    query_block: torch.Tensor, reference_block: torch.Tensor, reference_squared_norm: torch.Tensor
) -> torch.Tensor:
    """Ranking key of one block: ``|r|^2 - 2 q.r``, the squared distance minus the per-row constant ``|q|^2``.

    Ordering the references of a query row by it is ordering them by distance; one matrix product per block and no
    square root. Only used to select candidates; the returned distances come from :func:`_exact_distances`.
    """
    return torch.addmm(reference_squared_norm[None, :], query_block, reference_block.T, alpha=-2.0)  # norms broadcast


def smallest_per_row(values: torch.Tensor, k: int, group: int = PREFILTER_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``k`` smallest entries of every row of ``values`` ``(Q, C)``, ascending, with their columns.

    Same result as ``torch.topk(values, k, largest=False)`` (up to which of several equal entries is returned), about
    twice as fast on a CPU for long rows. The columns are dealt into ``G = C // group`` interleaved groups of ``group``
    columns (column ``c`` in group ``c mod G``); one elementwise minimum over the groups' members, a top-k over the
    ``G`` group minima, then a top-k over the ``k * group`` members of the chosen groups (plus the ``C mod group`` last
    columns that fall in no group). Exact: every one of the k smallest entries lies in a group whose minimum is at most
    that entry, and at most k - 1 groups can have a smaller minimum, so its group is among the k chosen.
    """
    num_columns = values.shape[1]
    num_groups = num_columns // group
    # Short rows: the prefilter would not pay. Export: the plain top-k keeps the exported graph small (same result).
    if num_groups <= k or torch.compiler.is_exporting():
        return torch.topk(values, min(k, num_columns), dim=1, largest=False)
    grouped = num_groups * group
    group_minima = values[:, :grouped].reshape(-1, group, num_groups).amin(dim=1)  # (Q, G)
    _, chosen_groups = torch.topk(group_minima, k, dim=1, largest=False)
    offsets = torch.arange(group, device=values.device) * num_groups
    columns = (chosen_groups[:, :, None] + offsets).reshape(values.shape[0], -1)  # (Q, k * group)
    if grouped < num_columns:
        rest = torch.arange(grouped, num_columns, device=values.device).expand(values.shape[0], -1)
        columns = torch.cat([columns, rest], dim=1)
    smallest, position = torch.topk(values.gather(1, columns), k, dim=1, largest=False)
    return smallest, columns.gather(1, position)


def _exact_distances(query: torch.Tensor, reference: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of the selected pairs, computed directly as ``||q - r||``, column by column.

    The block expansion loses precision through cancellation (a duplicate of a 768-d query can come out at distance
    ~1e-2 instead of 0); the k returned distances are therefore recomputed exactly.
    """
    columns = [torch.linalg.vector_norm(query - reference[indices[:, j]], dim=1) for j in range(indices.shape[1])]
    return torch.stack(columns, dim=1)


def chunked_knn(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    chunk_size: int = 2048,
    exclude_self: bool = False,
    reference_squared_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (brute-force) k nearest neighbours of every query row among the reference rows (Euclidean distance).

    Candidates are ranked block by block with one matrix product per block (exact up to float rounding of
    ``|r|^2 - 2 q.r``); the k distances returned are recomputed exactly from the vectors.

    Args:
        query: query vectors ``(Q, C)``.
        reference: reference vectors ``(R, C)``.
        k: number of neighbours per query.
        chunk_size: query rows per block, and the block budget: a block holds at most ``chunk_size^2`` distances
            (fewer query rows, e.g. one image's patches, walk the bank in proportionally longer reference blocks);
            peak extra memory is about ``chunk_size * (chunk_size + 2k)`` distances, never ``Q x R``.
        exclude_self: ``query`` and ``reference`` are the same set of vectors and the match of row i with itself is
            excluded (used to build one hyperedge per vertex). Only the index is excluded: an exact duplicate at
            another index is still a neighbour at distance 0.
        reference_squared_norm: ``(R,)`` squared row norms of ``reference`` if the caller keeps them (a memory bank
            caches them); None computes them block by block (:func:`squared_row_norms`). Either way no temporary of
            the reference's size is made.

    Returns:
        ``(distances, indices)``, both ``(Q, k)``: distances ascending per row, indices ``int64`` into ``reference``.

    Raises:
        ValueError: on non-2-D inputs, mismatched feature sizes, ``k < 1``, ``k`` larger than the available references,
            ``chunk_size < 1``, or ``exclude_self`` with ``query`` and ``reference`` of different sizes.

    """
    if query.ndim != 2 or reference.ndim != 2:
        msg = (
            "chunked_knn expects query (Q, C) and reference (R, C), got shapes "
            f"{tuple(query.shape)} and {tuple(reference.shape)}."
        )
        raise ValueError(msg)
    if query.shape[1] != reference.shape[1]:
        msg = f"chunked_knn: query has {query.shape[1]} channels but reference has {reference.shape[1]}."
        raise ValueError(msg)
    if exclude_self and query.shape[0] != reference.shape[0]:
        msg = (
            "chunked_knn: exclude_self=True means query is reference, but they have "
            f"{query.shape[0]} and {reference.shape[0]} rows."
        )
        raise ValueError(msg)
    if chunk_size < 1:
        msg = f"chunked_knn: chunk_size must be >= 1, got {chunk_size}."
        raise ValueError(msg)
    available = reference.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        msg = (
            f"chunked_knn: k must be between 1 and the number of available references ({available}"
            f"{', self excluded' if exclude_self else ''}), got k={k}."
        )
        raise ValueError(msg)

    num_query = query.shape[0]
    # Under torch.export (ONNX) the queries form one block, so that the batch size stays a dynamic axis; the bank
    # (fixed size) is still walked in chunks, so memory stays O(Q * chunk_size).
    exporting = torch.compiler.is_exporting()
    if exporting and not exclude_self:
        query_starts = [0]
        query_blocks = [query]
    else:
        query_starts = list(range(0, num_query, chunk_size))
        query_blocks = [query[start : start + chunk_size] for start in query_starts]
    all_distances, all_indices = [], []
    with torch.no_grad():
        if reference_squared_norm is None:
            reference_squared_norm = squared_row_norms(reference)
        elif reference_squared_norm.shape != (reference.shape[0],):
            msg = (
                f"chunked_knn: reference_squared_norm must have shape ({reference.shape[0]},), "
                f"got {tuple(reference_squared_norm.shape)}."
            )
            raise ValueError(msg)
        for query_start, query_block in zip(query_starts, query_blocks, strict=True):
            # Under export the query count is symbolic: reference blocks then keep chunk_size rows.
            reference_chunk = chunk_size if exporting else max(chunk_size, chunk_size**2 // query_block.shape[0])
            distances, indices = _knn_of_block(
                query_block,
                reference,
                reference_squared_norm,
                k,
                reference_chunk=reference_chunk,
                self_offset=query_start if exclude_self else None,
            )
            all_distances.append(distances)
            all_indices.append(indices)
    return torch.cat(all_distances), torch.cat(all_indices)


def _knn_of_block(
    query_block: torch.Tensor,
    reference: torch.Tensor,
    reference_squared_norm: torch.Tensor,
    k: int,
    *,
    reference_chunk: int,
    self_offset: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest references of one query block, walking the references in chunks (see :func:`chunked_knn`).

    ``self_offset`` is the row of ``reference`` that the block's first query is (self-exclusion), or None.
    """
    num_query, num_reference = query_block.shape[0], reference.shape[0]
    best_distances = query_block.new_empty((num_query, 0))
    best_indices = torch.empty((num_query, 0), dtype=torch.long, device=query_block.device)
    for reference_start in range(0, num_reference, reference_chunk):
        reference_stop = min(reference_start + reference_chunk, num_reference)
        block = _block_ranking_distances(
            query_block,
            reference[reference_start:reference_stop],
            reference_squared_norm[reference_start:reference_stop],
        )
        if self_offset is not None:  # query row i is reference row self_offset + i: never its own neighbour
            first, last = max(self_offset, reference_start), min(self_offset + num_query, reference_stop)
            if first < last:
                rows = torch.arange(first, last, device=block.device)
                block[rows - self_offset, rows - reference_start] = torch.inf
        block_distances, block_indices = smallest_per_row(block, k)
        candidates = torch.cat([best_distances, block_distances], dim=1)
        candidate_indices = torch.cat([best_indices, block_indices + reference_start], dim=1)
        best_distances, position = torch.topk(candidates, min(k, candidates.shape[1]), dim=1, largest=False)
        best_indices = torch.gather(candidate_indices, 1, position)
    exact = _exact_distances(query_block, reference, best_indices)
    exact, order = torch.topk(exact, exact.shape[1], dim=1, largest=False)  # ascending; ONNX has no Sort
    return exact, torch.gather(best_indices, 1, order)
