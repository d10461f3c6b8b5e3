"""Cross-domain scoring (CDS) of HyperTrans, Eq. 12-19.

A query image's (rectified) patches join the hypergraph; the part linking them to the source bank is the source
sub-hypergraph H^s, the part linking them to the target bank the target one H^t. With incidence = similarity, the
defect score of a patch on a sub-hypergraph is its dissimilarity to its best-matching bank vertex,
``1 - max_j H(f, j)``; for the scale-free kernels used here (:class:`~anomalib_hypergraph.hypergraph.IncidenceKernel`)
that is a strictly increasing function of the patch's nearest-neighbour distance d (reciprocal kernel:
``(d/s) / (1 + d/s)``), so it is computed from the nearest-neighbour distances of
:meth:`HyperTransModel.nearest_distances` and never materialises a query x bank matrix.

Weight of the source domain. With a scale-free kernel nothing saturates any more, so a source bank that no target
patch is close to would add a large, uninformative score to every patch: measured on our benchmarks, fusing with a
fixed beta loses image AUROC against the target bank alone whenever the domains never meet. ``domain_weighting =
"evidence"`` (our extension, the default) therefore scales the paper's beta by the evidence the hypergraph itself gives
that the two domains are comparable: the share of target-bank vertices that have a source vertex among their K nearest
(rectified) bank vertices, i.e. that sit in a cross-domain hyperedge. Domains that never meet get weight ~0 (target-only
scoring); domains that are interleaved get the paper's beta. ``"fixed"`` uses beta as given (the paper).

Translated source bank (paired shots, :mod:`.sensor_map`). When the source bank has been translated into the target
sensor's feature space, both sub-hypergraphs live in one space and a weighted sum would punish every normal patch that
only one of them covers (measured: on MPDD metal plates, whose shots rarely show a test plate's angle, any weighted
sum lost 0.06-0.09 image AUROC at one shot against either sub-hypergraph alone). ``source_fusion="union"`` (the
``"auto"`` choice for a translated bank) therefore takes the defect score of the sub-hypergraph that explains the patch
best, ``1 - max(H^s, H^t)``, each incidence measured in its own unit: the median distance of held-out normal target
patches to that sub-hypergraph, fitted on the shots (held-out shots, or held-out views of a single shot; see
:meth:`HyperTransModel.fit_banks`). The two units are the fusion's weights; they are stored as buffers.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_hypergraph.hypergraph import IncidenceKernel
from anomalib_hypergraph.models.smoothing import SeparableGaussianBlur
from anomalib_hypergraph.models.state import DefaultedState

DomainWeighting = Literal["evidence", "fixed"]
ImageScore = Literal["top_mean", "max"]
SourceFusion = Literal["auto", "union", "weighted"]


class CrossDomainScorer(DefaultedState, nn.Module):
    """Image scores and anomaly maps from the source and target sub-hypergraphs (Eq. 12-19).

    Per query patch, a defect score on the source bank (phi(H^s)) and one on the target bank (phi(H^t)). The image
    score is ``a = w * psi(H^s) + (1 - w) * psi(H^t)`` (Eq. 18) with psi a pooling of the image's un-blurred patch
    scores: their maximum (``image_score="max"``, the paper's Eq. 12-13 / 15-16) or, our default, the mean of the
    highest ``top_fraction`` of them (at least one patch; the pooling AnomalyDINO uses for few-shot patch matching),
    which keeps the score of a clean image from being set by a single noisy patch. The map
    ``S = w * phi(H^s) + (1 - w) * phi(H^t)`` (Eq. 19) is upsampled bilinearly to the image size and smoothed by a
    Gaussian (as PatchCore does). ``w`` is :attr:`source_weight`: ``beta`` itself
    (``"fixed"``, the paper) or ``beta`` times the cross-domain connectivity of the banks (``"evidence"``, see the
    module docstring), fixed by :meth:`fit` and stored as a persistent buffer. Without a source bank, ``w = 0``.

    Args:
        beta: weight of the source sub-hypergraph (paper: 0.6).
        domain_weighting: ``"evidence"`` or ``"fixed"``.
        image_score: ``"top_mean"`` or ``"max"``, see above.
        top_fraction: share of the patches averaged by ``"top_mean"``, in (0, 1].
        sigma: standard deviation of the Gaussian smoothing of the upsampled map (paper: 4); kernel size
            ``2 * int(4 * sigma + 0.5) + 1``.
        enabled_cross_domain: ablation switch. ``False`` replaces CDS by a plain nearest-neighbour baseline: one bank,
            the union of the source and target banks, whose patch score serves as map and, pooled as ``image_score``
            says, as image score.
        source_fusion: how the source sub-hypergraph joins the target one: ``"weighted"`` (Eq. 18-19 with
            :attr:`source_weight`), ``"union"`` (the calibrated union of the module docstring) or ``"auto"`` (union
            when :meth:`fit` is told the source bank was translated from paired shots, weighted otherwise).

    """

    defaulted_state = ("union_fusion", "units")  # checkpoints from before the union: Eq. 18-19 weighting

    def __init__(
        self,
        beta: float = 0.6,
        *,
        domain_weighting: DomainWeighting = "evidence",
        image_score: ImageScore = "top_mean",
        top_fraction: float = 0.01,
        sigma: float = 4.0,
        enabled_cross_domain: bool = True,
        source_fusion: SourceFusion = "auto",
    ) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            msg = f"CrossDomainScorer beta must be in [0, 1], got {beta}."
            raise ValueError(msg)
        if domain_weighting not in get_args(DomainWeighting):
            msg = f"domain_weighting must be one of {get_args(DomainWeighting)}, got {domain_weighting!r}."
            raise ValueError(msg)
        if image_score not in get_args(ImageScore):
            msg = f"image_score must be one of {get_args(ImageScore)}, got {image_score!r}."
            raise ValueError(msg)
        if not 0.0 < top_fraction <= 1.0:
            msg = f"top_fraction must be in (0, 1], got {top_fraction}."
            raise ValueError(msg)
        if source_fusion not in get_args(SourceFusion):
            msg = f"source_fusion must be one of {get_args(SourceFusion)}, got {source_fusion!r}."
            raise ValueError(msg)
        self.beta = beta
        self.domain_weighting = domain_weighting
        self.image_score = image_score
        self.top_fraction = top_fraction
        self.enabled_cross_domain = enabled_cross_domain
        self.source_fusion = source_fusion
        self.blur = SeparableGaussianBlur(sigma)
        self.register_buffer("source_weight", torch.zeros(()))
        # 1: calibrated union of the sub-hypergraphs, 0: Eq. 18-19 weighting; the units of the union (held-out medians).
        self.register_buffer("union_fusion", torch.zeros(()))
        self.register_buffer("units", torch.ones(2))
        self.source_weight: torch.Tensor
        self.union_fusion: torch.Tensor
        self.units: torch.Tensor

    def fit(
        self,
        connectivity: float | None,
        *,
        translated_source: bool = False,
        units: tuple[float, float] | None = None,
    ) -> str:
        """Fix how the sub-hypergraphs are fused and return the fusion: ``"target only"``, ``"union"``, ``"weighted"``.

        Args:
            connectivity: share of target vertices in a cross-domain hyperedge (None: no source bank).
            translated_source: whether the source bank was translated into the target feature space (paired shots).
            units: ``(target, source)`` held-out median distances, the units of the union (needed for it).

        """
        device = self.source_weight.device
        union = connectivity is not None and (
            self.source_fusion == "union" or (self.source_fusion == "auto" and translated_source)
        )
        if union and units is None:
            msg = "The union of the sub-hypergraphs needs their units: held-out distances from paired shots."
            raise ValueError(msg)
        if connectivity is None:
            weight = 0.0
        elif self.domain_weighting == "fixed":
            weight = self.beta
        else:
            weight = self.beta * min(max(connectivity, 0.0), 1.0)
        self.source_weight = torch.tensor(weight, device=device)
        self.union_fusion = torch.tensor(float(union), device=device)
        self.units = torch.tensor(units if union else (1.0, 1.0), device=device)
        if connectivity is None:
            return "target only"
        return "union" if union else "weighted"

    def pool(self, patch_map: torch.Tensor) -> torch.Tensor:
        """psi: one score per image ``(B,)`` from its patch scores ``(B, 1, h, w)`` (Eq. 12-13, 15-16)."""
        flat = patch_map.flatten(1)
        if self.image_score == "max":
            return flat.amax(dim=1)
        count = max(1, math.ceil(self.top_fraction * flat.shape[1]))
        return flat.topk(count, dim=1).values.mean(dim=1)

    def patch_maps(
        self, target_distance: torch.Tensor, source_distance: torch.Tensor | None, kernel: IncidenceKernel
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(B,)`` (Eq. 18) and patch-resolution maps ``(B, 1, h, w)`` (Eq. 19), before upsampling/blur.

        Args:
            target_distance: per patch, the distance to its best-matching target-bank vertex ``(B, h, w)``.
            source_distance: the same for the source bank, or ``None`` without a source domain.
            kernel: the model's incidence kernel (the defect score is ``kernel.defect(distance)``).

        """
        if not self.enabled_cross_domain:
            union = target_distance if source_distance is None else torch.minimum(target_distance, source_distance)
            union_map = kernel.defect(union)[:, None]
            return self.pool(union_map), union_map
        target_map = kernel.defect(target_distance)[:, None]  # phi(H^t), Eq. 17
        target_score = self.pool(target_map)  # psi(H^t), Eq. 15-16
        if source_distance is None:
            return target_score, target_map
        source_map = kernel.defect(source_distance)[:, None]  # phi(H^s), Eq. 14
        source_score = self.pool(source_map)  # psi(H^s), Eq. 12-13
        weight = self.source_weight.to(target_map.dtype)
        image_score = weight * source_score + (1 - weight) * target_score  # Eq. 18
        anomaly_map = weight * source_map + (1 - weight) * target_map  # Eq. 19
        # Calibrated union (ours, translated source bank): 1 - max(H^s, H^t), each distance in its held-out unit
        # (kernel.defect divides by the kernel scale, so the distances are rescaled by scale / unit).
        units = self.units.to(target_distance.dtype) / kernel.scale.to(target_distance.dtype)
        union_map = kernel.defect(torch.minimum(target_distance / units[0], source_distance / units[1]))[:, None]
        union = self.union_fusion.to(target_map.dtype)  # a 0/1 buffer: blended, so exported graphs need no branch
        return union * self.pool(union_map) + (1 - union) * image_score, union * union_map + (1 - union) * anomaly_map

    def forward(
        self,
        target_distance: torch.Tensor,
        source_distance: torch.Tensor | None,
        kernel: IncidenceKernel,
        image_size: tuple[int, int] | torch.Size,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images: ``(B,)`` image scores and ``(B, 1, H, W)`` anomaly maps, upsampled and Gaussian-smoothed."""
        image_score, patch_map = self.patch_maps(target_distance, source_distance, kernel)
        anomaly_map = F.interpolate(patch_map, size=tuple(image_size), mode="bilinear", align_corners=False)
        return image_score, self.blur(anomaly_map)
