r"""Soft (weighted-incidence) hypergraph with the HGNN propagation operator of Eq. 8.

A hypergraph over N vertices and E hyperedges is stored as its non-zero incidence entries (``vertex_index[t]``,
``edge_index[t]``, ``incidence[t]`` = H[v, e] in (0, 1]) plus a diagonal hyperedge weight ``edge_weight`` (W). All
operators are sparse, so memory is linear in the number of incidence entries (N * (K + 1) for kNN hyperedges).

Why not ``dhg.Hypergraph`` (checked in the installed dhg 0.9.7 sources):

- ``Hypergraph.from_feature_kNN`` calls ``torch.cdist(features, features)``: a dense N x N matrix (40 GB for a
  100k-patch bank). Here the kNN search is exact but chunked (:func:`~.knn.chunked_knn`).
- dhg keys hyperedges by their sorted vertex tuple and merges hyperedges with the same vertex set (``merge_op``,
  averaging their weights). Two vertices that are each other's only neighbour (K=1), or duplicated patches, therefore
  collapse into one hyperedge and |E| shrinks below N, while HyperTrans needs exactly one hyperedge per vertex
  (|E| = |F_s| + |F_t|), each with its own soft incidence row.
- The incidence dhg uses for ``L_HGNN`` / ``smoothing_with_HGNN`` (and so ``HGNNConv``) is built with all values 1:
  soft incidence only exists in its ``v2e``/``e2v`` message passing (``v2e_weight``), not in the Eq. 8 operator.
  (Its weighted ``v2e_aggregation(aggr="mean")`` also multiplies by the hyperedge degree instead of dividing.)

:meth:`SoftHypergraph.to_dhg` exports the binary structure and edge weights for interoperability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from anomalib_hypergraph.hypergraph.kernel import IncidenceKernel
from anomalib_hypergraph.hypergraph.knn import chunked_knn

if TYPE_CHECKING:
    import dhg


def _safe_power(degree: torch.Tensor, exponent: float) -> torch.Tensor:
    """``degree ** exponent`` with 0 where the degree is not positive (isolated vertex / empty hyperedge)."""
    positive = degree > 0
    return torch.where(positive, degree.clamp_min(torch.finfo(degree.dtype).tiny) ** exponent, 0.0)


def _sparse(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Build a coalesced COO matrix; gradients flow to whatever dense matrix it multiplies."""
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, size, check_invariants=False).coalesce()


