"""Shared hypergraph core: chunked kNN, soft hypergraphs with the HGNN operator, convolution and memory banks.

Used by HyperTrans (hypergraph domain rectification and inductive scoring) and H2VLR (cosine top-k search, batched
binary hypergraphs over visual and semantic nodes with learnable hyperedge weights, Laplacian smoothness).
Torch-only: no Lightning imports.
"""

from anomalib_hypergraph.hypergraph.conv import HypergraphConv
from anomalib_hypergraph.hypergraph.cosine import cosine_topk, nearest_cosine_similarity
from anomalib_hypergraph.hypergraph.distributed import gather_rows
from anomalib_hypergraph.hypergraph.heterogeneous import HeterogeneousHypergraph
from anomalib_hypergraph.hypergraph.inductive import AttachedHyperedges, bank_hypergraph, weighted_gather_sum
from anomalib_hypergraph.hypergraph.kernel import KERNEL_KINDS, IncidenceKernel
from anomalib_hypergraph.hypergraph.knn import chunked_knn
from anomalib_hypergraph.hypergraph.memory_bank import HypergraphMemoryBank, greedy_coreset
from anomalib_hypergraph.hypergraph.structure import SoftHypergraph

__all__ = [
    "KERNEL_KINDS",
    "AttachedHyperedges",
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
    "nearest_cosine_similarity",
    "weighted_gather_sum",
]
