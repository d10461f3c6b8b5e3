r"""Heterogeneous hypergraph reasoning (Eq. 3-4) and the anomaly head on the refined visual nodes.

Per image, the vertices are its N text-aligned patch tokens (visual nodes) and the P prompt embeddings (semantic
nodes). Hyperedges (:class:`~anomalib_hypergraph.hypergraph.HeterogeneousHypergraph`):

- structural: each patch and its K = 8 most cosine-similar other patches;
- semantic: each prompt and its K = 8 most cosine-similar patches;

with binary incidence and one learnable weight per hyperedge, :math:`w_e = \mathrm{softplus}(\theta_e)` (a weight per
patch position for the structural hyperedges, per prompt for the semantic ones; initialised to 1).

Message passing (Eq. 3-4), layer l with its learnable :math:`\Theta^{(l)}`:

- Eq. 3 (vertex -> hyperedge): :math:`m_e = \frac{1}{\delta_e} \sum_{v \in e} d_v^{-1/2}\, x_v \Theta^{(l)}` over all
  members, semantic nodes included (they carry their prompt embeddings);
- Eq. 4 (hyperedge -> vertex, visual nodes only):
  :math:`x_v^{(l+1)} = x_v^{(l)} + \mathrm{GELU}\big(d_v^{-1/2} \sum_{e \ni v} w_e m_e + b^{(l)}\big)`;

i.e. the HGNN operator of the shared :class:`~anomalib_hypergraph.hypergraph.HypergraphConv`, whose rows of the
semantic nodes are dropped: prompt embeddings are inputs of every layer, never updated. The residual form and the
GELU are our choices (the refined nodes stay close to the CLIP tokens they start from). The anomaly head (ours: a
two-layer MLP D -> D/4 -> 1 with a sigmoid) maps every refined visual node to its score :math:`M_{hg} \in (0, 1)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_hypergraph.hypergraph import HeterogeneousHypergraph, HypergraphConv

# softplus(UNIT_WEIGHT_LOGIT) == 1: hyperedges start with weight 1 (W = I).
UNIT_WEIGHT_LOGIT = math.log(math.e - 1.0)


class ReasoningOutput(NamedTuple):
    """Result of :class:`HypergraphReasoner` on a batch.

    Attributes:
        node_scores: ``(B, N)`` M_hg, anomaly scores of the refined visual nodes in (0, 1).
        refined: ``(B, N, D)`` visual node features after the L layers.
        hypergraph: the batch's heterogeneous hypergraph.
        edge_weight: ``(E,)`` hyperedge weights softplus(theta) used by the layers.

    """

    node_scores: torch.Tensor
    refined: torch.Tensor
    hypergraph: HeterogeneousHypergraph
    edge_weight: torch.Tensor


class HypergraphReasoner(nn.Module):
    """L layers of heterogeneous hypergraph message passing over visual nodes, then the anomaly head.

    Args:
        dim: D, node feature size (the joint embedding size).
        num_patches: N, patches per image (one structural hyperedge weight each).
        num_prompts: P, prompts (one semantic hyperedge weight each).
        num_layers: L (paper: 2).
        num_neighbors: K of the structural hyperedges (paper: 8).
        num_semantic_neighbors: K of the semantic hyperedges (paper: 8).
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
        head_reduction: int = 4,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            msg = f"num_layers must be >= 1, got {num_layers}."
            raise ValueError(msg)
        if not 1 <= num_neighbors <= num_patches - 1:
            msg = f"num_neighbors must be between 1 and {num_patches - 1} (patches per image - 1), got {num_neighbors}."
            raise ValueError(msg)
        if not 1 <= num_semantic_neighbors <= num_patches:
            msg = (
                f"num_semantic_neighbors must be between 1 and {num_patches} (patches per image), "
                f"got {num_semantic_neighbors}."
            )
            raise ValueError(msg)
        self.num_neighbors = num_neighbors
        self.num_semantic_neighbors = num_semantic_neighbors
        self.chunk_size = chunk_size
        self.structural_weight_logit = nn.Parameter(torch.full((num_patches,), UNIT_WEIGHT_LOGIT))
        self.semantic_weight_logit = nn.Parameter(torch.full((num_prompts,), UNIT_WEIGHT_LOGIT))
        self.layers = nn.ModuleList(HypergraphConv(dim, dim) for _ in range(num_layers))
        hidden = max(dim // head_reduction, 1)
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def resize_prompts(self, num_prompts: int) -> None:
        """Give the semantic hyperedges new unit weights for a prompt ensemble of another size (new class name)."""
        device = self.semantic_weight_logit.device
        self.semantic_weight_logit = nn.Parameter(torch.full((num_prompts,), UNIT_WEIGHT_LOGIT, device=device))

    def edge_weight(self) -> torch.Tensor:
        """W = softplus(theta) of all hyperedges: structural (one per patch) first, then semantic (one per prompt)."""
        return F.softplus(torch.cat([self.structural_weight_logit, self.semantic_weight_logit]))

    def forward(self, patch_tokens: torch.Tensor, prompt_embeddings: torch.Tensor) -> ReasoningOutput:
        """Refine the visual nodes of every image and score them.

        Args:
            patch_tokens: ``(B, N, D)`` normalised text-aligned patch tokens (visual nodes).
            prompt_embeddings: ``(P, D)`` normalised prompt embeddings (semantic nodes).

        """
        batch_size, num_patches, _ = patch_tokens.shape
        if num_patches != self.structural_weight_logit.shape[0]:
            msg = (
                f"HypergraphReasoner was built for {self.structural_weight_logit.shape[0]} patches, got {num_patches}."
            )
            raise ValueError(msg)
        hypergraph = HeterogeneousHypergraph.from_similarity(
            patch_tokens,
            prompt_embeddings,
            self.num_neighbors,
            self.num_semantic_neighbors,
            chunk_size=self.chunk_size,
        )
        weight = self.edge_weight()
        semantic = prompt_embeddings.unsqueeze(0).expand(batch_size, -1, -1)
        nodes = patch_tokens
        for layer in self.layers:
            messages = layer(torch.cat([nodes, semantic], dim=1), hypergraph, weight)  # Eq. 3-4 (HGNN operator)
            nodes = nodes + F.gelu(messages[:, :num_patches])  # Eq. 4: update of the visual nodes only
        node_scores = torch.sigmoid(self.head(nodes).squeeze(-1))  # anomaly head: M_hg
        return ReasoningOutput(node_scores, nodes, hypergraph, weight)
