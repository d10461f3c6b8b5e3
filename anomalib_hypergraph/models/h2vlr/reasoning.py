r"""Heterogeneous hypergraph (Eq. 3), message passing over its visual nodes (Eq. 4), and the anomaly head (M_hg).

Per image, the vertices are its N text-aligned patch tokens (visual nodes) and the P prompt embeddings (semantic
nodes). Hyperedges (:class:`~anomalib_hypergraph.hypergraph.HeterogeneousHypergraph`), binary incidence H:

- structural: each patch and its K = 8 most cosine-similar other patches (K + 1 members);
- semantic (SGHM, ``semantic=True``): each prompt and its K = 8 most cosine-similar patches.

Eq. 3 sets the hyperedge weights W and the degrees: :math:`D_e` counts the members that exchange messages (K + 1
for a structural hyperedge; K for a semantic one, whose prompt defines it but does not send, or K + 1 with
``prompt_messages=True``), :math:`D_v` counts the hyperedges holding a vertex (``vertex_degree="count"``, paper) or
sums their weights (``"weighted"``). W (``edge_weights``):

- ``"affinity"`` (paper reading: weights derived from the prompt-patch affinities): with
  :math:`a_{vp} = \mathrm{softmax}_p(s \cos(x_v, T_p))` at CLIP's temperature s, the semantic hyperedge of prompt p
  weighs :math:`w_p = \frac{1}{K} \sum_{v \in e_p} a_{vp} \in (0, 1)`, how much of its patches' prompt mass
  prompt p holds; structural hyperedges weigh 1. Gradients reach the prompts through W: this is how prompts act on
  the reasoning when their features stay out of the messages.
- ``"free"`` (our earlier reading): :math:`w_e = \mathrm{softplus}(\theta_e)`, one learnable theta per patch position
  and per prompt, starting at 1.

Eq. 4, layer l with its learnable :math:`\Theta^{(l)}` and bias, on the visual nodes only:
:math:`x^{(l+1)} = x^{(l)} + \mathrm{GELU}(P X^{(l)} \Theta^{(l)} + b^{(l)})` with the one-sided propagation
:math:`P = D_v^{-1} H W D_e^{-1} H^\top` (paper; ``normalization="symmetric"`` uses the HGNN
:math:`D_v^{-1/2} H W D_e^{-1} H^\top D_v^{-1/2}`). With ``prompt_messages=False`` (paper reading) P runs over the
visual subgraph (the semantic hyperedges' patches); with ``True`` the prompt embeddings are extra rows of X (inputs of
every layer, never updated). The residual form and the GELU are ours (``residual_update=False``:
:math:`x^{(l+1)} = \mathrm{GELU}(\dots)`). ``num_layers=0`` leaves the tokens unrefined. The anomaly head (ours: MLP
D -> D/4 -> 1, sigmoid) maps every refined visual node to :math:`M_{hg} \in (0, 1)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_hypergraph.hypergraph import HeterogeneousHypergraph, HypergraphConv

# softplus(UNIT_WEIGHT_LOGIT) == 1: free hyperedge weights start at 1 (W = I).
UNIT_WEIGHT_LOGIT = math.log(math.e - 1.0)


class ReasoningOutput(NamedTuple):
    """Result of :class:`HypergraphReasoner` on a batch.

    Attributes:
        node_scores: ``(B, N)`` M_hg, anomaly scores of the refined visual nodes in (0, 1).
        refined: ``(B, N, D)`` visual node features after the L layers.
        hypergraph: the batch's heterogeneous hypergraph (prompt nodes included, for inspection and L_str).
        edge_weight: ``(E,)`` or ``(B, E)`` hyperedge weights W used by the layers.

    """

    node_scores: torch.Tensor
    refined: torch.Tensor
    hypergraph: HeterogeneousHypergraph
    edge_weight: torch.Tensor


class HypergraphReasoner(nn.Module):
    """L layers of heterogeneous hypergraph message passing over visual nodes, then the anomaly head.

    Args:
        dim: D, node feature size (the joint embedding size).
        num_patches: N, patches per image.
        num_prompts: P, prompts.
        num_layers: L (paper: 2); 0 = no message passing.
        num_neighbors: K of the structural hyperedges (paper: 8).
        num_semantic_neighbors: K of the semantic hyperedges (paper: 8).
        semantic: build prompt nodes and semantic hyperedges (SGHM).
        edge_weights: ``"affinity"`` or ``"free"`` (module docstring).
        vertex_degree: ``"count"`` or ``"weighted"`` D_v.
        normalization: ``"one_sided"`` or ``"symmetric"`` propagation.
        prompt_messages: the prompt embeddings take part in the messages (see the module docstring).
        residual_update: ``x + GELU(message)`` (True) or ``GELU(message)``.
        head_reduction: hidden size of the anomaly head = D / ``head_reduction``.
        chunk_size: block size of the cosine top-k searches.

    """

    def __init__(
        self,
        dim: int,
        num_patches: int,
        num_prompts: int,
        *,
        num_layers: int = 2,
        num_neighbors: int = 8,
        num_semantic_neighbors: int = 8,
        semantic: bool = True,
        edge_weights: str = "affinity",
        vertex_degree: str = "count",
        normalization: str = "one_sided",
        prompt_messages: bool = False,
        residual_update: bool = True,
        head_reduction: int = 4,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        if num_layers < 0:
            msg = f"num_layers must be >= 0, got {num_layers}."
            raise ValueError(msg)
        if not 1 <= num_neighbors <= num_patches - 1:
            msg = f"num_neighbors must be between 1 and {num_patches - 1} (patches per image - 1), got {num_neighbors}."
            raise ValueError(msg)
        if semantic and not 1 <= num_semantic_neighbors <= num_patches:
            msg = (
                f"num_semantic_neighbors must be between 1 and {num_patches} (patches per image), "
                f"got {num_semantic_neighbors}."
            )
            raise ValueError(msg)
        if edge_weights not in {"affinity", "free"}:
            msg = f"edge_weights must be 'affinity' or 'free', got {edge_weights!r}."
            raise ValueError(msg)
        self.num_patches = num_patches
        self.num_neighbors = num_neighbors
        self.num_semantic_neighbors = num_semantic_neighbors
        self.semantic = semantic
        self.edge_weights = edge_weights
        self.vertex_degree = vertex_degree
        self.normalization = normalization
        self.prompt_messages = prompt_messages
        self.residual_update = residual_update
        self.chunk_size = chunk_size
        self.structural_weight_logit: nn.Parameter | None = None
        self.semantic_weight_logit: nn.Parameter | None = None
        if edge_weights == "free":
            self.structural_weight_logit = nn.Parameter(torch.full((num_patches,), UNIT_WEIGHT_LOGIT))
            if semantic:
                self.semantic_weight_logit = nn.Parameter(torch.full((num_prompts,), UNIT_WEIGHT_LOGIT))
        self.layers = nn.ModuleList(HypergraphConv(dim, dim) for _ in range(num_layers))
        hidden = max(dim // head_reduction, 1)
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def resize_prompts(self, num_prompts: int) -> None:
        """Give free semantic hyperedge weights new unit values for a prompt ensemble of another size (new class)."""
        if self.semantic_weight_logit is not None:
            device = self.semantic_weight_logit.device
            self.semantic_weight_logit = nn.Parameter(torch.full((num_prompts,), UNIT_WEIGHT_LOGIT, device=device))

    def build_hypergraph(self, patch_tokens: torch.Tensor, prompt_embeddings: torch.Tensor) -> HeterogeneousHypergraph:
        """Eq. 3: structural (and semantic) hyperedges of every image, by cosine similarity (no gradient)."""
        return HeterogeneousHypergraph.from_similarity(
            patch_tokens,
            prompt_embeddings if self.semantic else None,
            self.num_neighbors,
            self.num_semantic_neighbors,
            chunk_size=self.chunk_size,
            normalization=self.normalization,
            vertex_degree_mode=self.vertex_degree,
        )

    def edge_weight(
        self,
        hypergraph: HeterogeneousHypergraph,
        patch_tokens: torch.Tensor,
        prompt_embeddings: torch.Tensor,
        logit_scale: torch.Tensor | float,
    ) -> torch.Tensor:
        """Eq. 3: hyperedge weights W, structural first, then semantic: ``(E,)`` (free) or ``(B, E)`` (affinity)."""
        if self.structural_weight_logit is not None:
            logits = [self.structural_weight_logit]
            if self.semantic_weight_logit is not None:
                logits.append(self.semantic_weight_logit)
            return F.softplus(torch.cat(logits))  # Eq. 3: W = softplus(theta) (free)
        batch_size, num_patches, _ = patch_tokens.shape
        structural = patch_tokens.new_ones(batch_size, num_patches)
        if hypergraph.num_semantic == 0:
            return structural
        affinity = torch.softmax(logit_scale * patch_tokens @ prompt_embeddings.T, dim=-1)  # a_vp, (B, N, P)
        members = hypergraph.members[:, hypergraph.num_structural :]  # (B, P, m): prompt id, then its patches
        visual = (members >= 0) & (members < num_patches)
        index = torch.where(visual, members, 0)
        member_affinity = torch.gather(affinity.transpose(1, 2), 2, index) * visual.to(affinity.dtype)
        count = visual.sum(dim=-1).clamp_min(1).to(affinity.dtype)
        semantic = member_affinity.sum(dim=-1) / count  # Eq. 3: W of prompt p, the mean a_vp over its patches
        return torch.cat([structural, semantic], dim=1)

    def forward(
        self, patch_tokens: torch.Tensor, prompt_embeddings: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> ReasoningOutput:
        """Refine the visual nodes of every image and score them.

        Args:
            patch_tokens: ``(B, N, D)`` normalised text-aligned patch tokens (visual nodes).
            prompt_embeddings: ``(P, D)`` normalised prompt embeddings (semantic nodes).
            logit_scale: CLIP's inverse temperature, for the prompt-patch affinities of ``edge_weights="affinity"``.

        """
        num_patches = patch_tokens.shape[1]
        if num_patches != self.num_patches:
            msg = f"HypergraphReasoner was built for {self.num_patches} patches, got {num_patches}."
            raise ValueError(msg)
        hypergraph = self.build_hypergraph(patch_tokens, prompt_embeddings)  # Eq. 3: H
        weight = self.edge_weight(hypergraph, patch_tokens, prompt_embeddings, logit_scale)  # Eq. 3: W
        with_prompts = self.prompt_messages and hypergraph.num_semantic > 0
        propagation = hypergraph if with_prompts else hypergraph.visual_subgraph()
        semantic = prompt_embeddings.unsqueeze(0).expand(patch_tokens.shape[0], -1, -1)
        nodes = patch_tokens
        for layer in self.layers:
            features = torch.cat([nodes, semantic], dim=1) if with_prompts else nodes
            messages = layer(features, propagation, weight)[:, :num_patches]  # Eq. 4: P X Theta + b
            update = F.gelu(messages)
            nodes = nodes + update if self.residual_update else update  # Eq. 4: visual nodes only
        node_scores = torch.sigmoid(self.head(nodes).squeeze(-1))  # anomaly head: M_hg
        return ReasoningOutput(node_scores, nodes, hypergraph, weight)
