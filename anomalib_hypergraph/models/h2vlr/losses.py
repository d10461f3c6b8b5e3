r"""The H2VLR objective (Eq. 8-11) and the image-head term.

Eq. 8: :math:`L = L_{align} + \lambda_{str} L_{str} + \lambda_{seg} L_{seg}` (+ :math:`\lambda_{img} L_{img}`, ours),
with lambda_str = 0.02 and lambda_seg = 1.

- Eq. 9, :math:`L_{align}` = v2t + triplet + EAM, on unit-length tokens z (patch tokens and CLS embeddings):

  * v2t: cross-entropy of every *normal* token choosing the normal centre C_n among {C_n} and every abnormal prompt
    T_a, at CLIP's temperature;
  * triplet (ours: Euclidean on the unit sphere, margin 0.1): a normal token is closer to C_n than to C_a, an
    anomalous (synthetic-defect) token closer to C_a than to C_n;
  * EAM, the explicit anomaly margin:
    :math:`\mathrm{mean}(\max(0, \mathrm{sim}(z, C_a) - \mathrm{sim}(z, C_n) + \gamma))` over the normal tokens
    (gamma ours: 0.1).

- Eq. 10, :math:`L_{str}` = focal + BCE of the node scores M_hg against the mask downsampled to the patch grid (area
  fraction of defect pixels per patch, a soft target) + :math:`\xi\, s^\top L_H s / N`, the combinatorial hypergraph
  Laplacian smoothness of the node scores (zero when scores agree inside every hyperedge), xi ours: 1. The Laplacian
  term sees the hyperedge weights W only as constants divided by their mean (per image): it is a smoothness prior on
  the scores and must not be lowered by shrinking every weight towards 0 while no score changes (it is invariant to
  a common scale of W, and gives W no gradient).
- Eq. 11, :math:`L_{seg}` = Dice + focal on M* + :math:`\mathrm{mean}((1 - Y)\, W_{sem}\, M^*)` with
  :math:`W_{sem} = 1 + (1 - M_{txt})`: a false alarm costs more where the text evidence says "normal". Computed at
  image resolution on the bilinearly upsampled maps (W_sem is a weight: no gradient flows through it).
- :math:`L_{img}` (ours): BCE of the image score against the synthetic label (defect mask non-empty). The paper lists
  no image-level term, but its histogram MLP needs one to learn anything.

Focal losses (ours): gamma = 2, no class balancing, on probabilities, soft targets allowed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_hypergraph.hypergraph import HeterogeneousHypergraph

from .options import H2VLROptions
from .prompts import PromptEmbeddings

EPSILON = 1e-6


class H2VLRLosses(NamedTuple):
    """Every term of one evaluation of the objective (scalars); ``total`` is what is minimised."""

    total: torch.Tensor
    align: torch.Tensor
    v2t: torch.Tensor
    triplet: torch.Tensor
    eam: torch.Tensor
    structural: torch.Tensor
    laplacian: torch.Tensor
    segmentation: torch.Tensor
    image: torch.Tensor


def focal_loss(probability: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean binary focal loss of probabilities against (soft) targets in [0, 1]."""
    probability = probability.clamp(EPSILON, 1.0 - EPSILON)
    positive = target * (1.0 - probability) ** gamma * torch.log(probability)
    negative = (1.0 - target) * probability**gamma * torch.log(1.0 - probability)
    return -(positive + negative).mean()


