"""Shared hypergraph core: chunked kNN, soft hypergraphs, convolution, memory banks, coreset and bank search.

Soft hypergraphs come with the HGNN operator; the greedy k-center coreset selects bank rows; bank search runs exact or
through faiss for huge banks.

Used by HyperTrans (hypergraph domain rectification and inductive scoring) and H2VLR (cosine top-k search, batched
binary hypergraphs over visual and semantic nodes with learnable hyperedge weights, Laplacian smoothness).
Torch-only: no Lightning imports.
"""

from anomalib_hypergraph.hypergraph.conv import HypergraphConv
from anomalib_hypergraph.hypergraph.coreset import greedy_k_center
from anomalib_hypergraph.hypergraph.cosine import cosine_topk, nearest_cosine_similarity
from anomalib_hypergraph.hypergraph.distributed import gather_rows
from anomalib_hypergraph.hypergraph.heterogeneous import HeterogeneousHypergraph
from anomalib_hypergraph.hypergraph.inductive import AttachedHyperedges, bank_hypergraph, weighted_gather_sum
from anomalib_hypergraph.hypergraph.kernel import KERNEL_KINDS, IncidenceKernel
from anomalib_hypergraph.hypergraph.knn import chunked_knn, squared_row_norms
from anomalib_hypergraph.hypergraph.memory_bank import HypergraphMemoryBank, greedy_coreset
from anomalib_hypergraph.hypergraph.search import SEARCH_BACKENDS, BankIndex
from anomalib_hypergraph.hypergraph.structure import SoftHypergraph

__all__ = [
    "KERNEL_KINDS",
    "SEARCH_BACKENDS",
    "AttachedHyperedges",
    "BankIndex",
    "HeterogeneousHypergraph",
    "HypergraphConv",
    "HypergraphMemoryBank",
    "IncidenceKernel",
    "SoftHypergraph",
    "bank_hypergraph",
    "chunked_knn",
    "cosine_topk",
    "gather_rows",
    "greedy_coreset",
    "greedy_k_center",
    "nearest_cosine_similarity",
    "squared_row_norms",
    "weighted_gather_sum",
]