@dataclass
class SoftHypergraph:
    """Sparse soft incidence H (N x E) with diagonal hyperedge weights W.

    Attributes:
        num_vertices: N.
        vertex_index: vertex of each incidence entry ``(nnz,)`` int64.
        edge_index: hyperedge of each incidence entry ``(nnz,)`` int64.
        incidence: H[vertex, edge] of each entry ``(nnz,)`` float. (vertex, edge) pairs must be unique.
        edge_weight: diagonal of W ``(E,)`` float.

    """

    num_vertices: int
    vertex_index: torch.Tensor
    edge_index: torch.Tensor
    incidence: torch.Tensor
    edge_weight: torch.Tensor

    def __post_init__(self) -> None:
        """Check shapes and index ranges so that a malformed structure fails here, not deep inside a sparse op."""
        nnz = self.vertex_index.shape
        if self.vertex_index.ndim != 1 or self.edge_index.shape != nnz or self.incidence.shape != nnz:
            msg = (
                "SoftHypergraph: vertex_index, edge_index and incidence must be 1-D of equal length, got "
                f"{tuple(self.vertex_index.shape)}, {tuple(self.edge_index.shape)}, {tuple(self.incidence.shape)}."
            )
            raise ValueError(msg)
        if self.edge_weight.ndim != 1:
            msg = f"SoftHypergraph: edge_weight must be 1-D (E,), got {tuple(self.edge_weight.shape)}."
            raise ValueError(msg)
        self.vertex_index = self.vertex_index.long()
        self.edge_index = self.edge_index.long()
        if self.vertex_index.numel():
            if int(self.vertex_index.min()) < 0 or int(self.vertex_index.max()) >= self.num_vertices:
                msg = f"SoftHypergraph: vertex_index must lie in [0, {self.num_vertices})."
                raise ValueError(msg)
            if int(self.edge_index.min()) < 0 or int(self.edge_index.max()) >= self.num_edges:
                msg = f"SoftHypergraph: edge_index must lie in [0, {self.num_edges}) (len(edge_weight))."
                raise ValueError(msg)

    @property
    def num_edges(self) -> int:
        """E, the number of hyperedges (length of ``edge_weight``)."""
        return int(self.edge_weight.shape[0])

    @classmethod
    def from_knn(
        cls,
        features: torch.Tensor,
        k: int,
        *,
        kernel: IncidenceKernel | None = None,
        chunk_size: int = 2048,
    ) -> SoftHypergraph:
        """One hyperedge per vertex: e_i = {i} U kNN(i), H[i, e_i] = 1, H[j, e_i] = kernel(d_ij), W = I (HDR, Eq. 8).

        The kNN search is exact and chunked (never N x N; its block temporaries are buffers reused from block to block,
        :class:`~.knn.BlockBuffers`, so the peak memory is the same in every run); the vertex itself is excluded from
        its own neighbour search and then added with incidence 1. |E| = N, every hyperedge has k + 1 members. The
        structure is built without gradients: it is a fixed graph over the given features.

        Args:
            features: vertex features ``(N, C)``.
            k: neighbours per hyperedge (K), ``1 <= k <= N - 1``.
            kernel: distance-to-incidence kernel; None: the reciprocal kernel on raw distances, ``1 / (1 + d)``.
            chunk_size: block size of the kNN search.

        """
        if features.ndim != 2:
            msg = f"SoftHypergraph.from_knn expects features of shape (N, C), got {tuple(features.shape)}."
            raise ValueError(msg)
        num_vertices = features.shape[0]
        with torch.no_grad():
            distances, neighbours = chunked_knn(features, features, k, chunk_size=chunk_size, exclude_self=True)
            neighbour_incidence = (kernel if kernel is not None else IncidenceKernel())(distances)
            centres = torch.arange(num_vertices, device=features.device)
            members = torch.cat([centres[:, None], neighbours], dim=1)
            incidence = torch.cat([torch.ones_like(neighbour_incidence[:, :1]), neighbour_incidence], dim=1)
        return cls(
            num_vertices=num_vertices,
            vertex_index=members.reshape(-1),
            edge_index=centres.repeat_interleave(k + 1),
            incidence=incidence.reshape(-1),
            edge_weight=torch.ones(num_vertices, dtype=incidence.dtype, device=features.device),
        )

    @classmethod
    def from_edges(
        cls,
        num_vertices: int,
        members: torch.Tensor,
        incidence: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
    ) -> SoftHypergraph:
        """General constructor from a member table: hyperedge e holds the vertices ``members[e]``.

        Hyperedges of different sizes are written with ``-1`` padding (padded slots are ignored). A vertex may appear
        once per hyperedge.

        Args:
            num_vertices: N.
            members: ``(E, m)`` int64 vertex ids, ``-1`` for an empty slot.
            incidence: ``(E, m)`` H[members[e, s], e]; None gives binary incidence (all 1).
            edge_weight: ``(E,)`` hyperedge weights; None gives W = I. A learnable weight is better given to
                :meth:`smooth` as ``edge_weight`` at every call, so that it receives gradients.

        """
        if members.ndim != 2:
            msg = f"SoftHypergraph.from_edges expects members of shape (E, m), got {tuple(members.shape)}."
            raise ValueError(msg)
        members = members.long()
        if incidence is None:
            incidence = torch.ones(members.shape, device=members.device)
        if incidence.shape != members.shape:
            msg = (
                f"SoftHypergraph.from_edges: incidence shape {tuple(incidence.shape)} must equal members shape "
                f"{tuple(members.shape)}."
            )
            raise ValueError(msg)
        if edge_weight is None:
            edge_weight = torch.ones(members.shape[0], dtype=incidence.dtype, device=members.device)
        if edge_weight.shape != (members.shape[0],):
            msg = (
                f"SoftHypergraph.from_edges: edge_weight must have shape ({members.shape[0]},), "
                f"got {tuple(edge_weight.shape)}."
            )
            raise ValueError(msg)
        ordered = members.sort(dim=1).values
        if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
            msg = "SoftHypergraph.from_edges: a vertex appears twice in the same hyperedge."
            raise ValueError(msg)
        present = members >= 0
        edge_ids = torch.arange(members.shape[0], device=members.device)[:, None].expand_as(members)
        return cls(
            num_vertices=num_vertices,
            vertex_index=members[present],
            edge_index=edge_ids[present],
            incidence=incidence[present],
            edge_weight=edge_weight,
        )

    def _edge_weight(self, edge_weight: torch.Tensor | None) -> torch.Tensor:
        """Return the stored W, or a validated override (e.g. a learnable parameter)."""
        if edge_weight is None:
            return self.edge_weight
        if edge_weight.shape != (self.num_edges,):
            msg = (
                f"edge_weight must have shape ({self.num_edges},) (one per hyperedge), got {tuple(edge_weight.shape)}."
            )
            raise ValueError(msg)
        return edge_weight

    def vertex_degree(self, edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        """D_v(v) = sum_e W_e H[v, e], shape ``(N,)`` (differentiable w.r.t. an ``edge_weight`` override)."""
        weight = self._edge_weight(edge_weight)
        contribution = weight[self.edge_index] * self.incidence.to(weight.dtype)
        return contribution.new_zeros(self.num_vertices).index_add(0, self.vertex_index, contribution)

    def edge_degree(self) -> torch.Tensor:
        """D_e(e) = sum_v H[v, e] (weighted incidence), shape ``(E,)``."""
        return self.incidence.new_zeros(self.num_edges).index_add(0, self.edge_index, self.incidence)

    def smooth(self, x: torch.Tensor, edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        r"""HGNN propagation of Eq. 8 without Theta and activation.

        .. math::
            \mathbf{X}' = \mathbf{D}_v^{-1/2} \mathbf{H} \mathbf{W} \mathbf{D}_e^{-1} \mathbf{H}^\top
            \mathbf{D}_v^{-1/2} \mathbf{X}

        Two sparse products (H^T then H), O(nnz * C) time and O((N + E) * C) memory. A vertex without hyperedges (or
        of zero weighted degree) gets 0; an empty hyperedge passes nothing; no NaN.

        Args:
            x: vertex features ``(N, C)``.
            edge_weight: optional override of W ``(E,)``; gradients flow into it.

        """
        if x.ndim != 2 or x.shape[0] != self.num_vertices:
            msg = f"smooth expects x of shape ({self.num_vertices}, C), got {tuple(x.shape)}."
            raise ValueError(msg)
        weight = self._edge_weight(edge_weight).to(x.dtype)
        incidence = self.incidence.to(x.dtype)
        vertex_scale = _safe_power(self.vertex_degree(weight), -0.5)[:, None]  # D_v^-1/2
        edge_scale = (weight * _safe_power(self.edge_degree().to(x.dtype), -1.0))[:, None]  # W D_e^-1
        edges_by_vertices = _sparse(self.edge_index, self.vertex_index, incidence, (self.num_edges, self.num_vertices))
        vertices_by_edges = _sparse(self.vertex_index, self.edge_index, incidence, (self.num_vertices, self.num_edges))
        edge_features = torch.sparse.mm(edges_by_vertices, vertex_scale * x)  # H^T D_v^-1/2 X
        return vertex_scale * torch.sparse.mm(vertices_by_edges, edge_scale * edge_features)  # Eq. 8

    def laplacian_quadratic(self, s: torch.Tensor, edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        r"""Hypergraph Laplacian smoothness :math:`s^\top (I - \Theta) s` with Theta the :meth:`smooth` operator.

        Small when signals agree inside hyperedges (H2VLR's structural regulariser). For ``s`` of shape ``(N, C)``
        the result is the trace :math:`\operatorname{tr}(S^\top (I - \Theta) S)`, the sum over the C channels.

        Args:
            s: vertex signal ``(N,)`` or ``(N, C)``.
            edge_weight: optional override of W, as in :meth:`smooth`.

        Returns:
            A scalar tensor.

        """
        if s.ndim not in (1, 2) or s.shape[0] != self.num_vertices:
            msg = (
                f"laplacian_quadratic expects s of shape ({self.num_vertices},) or ({self.num_vertices}, C), "
                f"got {tuple(s.shape)}."
            )
            raise ValueError(msg)
        signal = s[:, None] if s.ndim == 1 else s
        return (signal * (signal - self.smooth(signal, edge_weight))).sum()

    def to(self, device: torch.device | str) -> SoftHypergraph:
        """Return a copy with every tensor on ``device``."""
        return SoftHypergraph(
            num_vertices=self.num_vertices,
            vertex_index=self.vertex_index.to(device),
            edge_index=self.edge_index.to(device),
            incidence=self.incidence.to(device),
            edge_weight=self.edge_weight.to(device),
        )

    def incidence_dense(self) -> torch.Tensor:
        """Dense H ``(N, E)``. For small graphs and tests only: it is quadratic in size (N x N for kNN hypergraphs)."""
        dense = self.incidence.new_zeros((self.num_vertices, self.num_edges))
        dense[self.vertex_index, self.edge_index] = self.incidence
        return dense

    def to_dhg(self) -> dhg.Hypergraph:
        """Export the binary structure and edge weights as a ``dhg.Hypergraph`` (soft incidence values are dropped).

        dhg merges hyperedges with identical vertex sets (weights averaged), so its ``num_e`` can be smaller than
        :attr:`num_edges`; empty hyperedges cannot be represented and raise ``ValueError``.
        """
        import dhg  # noqa: PLC0415 - importing dhg costs seconds; only this export needs it

        sizes = torch.bincount(self.edge_index, minlength=self.num_edges)
        if bool((sizes == 0).any()):
            msg = "to_dhg: dhg cannot represent empty hyperedges."
            raise ValueError(msg)
        order = torch.argsort(self.edge_index, stable=True)
        vertices = self.vertex_index[order].cpu()
        edge_list = [chunk.tolist() for chunk in torch.split(vertices, sizes.cpu().tolist())]
        return dhg.Hypergraph(self.num_vertices, edge_list, e_weight=self.edge_weight.detach().cpu().tolist())
