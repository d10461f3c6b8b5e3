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

Every block temporary (the block of distances, the prefilter's group minima and candidates, the running top-k, the
difference rows of the exact distances) lives in a :class:`BlockBuffers` allocated once per call and overwritten by
every block through ``out=``, so that the peak does not depend on the allocator's history (see :class:`BlockBuffers`).
"""

from __future__ import annotations

import math

import torch

SQUARED_NORM_BLOCK = 4096  # rows per block when squared row norms are computed
PREFILTER_GROUP = 4  # columns per group in the top-k prefilter of smallest_per_row


class BlockBuffers:
    """Scratch tensors of one blockwise computation, allocated once per call and reused by every block via ``out=``.

    Why not a fresh temporary per block: glibc's malloc serves a request above its mmap threshold (128 KiB at start)
    with a mapping of its own, unmapped at ``free``; but freeing such a mapping raises the threshold to its size (the
    dynamic mmap threshold, up to 32 MiB on 64-bit). From then on, block temporaries of that size come from the heap,
    which grows and is not given back, so the peak memory of a loop that allocates fresh blocks depends on the
    allocator's history rather than on the algorithm: the same 784 x 200k search measured +68 MiB in most fresh
    processes and +553 MiB in some. With every block temporary in a buffer taken once per call, a search or a coreset
    allocates the same few buffers in every run, whatever malloc's state, and its peak is their size.

    A buffer is one flat tensor per name; :meth:`take` returns a contiguous view of its first elements in the asked
    shape, so the shorter last block reuses it. A contiguous view starting at the buffer's first element (aligned as a
    fresh tensor is) makes every kernel compute exactly what it computes into a fresh tensor: results are bit-identical.
    A buffer grows only when a larger shape is asked, to twice its size (at most ``most`` elements, the largest request
    the caller can make), so a sequence of growing requests (the coreset's picks per pass) reallocates a logarithmic
    number of times; a search asks its largest shapes first.

    Disabled (``enabled=False``: while ``torch.export`` traces, or for one-off calls), :meth:`take` returns None, and
    ``out=None`` is the plain operation: the exported graph keeps plain ops, which export everywhere.
    """

    def __init__(self, device: torch.device | str | None = None, *, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled
        self._flat: dict[str, torch.Tensor] = {}

    def take(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *, most: int | None = None
    ) -> torch.Tensor | None:
        """Return the buffer ``name`` as a contiguous ``shape`` tensor (contents undefined), or None if disabled.

        ``most``: the largest number of elements ``name`` will be asked for in this computation (caps the growth).
        """
        if not self.enabled:
            return None
        numel = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.dtype != dtype or flat.numel() < numel:
            size = numel if flat is None or flat.dtype != dtype else max(numel, 2 * flat.numel())
            size = size if most is None else max(numel, min(size, most))
            self._flat.pop(name, None)
            del flat  # no reference left: the old buffer is freed before its replacement is allocated
            flat = self._flat[name] = torch.empty(size, dtype=dtype, device=self.device)
        return flat[:numel].view(shape)

    def take_topk(
        self, name: str, shape: tuple[int, int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``out=`` pair (values, int64 indices) for ``torch.topk`` into ``shape``, or None if disabled."""
        if not self.enabled:
            return None
        return self.take(f"{name}.values", shape, dtype), self.take(f"{name}.indices", shape, torch.long)


def squared_row_norms(rows: torch.Tensor, block: int = SQUARED_NORM_BLOCK) -> torch.Tensor:
    """Squared Euclidean norm of every row of ``rows`` ``(R, C)``, ``(R,)``, computed block by block.

    The same values as ``rows.pow(2).sum(dim=1)`` (each row is reduced the same way), without its ``(R, C)``
    temporary: the extra memory is one block of squares, a buffer reused by every block (:class:`BlockBuffers`).
    """
    if torch.compiler.is_exporting():  # plain ops in an exported graph
        return torch.cat([rows[start : start + block].pow(2).sum(dim=1) for start in range(0, rows.shape[0], block)])
    buffers = BlockBuffers(rows.device)
    norms = rows.new_empty(rows.shape[0])
    for start in range(0, rows.shape[0], block):
        stop = min(start + block, rows.shape[0])
        squares = torch.pow(rows[start:stop], 2, out=buffers.take("squares", (stop - start, rows.shape[1]), rows.dtype))
        torch.sum(squares, dim=1, out=norms[start:stop])
    return norms


def _block_ranking_distances(
    query_block: torch.Tensor,
    reference_block: torch.Tensor,
    reference_squared_norm: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ranking key of one block: ``|r|^2 - 2 q.r``, the squared distance minus the per-row constant ``|q|^2``.

    Ordering the references of a query row by it is ordering them by distance; one matrix product per block and no
    square root. Only used to select candidates; the returned distances come from :func:`_exact_distances`. ``out``: the
    block buffer it is written into (None allocates it).
    """
    return torch.addmm(reference_squared_norm[None, :], query_block, reference_block.T, alpha=-2.0, out=out)


def smallest_per_row(
    values: torch.Tensor, k: int, group: int = PREFILTER_GROUP, *, buffers: BlockBuffers | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``k`` smallest entries of every row of ``values`` ``(Q, C)``, ascending, with their columns.

    Same result as ``torch.topk(values, k, largest=False)`` (up to which of several equal entries is returned), about
    twice as fast on a CPU for long rows. The columns are dealt into ``G = C // group`` interleaved groups of ``group``
    columns (column ``c`` in group ``c mod G``); one elementwise minimum over the groups' members, a top-k over the
    ``G`` group minima, then a top-k over the ``k * group`` members of the chosen groups (plus the ``C mod group`` last
    columns that fall in no group). Exact: every one of the k smallest entries lies in a group whose minimum is at most
    that entry, and at most k - 1 groups can have a smaller minimum, so its group is among the k chosen.

    ``buffers``: where the temporaries and the result are written (:class:`BlockBuffers`, reused block after block; the
    result is overwritten by the next call with the same buffers); None allocates them.
    """
    buffers = buffers if buffers is not None else BlockBuffers(enabled=False)
    num_rows, num_columns = values.shape
    num_groups = num_columns // group
    # Short rows: the prefilter would not pay. Export: the plain top-k keeps the exported graph small (same result).
    if num_groups <= k or torch.compiler.is_exporting():
        kept = min(k, num_columns)
        out = buffers.take_topk("smallest", (num_rows, kept), values.dtype)
        return torch.topk(values, kept, dim=1, largest=False, out=out)
    grouped = num_groups * group
    group_minima = torch.amin(  # (Q, G); the reshape is a view (a split of the column axis)
        values[:, :grouped].reshape(-1, group, num_groups),
        dim=1,
        out=buffers.take("group_minima", (num_rows, num_groups), values.dtype),
    )
    _, chosen_groups = torch.topk(
        group_minima, k, dim=1, largest=False, out=buffers.take_topk("chosen_groups", (num_rows, k), values.dtype)
    )
    offsets = torch.arange(group, device=values.device) * num_groups
    columns = torch.add(  # (Q, k, group) -> (Q, k * group)
        chosen_groups[:, :, None], offsets, out=buffers.take("chosen_columns", (num_rows, k, group), torch.long)
    ).reshape(num_rows, -1)
    if grouped < num_columns:
        rest = torch.arange(grouped, num_columns, device=values.device).expand(num_rows, -1)
        width = columns.shape[1] + rest.shape[1]
        columns = torch.cat([columns, rest], dim=1, out=buffers.take("columns", (num_rows, width), torch.long))
    candidates = torch.gather(values, 1, columns, out=buffers.take("candidates", tuple(columns.shape), values.dtype))
    smallest, position = torch.topk(
        candidates, k, dim=1, largest=False, out=buffers.take_topk("smallest", (num_rows, k), values.dtype)
    )
    return smallest, torch.gather(columns, 1, position, out=buffers.take("smallest_columns", (num_rows, k), torch.long))


def _exact_distances(
    query: torch.Tensor, reference: torch.Tensor, indices: torch.Tensor, buffers: BlockBuffers | None = None
) -> torch.Tensor:
    """Euclidean distances of the selected pairs, computed directly as ``||q - r||``, column by column.

    The block expansion loses precision through cancellation (a duplicate of a 768-d query can come out at distance
    ~1e-2 instead of 0); the k returned distances are therefore recomputed exactly. The ``(Q, C)`` neighbour rows and
    their differences go through one buffer of ``buffers`` (None allocates them per column).
    """
    buffers = buffers if buffers is not None else BlockBuffers(enabled=False)
    columns = []
    for j in range(indices.shape[1]):
        rows = buffers.take("neighbour_rows", tuple(query.shape), query.dtype)
        neighbours = torch.index_select(reference, 0, indices[:, j], out=rows)
        difference = torch.sub(query, neighbours, out=rows)  # in place in the buffer (buffers disabled: a new tensor)
        columns.append(torch.linalg.vector_norm(difference, dim=1))
    return torch.stack(columns, dim=1, out=buffers.take("exact_distances", tuple(indices.shape), query.dtype))


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
    ``|r|^2 - 2 q.r``); the k distances returned are recomputed exactly from the vectors. The block temporaries are
    buffers allocated once per call and reused by every block (:class:`BlockBuffers`: a fresh temporary per block lets
    glibc's heap grow with the allocator's history); the plain operations remain while ``torch.export`` traces.

    Args:
        query: query vectors ``(Q, C)``.
        reference: reference vectors ``(R, C)``.
        k: number of neighbours per query.
        chunk_size: query rows per block, and the block budget: a block holds at most ``chunk_size^2`` distances
            (fewer query rows, e.g. one image's patches, walk the bank in proportionally longer reference blocks);
            peak extra memory besides the result is about ``1.25 * chunk_size^2`` distances (the block and its
            group minima), one ``chunk_size x C`` block of rows and ``O(chunk_size * k)`` candidates, never ``Q x R``.
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
    buffers = BlockBuffers(query.device, enabled=not exporting)
    with torch.no_grad():
        if reference_squared_norm is None:
            reference_squared_norm = squared_row_norms(reference)
        elif reference_squared_norm.shape != (reference.shape[0],):
            msg = (
                f"chunked_knn: reference_squared_norm must have shape ({reference.shape[0]},), "
                f"got {tuple(reference_squared_norm.shape)}."
            )
            raise ValueError(msg)
        # Each query block's result is written into its rows of the output (exported: concatenated at the end).
        distances = query.new_empty((num_query, k)) if buffers.enabled else None
        indices = torch.empty((num_query, k), dtype=torch.long, device=query.device) if buffers.enabled else None
        results = []
        for query_start, query_block in zip(query_starts, query_blocks, strict=True):
            # Under export the query count is symbolic: reference blocks then keep chunk_size rows.
            reference_chunk = chunk_size if exporting else max(chunk_size, chunk_size**2 // query_block.shape[0])
            rows = slice(query_start, query_start + query_block.shape[0])
            results.append(
                _knn_of_block(
                    query_block,
                    reference,
                    reference_squared_norm,
                    k,
                    reference_chunk=reference_chunk,
                    self_offset=query_start if exclude_self else None,
                    buffers=buffers,
                    out=(distances[rows], indices[rows]) if buffers.enabled else None,
                )
            )
    if buffers.enabled:
        return distances, indices
    return torch.cat([block_distances for block_distances, _ in results]), torch.cat([found for _, found in results])


def _knn_of_block(
    query_block: torch.Tensor,
    reference: torch.Tensor,
    reference_squared_norm: torch.Tensor,
    k: int,
    *,
    reference_chunk: int,
    self_offset: int | None,
    buffers: BlockBuffers,
    out: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest references of one query block, walking the references in chunks (see :func:`chunked_knn`).

    ``self_offset`` is the row of ``reference`` that the block's first query is (self-exclusion), or None. Every
    temporary is a buffer of ``buffers``; the result goes to ``out`` ``(distances, indices)`` (None: new tensors).
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
            out=buffers.take("ranking", (num_query, reference_stop - reference_start), query_block.dtype),
        )
        if self_offset is not None:  # query row i is reference row self_offset + i: never its own neighbour
            first, last = max(self_offset, reference_start), min(self_offset + num_query, reference_stop)
            if first < last:
                rows = torch.arange(first, last, device=block.device)
                block[rows - self_offset, rows - reference_start] = torch.inf
        block_distances, block_indices = smallest_per_row(block, k, buffers=buffers)
        block_indices.add_(reference_start)  # block columns -> reference rows
        width = best_distances.shape[1] + block_distances.shape[1]
        candidates = torch.cat(
            [best_distances, block_distances], dim=1, out=buffers.take("merge", (num_query, width), query_block.dtype)
        )
        candidate_indices = torch.cat(
            [best_indices, block_indices], dim=1, out=buffers.take("merge_indices", (num_query, width), torch.long)
        )
        kept = min(k, width)
        best_distances, position = torch.topk(
            candidates, kept, dim=1, largest=False, out=buffers.take_topk("best", (num_query, kept), query_block.dtype)
        )
        best_indices = torch.gather(
            candidate_indices, 1, position, out=buffers.take("best_indices", (num_query, kept), torch.long)
        )
    exact = _exact_distances(query_block, reference, best_indices, buffers)
    exact, order = torch.topk(  # ascending; ONNX has no Sort
        exact,
        exact.shape[1],
        dim=1,
        largest=False,
        out=None if out is None else (out[0], buffers.take("order", tuple(exact.shape), torch.long)),
    )
    return exact, torch.gather(best_indices, 1, order, out=None if out is None else out[1])
