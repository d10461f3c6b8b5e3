"""HyperTrans: hypergraph domain transfer for cross-domain few-shot anomaly detection (pure PyTorch).

The model of Algorithm 1 in the HyperTrans paper, as one ``nn.Module``:

- a frozen patch-feature backbone whose stages carry zero-initialised adapters trained under Perlin-AdaIN domain
  perturbation (DP, Eq. 3-7; :mod:`.perturbation`);
- a memory of patch features per domain: the source bank (greedy coreset of the source training images) and the
  target bank (all patches of the k target shots), both through the adapted backbone;
- hypergraph domain rectification (HDR, Eq. 8-11; :mod:`.rectification`): a residual HGNN trained on the cross-domain
  hypergraph over both banks; the banks are stored rectified, and a query's patches are rectified inductively by
  attaching one hyperedge per patch to its nearest bank vertices, so inference is linear in the bank size;
- cross-domain scoring (CDS, Eq. 12-19; :mod:`.scoring`) of the rectified query patches on the source and target
  sub-hypergraphs.

Training is driven from outside (the Lightning module, or any loop): :meth:`perturbation_loss` for stage 1, the
memory bank for the banks, :meth:`prepare_rectification` / :meth:`rectification_loss` for stage 2 and
:meth:`store_rectified_banks` at the end. In eval mode :meth:`forward` returns an :class:`InferenceBatch`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

from anomalib_hypergraph.backbones import PatchFeatureExtractor
from anomalib_hypergraph.data.domains import SOURCE, TARGET
from anomalib_hypergraph.hypergraph import HypergraphMemoryBank, SoftHypergraph, chunked_knn, incidence_from_distance

from .perturbation import DomainPerturbation, perturbation_loss
from .rectification import ResHGNN, pseudo_features, rectification_loss
from .scoring import CrossDomainScorer

logger = logging.getLogger(__name__)


@dataclass
class RectificationProblem:
    """Everything stage 2 (HDR) optimises over: the cross-domain hypergraph of both banks and its fixed targets.

    Vertices are ordered target bank first, then source bank; ``domain`` is 1 for target and 0 for source vertices.
    """

    hypergraph: SoftHypergraph
    features: torch.Tensor
    domain: torch.Tensor
    pseudo: torch.Tensor
    num_fallback: int


class HyperTransModel(DynamicBufferMixin, nn.Module):
    """HyperTrans as a pure ``nn.Module``: adapted backbone, domain banks, residual HGNN and cross-domain scorer.

    Args:
        backbone: timm backbone name (paper: ``vit_base_patch8_224.dino``; offline: ``tf_efficientnet_lite0``).
        layers: backbone stages whose features form the patch descriptors (``None``: the backbone's default).
        pretrained: load pretrained weights (hub, offline weight package, or ``pretrained_weights``).
        pretrained_weights: local weights file for the backbone (air-gapped machines).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. tiny test models).
        perturbed_stages: 0-based backbone stages followed by perturbation and an adapter. ``None`` = the paper's
            layers 3..10 of a 12-block ViT (indices 2..9: all blocks but the first two and the last two; shallow test
            ViTs keep at least one block); for a CNN, every stage from the second up to the one before the last
            feature stage.
        noise_mean: mean of the Perlin channel factors P_avg, P_std (paper: 0).
        noise_std: standard deviation of the Perlin channel factors (paper: 0.75).
        adapter_reduction: bottleneck reduction of the residual adapters (our choice; the paper only says adapter).
        num_neighbors: K, the nearest vertices joined to each vertex's hyperedge (our choice: 10).
        incidence_kernel: how a distance becomes an incidence value in [0, 1]: ``"reciprocal"`` 1/(1+d) or
            ``"gaussian"`` exp(-d^2 / 2 s^2).
        incidence_bandwidth: s of the Gaussian kernel, in feature-distance units; required with ``"gaussian"`` (one
            fixed width for bank, queries and scoring, so scores do not depend on the batch), unused otherwise.
        alpha: residual weight of the HGNN branch in Eq. 9 (paper: 0.3).
        dropout: dropout inside the residual HGNN (paper: 0.5).
        beta: weight of the source sub-hypergraph in Eq. 18-19 (paper: 0.6).
        sigma: Gaussian smoothing of the upsampled anomaly map (paper: 4).
        chunk_size: rows per block in every distance computation (memory vs speed).
        use_domain_perturbation: ablation switch for DP (adapters are then absent).
        use_rectification: ablation switch for HDR (banks and queries are then used as extracted).
        use_cross_domain_scoring: ablation switch for CDS (off: one nearest-neighbour bank, the union of both).

    """

    def __init__(
        self,
        *,
        backbone: str = "vit_base_patch8_224.dino",
        layers: Sequence[str] | None = None,
        pretrained: bool = True,
        pretrained_weights: str | Path | None = None,
        model_kwargs: dict | None = None,
        perturbed_stages: Sequence[int] | None = None,
        noise_mean: float = 0.0,
        noise_std: float = 0.75,
        adapter_reduction: int = 4,
        num_neighbors: int = 10,
        incidence_kernel: str = "reciprocal",
        incidence_bandwidth: float | None = None,
        alpha: float = 0.3,
        dropout: float = 0.5,
        beta: float = 0.6,
        sigma: float = 4.0,
        chunk_size: int = 2048,
        use_domain_perturbation: bool = True,
        use_rectification: bool = True,
        use_cross_domain_scoring: bool = True,
    ) -> None:
        super().__init__()
        self.feature_extractor = PatchFeatureExtractor(
            backbone,
            layers,
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            model_kwargs=model_kwargs,
        )
        self.num_neighbors = num_neighbors
        self.incidence_kernel = incidence_kernel
        self.incidence_bandwidth = incidence_bandwidth
        self.chunk_size = chunk_size

        self.perturbation: DomainPerturbation | None = None
        if use_domain_perturbation:
            stages = (
                list(perturbed_stages)
                if perturbed_stages is not None
                else default_perturbed_stages(self.feature_extractor)
            )
            self.perturbation = DomainPerturbation(
                stage_channels=self.feature_extractor.stage_channels,
                perturbed_stages=stages,
                kind=self.feature_extractor.kind,
                num_prefix_tokens=getattr(self.feature_extractor, "num_prefix_tokens", 0),
                noise_mean=noise_mean,
                noise_std=noise_std,
                adapter_reduction=adapter_reduction,
            )
        feature_dim = self.feature_extractor.feature_dim
        self.rectifier = ResHGNN(feature_dim, alpha=alpha, dropout=dropout) if use_rectification else None
        self.scorer = CrossDomainScorer(
            beta=beta,
            kernel=incidence_kernel,
            bandwidth=incidence_bandwidth,
            sigma=sigma,
            chunk_size=chunk_size,
            enabled_cross_domain=use_cross_domain_scoring,
        )
        self.memory_bank = HypergraphMemoryBank(domains=(SOURCE, TARGET))

        # What inference needs after training; persistent so that checkpoints reproduce test scores exactly.
        self.register_buffer("rectified_source", torch.empty(0, 0))
        self.register_buffer("rectified_target", torch.empty(0, 0))
        self.register_buffer("rectifier_bank_hidden", torch.empty(0, 0))
        self.register_buffer("rectifier_bank_degree", torch.empty(0))
        self.rectified_source: torch.Tensor
        self.rectified_target: torch.Tensor
        self.rectifier_bank_hidden: torch.Tensor
        self.rectifier_bank_degree: torch.Tensor

    @property
    def is_fitted(self) -> bool:
        """Whether the banks are built; a shape check, so that ``torch.export`` (ONNX) sees no data-dependent branch."""
        return self.rectified_target.shape[0] > 0

    # ----------------------------------------------------------------------------------------------- features
    def extract(self, images: torch.Tensor, *, perturb: bool = False) -> torch.Tensor:
        """Patch features (B, C, h, w) through the adapted backbone; ``perturb`` adds the DP noise (training only)."""
        if self.perturbation is None:
            return self.feature_extractor(images)
        return self.feature_extractor(images, stage_hook=self.perturbation.stage_hook(perturb=perturb, adapt=True))

    def perturbation_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Stage 1 objective (Eq. 7): clean frozen-backbone features vs perturbed features through the adapters."""
        if self.perturbation is None:
            msg = "Domain perturbation is disabled (use_domain_perturbation=False): there is no stage-1 loss."
            raise RuntimeError(msg)
        with torch.no_grad():
            clean = self.feature_extractor(images)
        perturbed = self.extract(images, perturb=True)
        return perturbation_loss(clean, perturbed)  # Eq. 7

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Bank-ready patch descriptors (B*h*w, C) of images through the adapted, unperturbed backbone."""
        return flatten_patches(self.extract(images))

    # ---------------------------------------------------------------------------------------- rectification
    @property
    def rectification_enabled(self) -> bool:
        """Whether HDR can run: switched on and both domains have a bank."""
        return self.rectifier is not None and self.memory_bank.has(SOURCE) and self.memory_bank.has(TARGET)

    def bank_vertices(self) -> torch.Tensor:
        """Vertices of the cross-domain hypergraph: target bank rows first, then source bank rows."""
        parts = [self.memory_bank.get(TARGET)]
        if self.memory_bank.has(SOURCE):
            parts.append(self.memory_bank.get(SOURCE))
        return torch.cat(parts)

    def prepare_rectification(self) -> RectificationProblem:
        """Build the cross-domain hypergraph of both banks and the pseudo features it is trained towards (Eq. 10)."""
        if not self.rectification_enabled:
            msg = "Rectification needs use_rectification=True and non-empty source and target banks."
            raise RuntimeError(msg)
        features = self.bank_vertices()
        num_target = self.memory_bank.get(TARGET).shape[0]
        domain = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        domain[:num_target] = 1
        hypergraph = SoftHypergraph.from_knn(
            features,
            self.num_neighbors,
            kernel=self.incidence_kernel,
            bandwidth=self.incidence_bandwidth,
            chunk_size=self.chunk_size,
        )
        pseudo = pseudo_features(features, domain, hypergraph, chunk_size=self.chunk_size)  # Eq. 10
        return RectificationProblem(
            hypergraph=hypergraph,
            features=features,
            domain=domain,
            pseudo=pseudo.features,
            num_fallback=int(pseudo.used_fallback.sum()),
        )

    def rectification_loss(self, problem: RectificationProblem) -> torch.Tensor:
        """Stage 2 objective (Eq. 11) of the residual HGNN on the bank hypergraph."""
        assert self.rectifier is not None
        rectified = self.rectifier(problem.features, problem.hypergraph)  # Eq. 9
        return rectification_loss(rectified, problem.pseudo, problem.features)  # Eq. 11

    @torch.no_grad()
    def store_rectified_banks(self, problem: RectificationProblem | None) -> None:
        """Freeze what inference needs: rectified banks, and the bank side of the inductive query rectification.

        Without a problem (HDR off, or a single domain) the banks are stored as extracted.
        """
        source = self.memory_bank.get(SOURCE) if self.memory_bank.has(SOURCE) else None
        target = self.memory_bank.get(TARGET)
        if problem is None or self.rectifier is None:
            self.rectified_target = target.clone()
            self.rectified_source = source.clone() if source is not None else target.new_empty(0, 0)
            self.rectifier_bank_hidden = target.new_empty(0, 0)
            self.rectifier_bank_degree = target.new_empty(0)
        else:
            was_training = self.rectifier.training
            self.rectifier.eval()
            rectified = self.rectifier(problem.features, problem.hypergraph)  # Eq. 9 on the whole bank
            self.rectifier.train(was_training)
            num_target = target.shape[0]
            self.rectified_target = rectified[:num_target].clone()
            self.rectified_source = rectified[num_target:].clone()
            self.rectifier_bank_hidden = self.rectifier.bank_hidden(problem.features, problem.hypergraph)
            self.rectifier_bank_degree = problem.hypergraph.vertex_degree()

    def rectify_queries(self, patches: torch.Tensor) -> torch.Tensor:
        """Rectify query patch rows (n, C) inductively: one new hyperedge per patch to its K nearest bank vertices."""
        if self.rectifier is None or self.rectifier_bank_hidden.numel() == 0:
            return patches
        bank = self.bank_vertices()
        distances, neighbours = chunked_knn(
            patches, bank, min(self.num_neighbors, bank.shape[0]), chunk_size=self.chunk_size
        )
        incidence = incidence_from_distance(distances, kernel=self.incidence_kernel, bandwidth=self.incidence_bandwidth)
        return self.rectifier.forward_queries(
            patches,
            bank,
            self.rectifier_bank_hidden,
            self.rectifier_bank_degree,
            neighbours,
            incidence,
        )

    # -------------------------------------------------------------------------------------------- inference
    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training mode: patch features (B, C, h, w). Eval mode: image scores and anomaly maps (Eq. 18-19)."""
        if self.training:
            return self.extract(images)
        if not self.is_fitted:
            msg = (
                "HyperTrans has no memory bank yet: train it first (anomalib train/fit, or Engine.fit) "
                "or load a trained checkpoint."
            )
            raise RuntimeError(msg)
        source = self.rectified_source if self.rectified_source.numel() else None
        return self.score_against(images, source_bank=source, target_bank=self.rectified_target, rectify=True)

    def score_against(
        self,
        images: torch.Tensor,
        source_bank: torch.Tensor | None,
        target_bank: torch.Tensor,
        *,
        rectify: bool = False,
    ) -> InferenceBatch:
        """Cross-domain scores (Eq. 12-19) of images against given banks; ``rectify`` applies the trained HDR first."""
        return self.score_features(
            self.extract(images), source_bank, target_bank, tuple(images.shape[-2:]), rectify=rectify
        )

    def score_features(
        self,
        features: torch.Tensor,
        source_bank: torch.Tensor | None,
        target_bank: torch.Tensor,
        image_size: tuple[int, int],
        *,
        rectify: bool = False,
    ) -> InferenceBatch:
        """Cross-domain scores of already extracted patch features (B, C, h, w), maps at ``image_size``."""
        batch_size, channels, height, width = features.shape
        patches = flatten_patches(features)
        if rectify:
            patches = self.rectify_queries(patches)
        query = patches.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2)
        pred_score, anomaly_map = self.scorer(query, source_bank, target_bank, image_size)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) patch grid -> (B*h*w, C) rows in row-major patch order."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def default_perturbed_stages(extractor: PatchFeatureExtractor) -> list[int]:
    """Stages followed by perturbation when the user does not choose (see ``HyperTransModel.perturbed_stages``)."""
    if extractor.kind == "vit":
        first = max(min(2, extractor.num_stages - 2), 0)
        return list(range(first, max(extractor.num_stages - 2, first + 1)))
    last_feature_stage = max(extractor.stage_names.index(layer) for layer in extractor.layers)
    return list(range(1, max(last_feature_stage, 2)))
