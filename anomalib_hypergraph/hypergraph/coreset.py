"""Fast, seeded greedy k-center coreset selection (the farthest-point rule of Sener & Savarese, as in Patchcore).

Greedy k-center keeps, for every bank row, the squared distance to its nearest selected centre and repeatedly picks the
row where it is largest. anomalib's ``KCenterGreedy`` does this by subtracting the new centre from the whole projected
bank and taking a norm: a bank-sized temporary and a full memory pass per pick, which makes a 10 % coreset of a
200k-row bank take about half an hour on two cores. Here:

- the rows are projected once by a seeded Gaussian random projection to ``projection_dim`` columns (distances are
  preserved up to a small relative error, so the coverage in the original space is about the same);
- squared distances come from the expansion ``|x|^2 - 2 x.c + |c|^2`` against cached squared row norms, so a pass
  costs one matrix product and updates the running ``(N,)`` min-distance vector in place, block of rows by block of
  rows (no temporary the size of the bank);
- several centres are picked per pass without changing the result (a lazy greedy): the ``candidates`` rows farthest
  from the current centres are kept aside with their distances; after a pick only their distances are updated, and
  the next pick is taken among them as long as the best of them is still at least as far as the farthest row left
  out (every left-out row can only have come closer). Then the picks of this pass update the whole bank with one
  matrix product. The picks are therefore the ones the one-at-a-time rule makes (up to floating-point ties), and the
  coverage is the same.

All randomness (projection, first centre) comes from a private ``torch.Generator`` seeded with ``seed``: no global
random state is read or changed, so reruns and every rank of a data-parallel run pick the same rows.

The temporaries of the passes (the pool's rows and distance matrix, the new centres, each row block's distances to
them) are :class:`~.knn.BlockBuffers`, allocated once per call and overwritten pass after pass with ``out=``: fresh
block temporaries would let glibc's heap grow with the allocator's history (its dynamic mmap threshold), so the peak
would differ from run to run.
"""

from __future__ import annotations

import torch

from anomalib_hypergraph.hypergraph.knn import BlockBuffers, chunked_knn, squared_row_norms

DEFAULT_PROJECTION_DIM = 256
DEFAULT_CANDIDATES = 2048
_ROW_BLOCK = 16384


def random_projection(
    features: torch.Tensor, projection_dim: int | None, generator: torch.Generator, block: int = _ROW_BLOCK
) -> torch.Tensor:
    """Project rows ``(N, C)`` to ``(N, projection_dim)`` with a seeded Gaussian matrix scaled by 1/sqrt(dim).

    Returns float32 rows as they are (a contiguous float32 copy) when ``projection_dim`` is None or not below ``C``.
    Rows of another dtype are converted block by block into one reused buffer (:class:`~.knn.BlockBuffers`).
    """
    num_rows, channels = features.shape
    if projection_dim is None or projection_dim >= channels:
        return features.to(torch.float32).contiguous()
    matrix = torch.randn(channels, projection_dim, generator=generator, dtype=torch.float32)
    matrix = matrix.to(features.device).mul_(projection_dim**-0.5)
    out = torch.empty(num_rows, projection_dim, dtype=torch.float32, device=features.device)
    buffers = BlockBuffers(features.device, enabled=features.dtype != torch.float32)
    for start in range(0, num_rows, block):
        rows = features[start : start + block]
        converted = buffers.take("rows", tuple(rows.shape), torch.float32)
        torch.mm(rows if converted is None else converted.copy_(rows), matrix, out=out[start : start + block])
    return out


