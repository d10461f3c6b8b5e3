r"""Batched binary hypergraphs over two node types (visual patches and semantic prompts), with hyperedge weights.

H2VLR reasons on one hypergraph per image whose vertices are the image's N patch tokens (visual nodes, ids
``0 .. N-1``) and P prompt embeddings (semantic nodes, ids ``N .. N+P-1``). Its hyperedges are

- **structural**: patch i and its K most cosine-similar other patches (one per patch, K + 1 members),
- **semantic**: prompt p and its K most cosine-similar patches (one per prompt, K + 1 members),

with binary incidence and one weight per hyperedge. :class:`HeterogeneousHypergraph` stores the member table of a
whole batch ``(B, E, m)`` (``-1`` pads hyperedges smaller than ``m``) and provides

- :meth:`~HeterogeneousHypergraph.visual_subgraph`: the same hyperedges restricted to their visual members (a
  semantic hyperedge keeps its K patches), for message passing that stays among the visual nodes;
- :meth:`~HeterogeneousHypergraph.smooth`: the propagation :math:`P X` with either the symmetric HGNN normalisation
  :math:`P = D_v^{-1/2} H W D_e^{-1} H^\top D_v^{-1/2}` (``normalization="symmetric"``, the operator of
  :class:`~.structure.SoftHypergraph`, see :meth:`~HeterogeneousHypergraph.to_soft_hypergraph`) or the one-sided
  :math:`P = D_v^{-1} H W D_e^{-1} H^\top` (``"one_sided"``: every vertex averages the weighted means of its
  hyperedges), and the vertex degree :math:`D_v` either the number of hyperedges holding a vertex
  (``vertex_degree_mode="count"``) or the sum of their weights (``"weighted"``). Gathers and ``scatter_add`` instead of
  ``torch.sparse``, so that it runs batched and exports to ONNX (sparse tensors do not);
- :meth:`~HeterogeneousHypergraph.laplacian_quadratic`: the *combinatorial* hypergraph Laplacian form
  :math:`s^\top (D_v - H W D_e^{-1} H^\top) s = \sum_e \frac{w_e}{\delta_e} \sum_{u<v \in e} (s_u - s_v)^2` over the
  visual members of each hyperedge. It is zero exactly when the scores agree inside every hyperedge (constant scores
  give 0), unlike the normalised form :meth:`~.structure.SoftHypergraph.laplacian_quadratic`, whose null space is
  :math:`D_v^{1/2}\mathbf{1}` and which therefore penalises a constant score map on vertices of unequal degree.

Memory is ``O(B * E * m * C)``; nothing is quadratic in the number of vertices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from anomalib_hypergraph.hypergraph.cosine import cosine_topk
from anomalib_hypergraph.hypergraph.structure import SoftHypergraph

NORMALIZATIONS = ("symmetric", "one_sided")
VERTEX_DEGREE_MODES = ("weighted", "count")


def _inverse_power(degree: torch.Tensor, exponent: float) -> torch.Tensor:
    """``degree ** exponent`` with 0 where the degree is not positive (isolated vertex, empty or zero-weight edge)."""
    return torch.where(degree > 0, degree.clamp_min(torch.finfo(degree.dtype).tiny) ** exponent, 0.0)


@dataclass
class HeterogeneousHypergraph:
    """One binary-incidence hypergraph per batch element over ``num_visual`` visual + ``num_semantic`` semantic nodes.

    Attributes:
        num_visual: N, visual nodes ``0 .. N-1`` of every graph.
        num_semantic: P, semantic nodes ``N .. N+P-1`` of every graph.
        members: ``(B, E, m)`` int64 vertex ids of each hyperedge, ``-1`` for an empty slot. A vertex appears at most
            once per hyperedge.
        num_structural: the first ``num_structural`` hyperedges are structural (patch-centred), the rest semantic.
        normalization: ``"symmetric"`` (HGNN) or ``"one_sided"`` propagation in :meth:`smooth`.
        vertex_degree_mode: ``"weighted"`` (D_v = sum of the weights of a vertex's hyperedges) or ``"count"`` (their
            number).

    """

    num_visual: int
    num_semantic: int
    members: torch.Tensor
    num_structural: int
    normalization: str = "symmetric"
    vertex_degree_mode: str = "weighted"

    def __post_init__(self) -> None:
        """Validate the member table (shape, id range) so that errors surface here rather than in a scatter."""
        if self.members.ndim != 3:
            msg = f"HeterogeneousHypergraph: members must be (B, E, m), got {tuple(self.members.shape)}."
            raise ValueError(msg)
        self.members = self.members.long()
        if self.normalization not in NORMALIZATIONS or self.vertex_degree_mode not in VERTEX_DEGREE_MODES:
            msg = (
                f"HeterogeneousHypergraph: normalization must be one of {NORMALIZATIONS} and vertex_degree_mode one "
                f"of {VERTEX_DEGREE_MODES}, got {self.normalization!r} and {self.vertex_degree_mode!r}."
            )
            raise ValueError(msg)
        if not 0 <= self.num_structural <= self.members.shape[1]:
            msg = f"HeterogeneousHypergraph: num_structural={self.num_structural} outside [0, {self.members.shape[1]}]."
            raise ValueError(msg)
        checkable = not torch.compiler.is_exporting() and self.members.numel() > 0
        if checkable and (int(self.members.max()) >= self.num_vertices or int(self.members.min()) < -1):
            msg = f"HeterogeneousHypergraph: member ids must lie in [-1, {self.num_vertices})."
            raise ValueError(msg)

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_similarity(
        cls,
        visual: torch.Tensor,
        semantic: torch.Tensor | None,
        k_structural: int,
        k_semantic: int,
        *,
        chunk_size: int = 4096,
        normalization: str = "symmetric",
        vertex_degree_mode: str = "weighted",
    ) -> HeterogeneousHypergraph:
        """Structural and semantic hyperedges by cosine similarity (H2VLR's heterogeneous hypergraph).

        Hyperedge ``i < N``: patch i and its ``k_structural`` most similar other patches of the same image.
        Hyperedge ``N + p``: semantic node p and its ``k_semantic`` most similar patches. The structure carries no
        gradient: it is a fixed graph over the given features.

        Args:
            visual: ``(B, N, C)`` patch features.
            semantic: ``(P, C)`` prompt embeddings shared by the batch, ``(B, P, C)``, or None (structural only).
            k_structural: K of the structural hyperedges, ``1 <= K <= N - 1``.
            k_semantic: K of the semantic hyperedges, ``1 <= K <= N``.
            chunk_size: reference rows per block in the similarity search.
            normalization: propagation of :meth:`smooth` (``"symmetric"`` or ``"one_sided"``).
            vertex_degree_mode: D_v of :meth:`smooth` (``"weighted"`` or ``"count"``).

        """
        if visual.ndim != 3:
            msg = f"HeterogeneousHypergraph.from_similarity expects visual (B, N, C), got {tuple(visual.shape)}."
            raise ValueError(msg)
        batch_size, num_visual, _ = visual.shape
        with torch.no_grad():
            _, neighbours = cosine_topk(visual, visual, k_structural, exclude_self=True, chunk_size=chunk_size)
            centres = torch.arange(num_visual, device=visual.device).view(1, num_visual, 1).expand(batch_size, -1, 1)
            structural = torch.cat([centres, neighbours], dim=-1)  # (B, N, K + 1)
            propagation = {"normalization": normalization, "vertex_degree_mode": vertex_degree_mode}
            if semantic is None:
                return cls(num_visual, 0, structural, num_visual, **propagation)
            if semantic.ndim == 2:
                semantic = semantic.unsqueeze(0).expand(batch_size, -1, -1)
            num_semantic = semantic.shape[1]
            _, patches = cosine_topk(semantic, visual, k_semantic, chunk_size=chunk_size)  # (B, P, K)
            prompt_ids = num_visual + torch.arange(num_semantic, device=visual.device)
            prompt_ids = prompt_ids.view(1, num_semantic, 1).expand(batch_size, -1, 1)
            semantic_edges = torch.cat([prompt_ids, patches], dim=-1)  # (B, P, K + 1)
            width = max(structural.shape[-1], semantic_edges.shape[-1])
            members = torch.cat([_pad(structural, width), _pad(semantic_edges, width)], dim=1)
        return cls(num_visual, num_semantic, members, num_visual, **propagation)

    def visual_subgraph(self) -> HeterogeneousHypergraph:
        """Restrict the hyperedges to their visual members: messages pass among the N patches only.

        Semantic members are dropped (a semantic hyperedge keeps its K patches, D_e = K); the vertex set is the N
        patches; hyperedges, their order and their weights stay the same.
        """
        members = torch.where(self.members < self.num_visual, self.members, -1)
        return replace(self, num_semantic=0, members=members)

    # ------------------------------------------------------------------------------------------------ sizes
    @property
    def num_vertices(self) -> int:
        """N + P vertices per graph."""
        return self.num_visual + self.num_semantic

    @property
    def num_edges(self) -> int:
        """E hyperedges per graph."""
        return int(self.members.shape[1])

    @property
    def batch_size(self) -> int:
        """B graphs (kept symbolic under ``torch.export``: no ``int()``, so the batch axis stays dynamic)."""
        return self.members.shape[0]

    @property
    def member_mask(self) -> torch.Tensor:
        """``(B, E, m)`` True where a slot holds a vertex."""
        return self.members >= 0

    def _weights(self, edge_weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Hyperedge weights as ``(B, E)``: ones by default; an ``(E,)`` weight is shared by every graph."""
        if edge_weight is None:
            return torch.ones(self.members.shape[:2], dtype=dtype, device=self.members.device)
        if edge_weight.shape == (self.num_edges,):
            return edge_weight.to(dtype).unsqueeze(0).expand(self.batch_size, -1)
        if edge_weight.shape == (self.batch_size, self.num_edges):
            return edge_weight.to(dtype)
        msg = (
            f"edge_weight must have shape ({self.num_edges},) or ({self.batch_size}, {self.num_edges}), "
            f"got {tuple(edge_weight.shape)}."
        )
        raise ValueError(msg)

    def _flat_members(self) -> torch.Tensor:
        """``(B, E*m)`` member ids with empty slots pointing at vertex 0 (their contributions are masked to 0)."""
        return self.members.clamp_min(0).reshape(self.batch_size, -1)

    # -------------------------------------------------------------------------------------------- operators
    def edge_degree(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """D_e: members per hyperedge (binary incidence), ``(B, E)``."""
        return self.member_mask.sum(dim=-1).to(dtype)  # H2VLR Eq. 3: D_e

    def vertex_degree(
        self, edge_weight: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """D_v ``(B, N + P)``: sum of the weights of the hyperedges holding v, or their number.

        ``vertex_degree_mode="weighted"``: the weights' sum (differentiable in them); ``"count"``: the number.
        """
        weighted = self.vertex_degree_mode == "weighted"
        weight = self._weights(edge_weight if weighted else None, dtype)
        contribution = (weight.unsqueeze(-1) * self.member_mask.to(dtype)).reshape(self.batch_size, -1)
        degree = contribution.new_zeros(self.batch_size, self.num_vertices)
        return degree.scatter_add(1, self._flat_members(), contribution)  # H2VLR Eq. 3: D_v

    def smooth(self, x: torch.Tensor, edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        r"""Propagate vertex features over every graph.

        ``normalization="symmetric"``: :math:`D_v^{-1/2} H W D_e^{-1} H^\top D_v^{-1/2} X` (HGNN);
        ``"one_sided"``: :math:`D_v^{-1} H W D_e^{-1} H^\top X`. :math:`D_v` as set by ``vertex_degree_mode``.

        Args:
            x: ``(B, N + P, C)`` features of all vertices (visual first, then semantic).
            edge_weight: ``(E,)`` or ``(B, E)`` hyperedge weights W (gradients flow into them); None = 1.

        Returns:
            ``(B, N + P, C)``. A vertex in no hyperedge (or only zero-weight ones) gets 0.

        """
        if x.ndim != 3 or x.shape[:2] != (self.batch_size, self.num_vertices):
            msg = f"smooth expects x of shape ({self.batch_size}, {self.num_vertices}, C), got {tuple(x.shape)}."
            raise ValueError(msg)
        channels = x.shape[-1]
        weight = self._weights(edge_weight, x.dtype)
        mask = self.member_mask.to(x.dtype).unsqueeze(-1)  # (B, E, m, 1)
        degree = self.vertex_degree(weight, x.dtype)
        symmetric = self.normalization == "symmetric"
        vertex_scale = _inverse_power(degree, -0.5 if symmetric else -1.0).unsqueeze(-1)  # D_v^-1/2 or D_v^-1
        flat = self._flat_members()
        source = vertex_scale * x if symmetric else x
        gathered = torch.gather(source, 1, flat.unsqueeze(-1).expand(-1, -1, channels))
        gathered = gathered.reshape(*self.members.shape, channels) * mask
        edge_scale = (weight * _inverse_power(self.edge_degree(x.dtype), -1.0)).unsqueeze(-1)  # W D_e^-1
        edge_features = edge_scale * gathered.sum(dim=2)  # W D_e^-1 H^T (D_v^-1/2) X, (B, E, C)
        contributions = (edge_features.unsqueeze(2) * mask).reshape(self.batch_size, -1, channels)
        aggregated = x.new_zeros(self.batch_size, self.num_vertices, channels)
        aggregated = aggregated.scatter_add(1, flat.unsqueeze(-1).expand(-1, -1, channels), contributions)  # H (...)
        return vertex_scale * aggregated

    def laplacian_quadratic(self, scores: torch.Tensor, edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        r"""Combinatorial hypergraph Laplacian form of visual-node scores, per graph.

        .. math::
            s^\top L s = \sum_e w_e \Big(\sum_{v \in e} s_v^2 - \frac{1}{\delta_e}\big(\sum_{v \in e} s_v\big)^2\Big)
            = \sum_e \frac{w_e}{\delta_e} \sum_{u < v \in e} (s_u - s_v)^2

        over the visual members of each hyperedge (semantic nodes carry no score), :math:`\delta_e` their number.
        Non-negative for non-negative weights, zero iff the scores are constant inside every hyperedge.

        Args:
            scores: ``(B, N)`` visual-node scores.
            edge_weight: ``(E,)`` or ``(B, E)`` hyperedge weights; None = 1.

        Returns:
            ``(B,)``.

        """
        if scores.shape != (self.batch_size, self.num_visual):
            msg = (
                f"laplacian_quadratic expects scores of shape ({self.batch_size}, {self.num_visual}), "
                f"got {tuple(scores.shape)}."
            )
            raise ValueError(msg)
        weight = self._weights(edge_weight, scores.dtype)
        visual = (self.members >= 0) & (self.members < self.num_visual)
        index = torch.where(visual, self.members, 0).reshape(self.batch_size, -1)
        values = torch.gather(scores, 1, index).reshape(self.members.shape) * visual.to(scores.dtype)
        size = visual.sum(dim=-1, keepdim=True).to(scores.dtype)
        mean = values.sum(dim=-1, keepdim=True) * _inverse_power(size, -1.0)
        # sum_v (s_v - mean_e)^2 = sum_v s_v^2 - (sum_v s_v)^2 / delta_e, centred for accuracy (constants give 0)
        spread = ((values - mean) * visual.to(scores.dtype)).pow(2).sum(dim=-1)
        return (weight * spread).sum(dim=-1)

    # -------------------------------------------------------------------------------------- interoperability
    def to_soft_hypergraph(self, index: int = 0, edge_weight: torch.Tensor | None = None) -> SoftHypergraph:
        """Graph ``index`` as the shared core's :class:`~.structure.SoftHypergraph` (binary incidence, weights W).

        For a graph with the HGNN propagation (``normalization="symmetric"``, ``vertex_degree_mode="weighted"``), its
        :meth:`~.structure.SoftHypergraph.smooth` equals :meth:`smooth` on that graph; dhg export goes through
        :meth:`~.structure.SoftHypergraph.to_dhg`.
        """
        weight = self._weights(edge_weight, torch.float32)[index]
        return SoftHypergraph.from_edges(self.num_vertices, self.members[index], edge_weight=weight)


def _pad(members: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the last axis of a member table with -1 (empty slots) up to ``width``."""
    missing = width - members.shape[-1]
    if missing == 0:
        return members
    return torch.cat([members, members.new_full((*members.shape[:-1], missing), -1)], dim=-1)