def binary_cross_entropy(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE of probabilities (clamped away from 0 and 1) against (soft) targets."""
    return F.binary_cross_entropy(probability.clamp(EPSILON, 1.0 - EPSILON), target)


def dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over images of 1 - soft Dice; ``smooth`` keeps defect-free images defined (then: push the map to 0)."""
    probability = probability.flatten(1)
    target = target.flatten(1)
    overlap = (probability * target).sum(dim=1)
    dice = (2.0 * overlap + smooth) / (probability.sum(dim=1) + target.sum(dim=1) + smooth)
    return (1.0 - dice).mean()


def alignment_loss(
    normal_tokens: torch.Tensor,
    anomalous_tokens: torch.Tensor,
    prompts: PromptEmbeddings,
    logit_scale: torch.Tensor | float,
    options: H2VLROptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 9: (L_align, v2t, triplet, EAM) of unit-length normal ``(n, D)`` and anomalous ``(a, D)`` tokens."""
    normal_centre, anomaly_centre = prompts.normal_centre, prompts.anomaly_centre
    candidates = torch.cat([normal_centre[None], prompts.embeddings[prompts.is_abnormal]])  # C_n, then every T_a
    logits = logit_scale * normal_tokens @ candidates.T
    v2t = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))  # Eq. 9: v2t

    def distance(tokens: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(tokens - centre, dim=-1)

    hinges = [
        F.relu(
            distance(normal_tokens, normal_centre) - distance(normal_tokens, anomaly_centre) + options.triplet_margin
        )
    ]
    if anomalous_tokens.shape[0]:
        hinges.append(
            F.relu(
                distance(anomalous_tokens, anomaly_centre)
                - distance(anomalous_tokens, normal_centre)
                + options.triplet_margin
            )
        )
    triplet = torch.cat(hinges).mean()  # Eq. 9: triplet
    similarity_gap = normal_tokens @ anomaly_centre - normal_tokens @ normal_centre
    eam = F.relu(similarity_gap + options.eam_margin).mean()  # Eq. 9: EAM
    return v2t + triplet + eam, v2t, triplet, eam  # Eq. 9: L_align


def structural_loss(
    node_scores: torch.Tensor,
    patch_targets: torch.Tensor,
    hypergraph: HeterogeneousHypergraph,
    edge_weight: torch.Tensor,
    options: H2VLROptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10: (L_str, Laplacian term) of node scores ``(B, N)`` against patch targets ``(B, N)``.

    ``edge_weight`` ``(E,)`` or ``(B, E)`` enters the Laplacian term detached and divided by its mean (module
    docstring), so the term is unchanged by a common scale of the weights.
    """
    weight = edge_weight.detach()
    weight = weight / weight.mean(dim=-1, keepdim=True).clamp_min(EPSILON)  # scale-free, no gradient to W
    laplacian = hypergraph.laplacian_quadratic(node_scores, weight).mean() / node_scores.shape[1]  # s^T L_H s / N
    supervised = focal_loss(node_scores, patch_targets, options.focal_gamma) + binary_cross_entropy(
        node_scores, patch_targets
    )
    return supervised + options.laplacian_weight * laplacian, laplacian  # Eq. 10


def segmentation_loss(
    corrected: torch.Tensor, masks: torch.Tensor, text_map: torch.Tensor, options: H2VLROptions
) -> torch.Tensor:
    """Eq. 11: Dice + focal on M* ``(B, 1, H, W)`` + semantic-weighted false-alarm penalty, W_sem = 1 + (1 - M_txt)."""
    semantic_weight = 1.0 + (1.0 - text_map.detach())  # W_sem
    penalty = ((1.0 - masks) * semantic_weight * corrected).mean()
    return dice_loss(corrected, masks) + focal_loss(corrected, masks, options.focal_gamma) + penalty  # Eq. 11


def image_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_img (ours): BCE of image scores ``(B,)`` against synthetic labels ``(B,)``."""
    return binary_cross_entropy(scores, labels)


def total_loss(
    align: torch.Tensor,
    structural: torch.Tensor | None,
    segmentation: torch.Tensor,
    image: torch.Tensor,
    options: H2VLROptions,
) -> torch.Tensor:
    """Eq. 8: L = L_align + lambda_str L_str + lambda_seg L_seg (+ lambda_img L_img); L_str is None when HSR is off."""
    loss = align + options.lambda_seg * segmentation + options.lambda_image * image
    if structural is not None:
        loss = loss + options.lambda_str * structural
    return loss  # Eq. 8
