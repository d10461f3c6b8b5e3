"""Shared hypergraph core: chunked kNN, soft hypergraphs with the HGNN operator, convolution and memory banks.

Used by HyperTrans (hypergraph domain rectification and inductive scoring) and H2VLR (binary hyperedges with learnable
weights, Laplacian smoothness). Torch-only: no Lightning imports.
"""

from anomalib_hypergraph.hypergraph.conv import HypergraphConv
from anomalib_hypergraph.hypergraph.distributed import gather_rows
from anomalib_hypergraph.hypergraph.knn import INCIDENCE_KERNELS, chunked_knn, incidence_from_distance
from anomalib_hypergraph.hypergraph.memory_bank import HypergraphMemoryBank, greedy_coreset
from anomalib_hypergraph.hypergraph.structure import SoftHypergraph, smooth_queries

__all__ = [
    "INCIDENCE_KERNELS",
    "HypergraphConv",
    "HypergraphMemoryBank",
    "SoftHypergraph",
    "chunked_knn",
    "gather_rows",
    "greedy_coreset",
    "incidence_from_distance",
    "smooth_queries",
]
