"""H2VLR: heterogeneous hypergraph vision-language reasoning for few-shot anomaly detection (pure PyTorch).

One ``nn.Module`` with

- a frozen OpenCLIP encoder (:class:`~anomalib_hypergraph.backbones.ClipBackbone`): text-aligned patch tokens (value-
  value "surgery" stream by default), CLS embeddings, and gallery tokens of intermediate blocks;
- Dynamic Semantic Induction (Eq. 1-2, :mod:`.prompts`): support-conditioned learnable prompt groups and the
  semantic centres C_n, C_a;
- the heterogeneous hypergraph reasoner (Eq. 3-4, :mod:`.reasoning`) and its anomaly head (M_hg);
- anomaly inference (Eq. 5-7, :mod:`.scoring`): base map from text and support-gallery evidence, residual correction
  by the hypergraph, soft-histogram image head;
- the objective (Eq. 8-11, :mod:`.losses`) evaluated by :meth:`H2VLRModel.training_losses`.

The support set is given once with :meth:`H2VLRModel.set_support`; training (prompts, mapper, hypergraph layers, heads)
is driven from outside (the Lightning module, or any loop) by minimising :meth:`H2VLRModel.training_losses` and then
calling :meth:`H2VLRModel.refresh_inference_state`. Everything inference needs (support gallery, global support
feature, encoded prompts and centres, centring bias mu) is kept in persistent buffers, so a checkpoint reproduces the
scores; inference never runs the text encoder. :meth:`forward` returns an :class:`InferenceBatch`.

Ablation switches (paper Table 4, our reading): ``use_dsi`` (support conditioning through Psi), ``use_sghm`` (the
semantic-guided hypergraph module: Eq. 3-4, M_hg, the residual correction Eq. 6-7), ``use_hsr`` (hypergraph structural
regularisation: L_str, Eq. 10). All off = the SAB baseline (learnable prompts, base map Eq. 5, image head).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

from anomalib_hypergraph.backbones import ClipBackbone, register_open_clip_config
from anomalib_hypergraph.models.smoothing import SeparableGaussianBlur

from .losses import (
    H2VLRLosses,
    LossConfig,
    alignment_loss,
    image_loss,
    segmentation_loss,
    structural_loss,
    total_loss,
)
from .prompts import PROMPT_GROUPS, PromptEmbeddings, PromptLearner
from .reasoning import HypergraphReasoner, ReasoningOutput
from .scoring import (
    HistogramImageHead,
    base_map,
    corrected_map,
    text_anomaly_map,
    upsample_map,
    visual_anomaly_map,
)

DEFAULT_CLASS_NAME = "object"
ENCODE_CHUNK = 16  # support images per CLIP forward pass


class EncodedImages(NamedTuple):
    """Normalised CLIP features of a batch: ``tokens`` (B, N, D), ``embedding`` (B, D), ``gallery`` (B, G, N, W)."""

    tokens: torch.Tensor
    embedding: torch.Tensor
    gallery: torch.Tensor


class H2VLRScores(NamedTuple):
    """Every map of one scoring pass (patch resolution ``(B, N)``) and the image score ``(B,)``."""

    text_map: torch.Tensor
    visual_map: torch.Tensor
    base_map: torch.Tensor
    corrected_map: torch.Tensor
    image_score: torch.Tensor
    reasoning: ReasoningOutput | None


class H2VLRModel(DynamicBufferMixin, nn.Module):
    """H2VLR as a pure ``nn.Module`` (see the module docstring).

    Args:
        backbone: open_clip architecture (paper: ``ViT-B-16-plus-240``).
        pretrained: load the pretrained CLIP weights ``pretrained_tag`` (hub or open_clip's cache); False gives
            random weights without network access. Ignored when ``pretrained_weights`` is given.
        pretrained_tag: open_clip pretrained tag (paper: ``laion400m_e32``).
        pretrained_weights: local state dict of the whole CLIP model (air-gapped machines); takes precedence.
        backbone_config: open_clip model config (dict) registered under ``backbone`` when open_clip does not know
            that name (tiny test models, custom architectures).
        class_name: object class of the prompts; None = ``"object"`` until :meth:`set_class_name` is called.
        token_source: text-aligned patch tokens from the value-value ``"surgery"`` stream or the ``"final"`` tokens.
        surgery_depth: blocks in the value-value stream (None: half of the blocks).
        gallery_layers: 0-based blocks whose patch tokens form the visual support gallery (paper: blocks 2 and 7).
        context_init: words initialising the learnable prompt context (None: ``context_length`` random vectors).
        context_length: context vectors per prompt when ``context_init`` is None.
        prompt_groups: abnormal prompt groups, subset of ``("global", "special", "local")``.
        num_local_prompts: Local prompts (learnable anomaly tokens).
        local_prompt_tokens: learnable anomaly tokens per Local prompt.
        num_neighbors: K of the structural hyperedges (paper: 8).
        num_semantic_neighbors: K of the semantic hyperedges (paper: 8).
        num_layers: L hypergraph layers (paper: 2).
        head_reduction: hidden size of the anomaly head = D / ``head_reduction``.
        alpha: weight of the text map in the base map, Eq. 5 (paper: 0.5).
        eta: weight of the residual correction, Eq. 7 (paper: 0.4).
        residual_scale: initial value of the learnable beta of Eq. 6.
        histogram_bins: bins of the soft histogram of the image head.
        image_head_hidden: hidden units of the image-head MLP.
        image_head_init: ``"tail"`` (starts as an increasing function of the histogram's upper tail) or ``"random"``.
        text_temperature: logit scale of text similarities; None = the CLIP model's learned one.
        sigma: Gaussian smoothing of the upsampled anomaly map (0: none).
        use_dsi: ablation switch, support conditioning of the prompts (Psi, Eq. 1).
        use_sghm: ablation switch, hypergraph reasoning and residual correction (Eq. 3-4, 6-7).
        use_hsr: ablation switch, the structural loss L_str (Eq. 10); needs ``use_sghm``.
        loss_config: weights and margins of the objective (Eq. 8-11).
        leave_one_out: during training, match each image against the gallery of the *other* shots (with one shot:
            against itself), so the visual evidence is not trivially zero for re-submitted support images.
        chunk_size: block size of the cosine top-k searches.
        seed: seed of every random initialisation (random CLIP weights, prompt vectors, hypergraph layers, heads),
            drawn from a private generator at construction and in :meth:`set_class_name`.

    """

    def __init__(
        self,
        *,
        backbone: str = "ViT-B-16-plus-240",
        pretrained: bool = True,
        pretrained_tag: str = "laion400m_e32",
        pretrained_weights: str | Path | None = None,
        backbone_config: Mapping | None = None,
        class_name: str | None = None,
        token_source: str = "surgery",
        surgery_depth: int | None = None,
        gallery_layers: Sequence[int] = (2, 7),
        context_init: str | None = "a photo of a",
        context_length: int = 4,
        prompt_groups: Sequence[str] = PROMPT_GROUPS,
        num_local_prompts: int = 4,
        local_prompt_tokens: int = 2,
        num_neighbors: int = 8,
        num_semantic_neighbors: int = 8,
        num_layers: int = 2,
        head_reduction: int = 4,
        alpha: float = 0.5,
        eta: float = 0.4,
        residual_scale: float = 1.0,
        histogram_bins: int = 16,
        image_head_hidden: int = 32,
        image_head_init: str = "tail",
        text_temperature: float | None = None,
        sigma: float = 4.0,
        use_dsi: bool = True,
        use_sghm: bool = True,
        use_hsr: bool = True,
        loss_config: LossConfig | None = None,
        leave_one_out: bool = True,
        chunk_size: int = 4096,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if use_hsr and not use_sghm:
            msg = "use_hsr=True needs use_sghm=True: the structural loss L_str acts on the hypergraph's node scores."
            raise ValueError(msg)
        if not 0.0 <= alpha <= 1.0:
            msg = f"alpha (Eq. 5) must lie in [0, 1], got {alpha}."
            raise ValueError(msg)
        if sigma < 0:
            msg = f"sigma must be >= 0, got {sigma}."
            raise ValueError(msg)
        self.seed = seed
        with torch.random.fork_rng(devices=[]):  # private generator: the global RNG does not matter
            torch.manual_seed(seed)
            if backbone_config is not None:
                register_open_clip_config(backbone, backbone_config)
            self.backbone = ClipBackbone(
                backbone,
                pretrained=pretrained_tag if pretrained else None,
                pretrained_weights=pretrained_weights,
                token_source=token_source,
                surgery_depth=surgery_depth,
                gallery_layers=gallery_layers,
            )
            self.prompt_options = {
                "context_init": context_init,
                "context_length": context_length,
                "groups": tuple(prompt_groups),
                "num_local_prompts": num_local_prompts,
                "local_prompt_tokens": local_prompt_tokens,
                "use_support_conditioning": use_dsi,
            }
            self.class_name = class_name or DEFAULT_CLASS_NAME
            self.prompts = PromptLearner(self.backbone, self.class_name, **self.prompt_options)
            self.reasoner: HypergraphReasoner | None = None
            if use_sghm:
                self.reasoner = HypergraphReasoner(
                    self.backbone.embed_dim,
                    self.backbone.num_patches,
                    self.prompts.num_prompts,
                    num_layers=num_layers,
                    num_neighbors=num_neighbors,
                    num_semantic_neighbors=num_semantic_neighbors,
                    head_reduction=head_reduction,
                    chunk_size=chunk_size,
                )
                self.residual_scale = nn.Parameter(torch.tensor(float(residual_scale)))  # beta of Eq. 6
            self.image_head = HistogramImageHead(histogram_bins, image_head_hidden, image_head_init)
            self.alpha = alpha
            self.eta = eta
            self.use_hsr = use_hsr
            self.leave_one_out = leave_one_out
            self.chunk_size = chunk_size
            self.loss_config = loss_config or LossConfig()
            self.text_temperature = text_temperature
            self.blur = SeparableGaussianBlur(sigma) if sigma > 0 else None

        # What inference needs; persistent so that checkpoints reproduce the scores exactly.
        self.register_buffer("support_gallery", torch.empty(0, 0, 0))  # (G, k*N, W), normalised
        self.register_buffer("support_embedding", torch.empty(0))  # G_s (D,)
        self.register_buffer("prompt_embeddings", torch.empty(0, 0))  # (P, D), normalised
        self.register_buffer("semantic_centres", torch.empty(0, 0))  # (2, D): C_n, C_a
        self.register_buffer("residual_centre", torch.tensor(0.0))  # mu of Eq. 6
        # Training only: the shots' text-aligned tokens, for mu.
        self.register_buffer("support_tokens", torch.empty(0, 0, 0), persistent=False)
        self.support_gallery: torch.Tensor
        self.support_embedding: torch.Tensor
        self.prompt_embeddings: torch.Tensor
        self.semantic_centres: torch.Tensor
        self.residual_centre: torch.Tensor
        self.support_tokens: torch.Tensor

    # ------------------------------------------------------------------------------------------------ state
    @property
    def is_fitted(self) -> bool:
        """Whether a support set and encoded prompts exist (a shape check, free of data-dependent branches)."""
        return self.support_gallery.shape[0] > 0 and self.prompt_embeddings.shape[0] > 0

    @property
    def num_shots(self) -> int:
        """k, the number of support images."""
        return int(self.support_gallery.shape[1]) // self.backbone.num_patches if self.support_gallery.numel() else 0

    @property
    def logit_scale(self) -> torch.Tensor | float:
        """Inverse temperature of every text-image similarity (``text_temperature``, or CLIP's own as a tensor)."""
        return self.text_temperature if self.text_temperature is not None else self.backbone.logit_scale

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that training updates (the CLIP model is frozen)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def num_learnable_parameters(self) -> int:
        """Count the learnable scalars (paper: about 2.3 M at the default backbone)."""
        return sum(parameter.numel() for parameter in self.learnable_parameters())

    def set_class_name(self, class_name: str) -> None:
        """Rebuild the prompt ensemble (and the semantic hyperedge weights) for another object class.

        The learned prompt parameters are reset; inference state that depends on the prompts is cleared.
        """
        if class_name == self.class_name:
            return
        device = self.prompt_embeddings.device
        self.class_name = class_name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.prompts = PromptLearner(self.backbone, class_name, **self.prompt_options).to(device)
        if self.reasoner is not None:
            self.reasoner.resize_prompts(self.prompts.num_prompts)
        self.prompt_embeddings = self.prompt_embeddings.new_empty(0, 0)
        self.semantic_centres = self.semantic_centres.new_empty(0, 0)

    # -------------------------------------------------------------------------------------------- features
    def encode(self, images: torch.Tensor) -> EncodedImages:
        """Normalised CLIP features of images in [0, 1] (no gradient: the backbone is frozen)."""
        with torch.no_grad():
            features = self.backbone.encode_image(images)
        return EncodedImages(
            tokens=F.normalize(features.patch_tokens, dim=-1),
            embedding=F.normalize(features.image_embedding, dim=-1),
            gallery=F.normalize(features.gallery_tokens, dim=-1),
        )

    @torch.no_grad()
    def set_support(self, images: torch.Tensor) -> None:
        """Store the k support shots (images in [0, 1], ``(k, 3, H, W)``): gallery, G_s, tokens; refresh prompts."""
        if images.ndim != 4 or images.shape[0] < 1:
            msg = f"set_support expects a non-empty batch of images (k, 3, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        chunks = [
            self.encode(images[start : start + ENCODE_CHUNK]) for start in range(0, images.shape[0], ENCODE_CHUNK)
        ]
        encoded = EncodedImages(*(torch.cat(parts) for parts in zip(*chunks, strict=True)))
        num_shots, layers, patches, width = encoded.gallery.shape
        self.support_gallery = encoded.gallery.permute(1, 0, 2, 3).reshape(layers, num_shots * patches, width)
        self.support_embedding = F.normalize(encoded.embedding.mean(dim=0), dim=-1)  # G_s
        self.support_tokens = encoded.tokens
        self.refresh_inference_state()

    def encode_prompts(self) -> PromptEmbeddings:
        """Encode the prompt ensemble conditioned on G_s (with gradients to the prompt parameters)."""
        if self.support_embedding.numel() == 0:
            msg = "H2VLR has no support set yet: call set_support(shots) first (Lightning does it at fit start)."
            raise RuntimeError(msg)
        return self.prompts(self.backbone, self.support_embedding)

    @torch.no_grad()
    def refresh_inference_state(self) -> None:
        """Recompute what inference reads from the current parameters: encoded prompts, centres, mu."""
        prompts = self.encode_prompts()
        self.prompt_embeddings = prompts.embeddings.detach().clone()
        self.semantic_centres = torch.stack([prompts.normal_centre, prompts.anomaly_centre]).detach().clone()
        if self.reasoner is not None and self.support_tokens.numel():
            node_scores = self.reasoner(self.support_tokens, prompts.embeddings).node_scores
            self.residual_centre = node_scores.mean().detach().clone()  # mu: mean M_hg over the support images

    def stored_prompts(self) -> PromptEmbeddings:
        """Return the encoded prompts kept in the buffers (what inference uses)."""
        return PromptEmbeddings(
            self.prompt_embeddings, self.prompts.is_abnormal, self.semantic_centres[0], self.semantic_centres[1]
        )

    # ---------------------------------------------------------------------------------------------- scoring
    def score(
        self,
        encoded: EncodedImages,
        prompts: PromptEmbeddings,
        support_gallery: torch.Tensor,
        residual_centre: torch.Tensor,
    ) -> H2VLRScores:
        """All maps of Eq. 5-7 and the image score for encoded images.

        Args:
            encoded: the images' normalised features.
            prompts: encoded prompts and centres.
            support_gallery: ``(G, R, W)`` shared gallery or ``(B, G, R, W)`` per image.
            residual_centre: mu of Eq. 6 (scalar tensor).

        """
        text_map = text_anomaly_map(encoded.tokens, prompts.normal_centre, prompts.anomaly_centre, self.logit_scale)
        visual_map = visual_anomaly_map(encoded.gallery, support_gallery, chunk_size=self.chunk_size)
        base = base_map(text_map, visual_map, self.alpha)  # Eq. 5
        reasoning = None
        if self.reasoner is None:
            corrected = base.clamp(0.0, 1.0)
        else:
            reasoning = self.reasoner(encoded.tokens, prompts.embeddings)  # Eq. 3-4 and the anomaly head
            corrected = corrected_map(base, reasoning.node_scores, residual_centre, self.residual_scale, self.eta)
        image_score = self.image_head(corrected)  # soft histogram + MLP
        return H2VLRScores(text_map, visual_map, base, corrected, image_score, reasoning)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Image scores ``(B,)`` and anomaly maps ``(B, 1, H, W)`` of images in [0, 1] at the backbone's input size."""
        if not self.is_fitted:
            msg = (
                "H2VLR has no support set or encoded prompts yet: train it first (anomalib train/fit, or Engine.fit) "
                "or load a trained checkpoint."
            )
            raise RuntimeError(msg)
        scores = self.score(self.encode(images), self.stored_prompts(), self.support_gallery, self.residual_centre)
        anomaly_map = upsample_map(scores.corrected_map, self.backbone.grid_size, tuple(images.shape[-2:]))
        if self.blur is not None:
            anomaly_map = self.blur(anomaly_map)
        return InferenceBatch(pred_score=scores.image_score, anomaly_map=anomaly_map)

    # --------------------------------------------------------------------------------------------- training
    def training_gallery(self, shot_index: torch.Tensor) -> torch.Tensor:
        """Per-image galleries ``(B, G, R, W)``: the other shots' tokens (leave-one-out), or all shots."""
        layers, rows, width = self.support_gallery.shape
        num_shots = self.num_shots
        per_shot = self.support_gallery.view(layers, num_shots, rows // num_shots, width)
        if not self.leave_one_out or num_shots == 1:
            return self.support_gallery.unsqueeze(0).expand(shot_index.shape[0], -1, -1, -1)
        galleries = []
        for shot in shot_index.tolist():
            others = [index for index in range(num_shots) if index != shot]
            galleries.append(per_shot[:, others].reshape(layers, -1, width))
        return torch.stack(galleries)

    def training_losses(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        shot_index: torch.Tensor,
        clean: torch.Tensor,
    ) -> H2VLRLosses:
        """Evaluate the objective (Eq. 8-11) on support images and their synthetic-anomaly versions.

        Args:
            images: ``(B, 3, H, W)`` in [0, 1], shots and shots with synthetic anomalies.
            masks: ``(B, 1, H, W)`` defect masks (0 for clean shots).
            shot_index: ``(B,)`` which support shot each image derives from (leave-one-out gallery).
            clean: ``(B,)`` bool, True for unmodified shots (their M_hg gives mu, their CLS is a normal token).

        """
        prompts = self.encode_prompts()
        encoded = self.encode(images)
        grid = self.backbone.grid_size
        patch_targets = F.adaptive_avg_pool2d(masks, grid).flatten(1)  # (B, N) defect fraction per patch
        labels = (masks.flatten(1).amax(dim=1) > 0).to(images.dtype)

        centre = torch.zeros((), device=images.device)
        if self.reasoner is not None:
            with torch.no_grad():  # mu from the clean shots (Eq. 6)
                clean_scores = self.reasoner(encoded.tokens[clean], prompts.embeddings).node_scores
                centre = clean_scores.mean() if clean_scores.numel() else self.residual_centre
        scores = self.score(encoded, prompts, self.training_gallery(shot_index), centre)

        normal_tokens = torch.cat([encoded.tokens[patch_targets == 0], encoded.embedding[clean]])
        anomalous_tokens = encoded.tokens[patch_targets >= 0.5]
        align, v2t, triplet, eam = alignment_loss(  # Eq. 9
            normal_tokens, anomalous_tokens, prompts, self.logit_scale, self.loss_config
        )
        structural = None
        laplacian = torch.zeros((), device=images.device)
        if self.use_hsr and scores.reasoning is not None:
            structural, laplacian = structural_loss(  # Eq. 10
                scores.reasoning.node_scores,
                patch_targets,
                scores.reasoning.hypergraph,
                scores.reasoning.edge_weight,
                self.loss_config,
            )
        image_size = tuple(masks.shape[-2:])
        corrected = upsample_map(scores.corrected_map, grid, image_size).clamp(0.0, 1.0)
        text_map = upsample_map(scores.text_map, grid, image_size)
        segmentation = segmentation_loss(corrected, masks, text_map, self.loss_config)  # Eq. 11
        image = image_loss(scores.image_score, labels)
        total = total_loss(align, structural, segmentation, image, self.loss_config)  # Eq. 8
        zero = torch.zeros((), device=images.device)
        return H2VLRLosses(
            total=total,
            align=align,
            v2t=v2t,
            triplet=triplet,
            eam=eam,
            structural=structural if structural is not None else zero,
            laplacian=laplacian,
            segmentation=segmentation,
            image=image,
        )