def greedy_k_center(
    features: torch.Tensor,
    num_centers: int,
    *,
    seed: int = 0,
    projection_dim: int | None = DEFAULT_PROJECTION_DIM,
    candidates: int = DEFAULT_CANDIDATES,
    block: int = _ROW_BLOCK,
) -> torch.Tensor:
    """Select ``num_centers`` rows of ``features`` by the greedy k-center (farthest-point) rule; return their indices.

    Args:
        features: bank rows ``(N, C)``.
        num_centers: rows to select, ``1 <= num_centers <= N``.
        seed: seed of the private generator (projection matrix and first centre).
        projection_dim: columns of the random projection the distances are computed in; None keeps the features.
            Lower is faster and coarser: on the 768-d rows of ``benchmarks/bank_scale.py`` 256 reaches about the
            coverage radius of anomalib's ``KCenterGreedy`` (its sparse projection has ~270-300 columns there), None
            a smaller radius at a few times the cost.
        candidates: rows kept aside per pass for the lazy multi-pick (1 gives the plain one-pick-per-pass loop).
        block: rows per block of the full-bank update (bounds its temporary to ``block x picks``).

    Returns:
        ``int64`` indices ``(num_centers,)``, distinct, in selection order (the first is the random start).

    """
    if features.ndim != 2:
        msg = f"greedy_k_center expects features (N, C), got shape {tuple(features.shape)}."
        raise ValueError(msg)
    num_rows = features.shape[0]
    if not 1 <= num_centers <= num_rows:
        msg = f"greedy_k_center: num_centers must be in [1, {num_rows}], got {num_centers}."
        raise ValueError(msg)
    if candidates < 1:
        msg = f"greedy_k_center: candidates must be >= 1, got {candidates}."
        raise ValueError(msg)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    buffers = BlockBuffers(features.device)
    with torch.no_grad():
        projected = random_projection(features, projection_dim, generator, block)
        squared_norm = squared_row_norms(projected, block)
        first = int(torch.randint(num_rows, (1,), generator=generator))
        selected = torch.empty(num_centers, dtype=torch.long)
        selected[0] = first
        count = 1
        # Running squared distance of every row to its nearest centre (one (N,) vector, updated in place).
        min_distance = torch.empty_like(squared_norm)
        most_centres = min(candidates, num_centers)  # picks per pass: at most the pool
        _update(
            min_distance,
            projected,
            squared_norm,
            projected[first : first + 1],
            block,
            buffers=buffers,
            most_centres=most_centres,
            initialise=True,
        )
        min_distance[first] = -1.0  # selected rows are never picked again
        dtype, columns = projected.dtype, projected.shape[1]
        while count < num_centers:
            pool = min(candidates, num_rows - count)
            values, pool_index = torch.topk(min_distance, min(pool + 1, num_rows), largest=True, sorted=True)
            threshold = values[pool] if values.shape[0] > pool else values.new_tensor(-1.0)
            pool_index, pool_distance = pool_index[:pool], values[:pool].clone()
            pool_rows = torch.index_select(
                projected, 0, pool_index, out=buffers.take("pool_rows", (pool, columns), dtype)
            )
            pool_norm = torch.index_select(squared_norm, 0, pool_index, out=buffers.take("pool_norm", (pool,), dtype))
            # Squared distances within the pool, from one (pool x pool) product: a pick then costs a row lookup.
            pool_gram = torch.addmm(
                pool_norm[None, :],
                pool_rows,
                pool_rows.T,
                alpha=-2.0,
                out=buffers.take("pool_gram", (pool, pool), dtype),
            )
            picks = []
            while count + len(picks) < num_centers:
                best = int(torch.argmax(pool_distance))
                if picks and not bool(pool_distance[best] >= threshold):
                    break  # a left-out row could now be the farthest: refresh the whole bank first
                if pool_distance[best] < 0:
                    break
                picks.append(best)
                torch.minimum(pool_distance, pool_gram[best] + pool_norm[best], out=pool_distance)
                pool_distance[best] = -1.0
            new = pool_index[torch.as_tensor(picks, dtype=torch.long, device=pool_index.device)]
            selected[count : count + len(picks)] = new.cpu()
            count += len(picks)
            if count < num_centers:
                centres = torch.index_select(
                    projected,
                    0,
                    new,
                    out=buffers.take("centres", (len(picks), columns), dtype, most=most_centres * columns),
                )
                _update(
                    min_distance, projected, squared_norm, centres, block, buffers=buffers, most_centres=most_centres
                )
            min_distance[new] = -1.0
    return selected.to(features.device)


def _update(
    min_distance: torch.Tensor,
    projected: torch.Tensor,
    squared_norm: torch.Tensor,
    centres: torch.Tensor,
    block: int,
    *,
    buffers: BlockBuffers,
    most_centres: int,
    initialise: bool = False,
) -> None:
    """``min_distance = min(min_distance, squared distance to the nearest of centres)``, block of rows at a time.

    The ``(rows, centres)`` distances of a block and their row minima are written into ``buffers`` (``most_centres``:
    the most centres a call of this coreset passes, which caps the growth of the block buffer).
    """
    centre_norm = centres.pow(2).sum(dim=1)
    dtype = projected.dtype
    for start in range(0, projected.shape[0], block):
        stop = min(start + block, projected.shape[0])
        distance_buffer = buffers.take("distance", (stop - start,), dtype)
        if centres.shape[0] == 1:
            distance = torch.addmv(
                squared_norm[start:stop], projected[start:stop], centres[0], alpha=-2.0, out=distance_buffer
            )
            distance.add_(centre_norm[0])
        else:
            products = torch.addmm(
                centre_norm[None, :],
                projected[start:stop],
                centres.T,
                alpha=-2.0,
                out=buffers.take("products", (stop - start, centres.shape[0]), dtype, most=block * most_centres),
            )
            distance = torch.amin(products.add_(squared_norm[start:stop, None]), dim=1, out=distance_buffer)
        distance.clamp_(min=0.0)
        if initialise:
            min_distance[start:stop] = distance
        else:
            torch.minimum(min_distance[start:stop], distance, out=min_distance[start:stop])


def coverage_radius(features: torch.Tensor, selected: torch.Tensor, chunk_size: int = 2048) -> float:
    """Largest distance of any row of ``features`` to its nearest selected row, in the original feature space."""
    centres = features[selected]
    distances, _ = chunked_knn(features, centres, 1, chunk_size=chunk_size)
    return float(distances.max())
