"""Nearest-neighbour search over a memory bank through a chosen backend: our exact chunked search or faiss indexes.

:class:`BankIndex` answers "the k nearest bank rows of each query row" for one bank. Backends:

- ``"exact"`` (default): :func:`~anomalib_hypergraph.hypergraph.knn.chunked_knn`, brute force in blocks, no index;
- ``"faiss_flat"``: faiss ``IndexFlatL2``, also exact (faiss's BLAS kernels);
- ``"faiss_ivf"``: faiss ``IndexIVFFlat``, approximate: the bank is split into ``nlist`` k-means cells (trained with a
  fixed seed on a seeded sample of the rows) and each query visits the ``nprobe`` nearest cells;
- ``"faiss_hnsw"``: faiss ``IndexHNSWFlat``, approximate: a navigable small-world graph, ``ef_search`` wide search.

faiss is optional (``pip install "anomalib-hypergraph[faiss]"``) and imported only when a faiss backend is used.

The index is derived state: checkpoints hold the banks as plain tensors, and the index is (re)built lazily from the
bank it is asked to search whenever that bank is another tensor, another shape or was modified in place (e.g. by a
checkpoint load). Whatever the backend, the returned distances are recomputed exactly from the vectors (as
:func:`chunked_knn` does), ascending per row, so only the choice of neighbours can differ from exact search.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from anomalib_hypergraph.hypergraph.knn import _exact_distances, chunked_knn

SEARCH_BACKENDS = ("exact", "faiss_flat", "faiss_ivf", "faiss_hnsw")
FAISS_INSTALL_HINT = 'pip install "anomalib-hypergraph[faiss]"'


def import_faiss() -> Any:
    """Import faiss, or raise an ImportError that says how to install it."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as error:
        msg = f"The faiss search backends need faiss-cpu: {FAISS_INSTALL_HINT} (or pip install faiss-cpu)."
        raise ImportError(msg) from error
    return faiss


class BankIndex:
    """k-NN search over one memory bank with a chosen backend; the faiss index is rebuilt when the bank changes.

    Args:
        backend: one of :data:`SEARCH_BACKENDS`.
        chunk_size: block size of the exact search (also used for the exact fallback of approximate backends).
        nlist: IVF cells; None: ``round(sqrt(rows))`` (at least 1, at most rows / 39, faiss's training minimum).
        nprobe: IVF cells visited per query.
        hnsw_neighbors: HNSW graph degree (faiss's ``M``).
        ef_construction: HNSW build width.
        ef_search: HNSW search width (raised to ``k`` when smaller).
        seed: seed of the IVF training sample and k-means.

    Example:
        >>> index = BankIndex("exact")
        >>> bank = torch.randn(100, 8)
        >>> distances, indices = index.search(bank[:3], bank, k=1)
        >>> indices[:, 0].tolist()
        [0, 1, 2]

    """

    def __init__(
        self,
        backend: str = "exact",
        *,
        chunk_size: int = 2048,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_neighbors: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        seed: int = 0,
    ) -> None:
        if backend not in SEARCH_BACKENDS:
            msg = f"search_backend must be one of {SEARCH_BACKENDS}, got {backend!r}."
            raise ValueError(msg)
        if backend != "exact":
            import_faiss()  # fail at construction, not at the first search
        self.backend = backend
        self.chunk_size = chunk_size
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_neighbors = hnsw_neighbors
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.seed = seed
        self._index: Any = None
        self._quantizer: Any = None
        self._bank_ref: weakref.ref[torch.Tensor] | None = None
        self._bank_signature: tuple | None = None
        self.builds = 0  # how often an index was built (for tests and logs)

    # An index is derived state: copies and pickles leave it out and rebuild it on first use.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_index=None, _quantizer=None, _bank_ref=None, _bank_signature=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict) -> BankIndex:
        copy = BankIndex.__new__(BankIndex)
        copy.__setstate__(self.__getstate__())
        return copy

    def __repr__(self) -> str:
        return f"BankIndex(backend={self.backend!r})"

    @staticmethod
    def _signature(bank: torch.Tensor) -> tuple:
        return (bank.data_ptr(), bank._version, tuple(bank.shape), bank.dtype, bank.device)

    def _is_current(self, bank: torch.Tensor) -> bool:
        return (
            self._index is not None
            and self._bank_ref is not None
            and self._bank_ref() is bank
            and self._bank_signature == self._signature(bank)
        )

    def build(self, bank: torch.Tensor) -> None:
        """Build the faiss index of ``bank`` ``(rows, C)`` now (searches build it when needed anyway)."""
        if self.backend == "exact":
            return
        faiss = import_faiss()
        rows = bank.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        num_rows, channels = rows.shape
        if self.backend == "faiss_flat":
            index = faiss.IndexFlatL2(channels)
        elif self.backend == "faiss_hnsw":
            index = faiss.IndexHNSWFlat(channels, self.hnsw_neighbors)
            index.hnsw.efConstruction = self.ef_construction
        else:
            nlist = self.nlist or round(math.sqrt(num_rows))
            nlist = max(1, min(nlist, num_rows // 39))
            quantizer = faiss.IndexFlatL2(channels)
            index = faiss.IndexIVFFlat(quantizer, channels, nlist, faiss.METRIC_L2)
            index.cp.seed = self.seed
            generator = torch.Generator().manual_seed(self.seed)
            sample_size = min(num_rows, 64 * nlist)
            sample = torch.randperm(num_rows, generator=generator)[:sample_size].sort().values.numpy()
            index.train(rows[sample])
            index.nprobe = min(self.nprobe, nlist)
        index.add(rows)
        self._index = index
        self._quantizer = quantizer if self.backend == "faiss_ivf" else None  # kept alive with the index
        self._bank_ref = weakref.ref(bank)
        self._bank_signature = self._signature(bank)
        self.builds += 1

    def search(
        self, query: torch.Tensor, bank: torch.Tensor, k: int, *, squared_norm: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Find the ``k`` nearest rows of ``bank`` for every row of ``query``: ``(distances, indices)`` ``(Q, k)``.

        Distances are exact Euclidean distances, ascending; indices ``int64`` into ``bank``. ``squared_norm`` (the
        bank's cached squared row norms) is used by the exact backend. Under ``torch.export`` every backend searches
        exactly (an exported graph cannot call faiss).
        """
        if self.backend == "exact" or torch.compiler.is_exporting():
            return chunked_knn(query, bank, k, chunk_size=self.chunk_size, reference_squared_norm=squared_norm)
        if not 1 <= k <= bank.shape[0]:
            msg = f"BankIndex.search: k must be between 1 and the bank size {bank.shape[0]}, got k={k}."
            raise ValueError(msg)
        if not self._is_current(bank):
            self.build(bank)
        if self.backend == "faiss_hnsw":
            self._index.hnsw.efSearch = max(self.ef_search, k)
        with torch.no_grad():
            rows = query.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
            _, found = self._index.search(rows, k)
            indices = torch.from_numpy(found).to(device=bank.device, dtype=torch.long)
            missing = (indices < 0).any(dim=1)
            if bool(missing.any()):  # an approximate index found fewer than k rows: search those queries exactly
                _, exact_indices = chunked_knn(
                    query[missing], bank, k, chunk_size=self.chunk_size, reference_squared_norm=squared_norm
                )
                indices[missing] = exact_indices
            distances = _exact_distances(query.to(bank.dtype), bank, indices)
            distances, order = torch.sort(distances, dim=1, stable=True)
        return distances, torch.gather(indices, 1, order)
