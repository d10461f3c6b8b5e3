"""H2VLR: heterogeneous hypergraph vision-language reasoning for few-shot anomaly detection (pure PyTorch).

One ``nn.Module`` with

- a frozen OpenCLIP encoder (:class:`~anomalib_hypergraph.backbones.ClipBackbone`): text-aligned patch tokens (value-
  value "surgery" stream by default), CLS embeddings, and gallery tokens of intermediate blocks;
- Dynamic Semantic Induction (Eq. 1-2, :mod:`.prompts`): support-conditioned learnable prompt groups and the
  semantic centres C_n, C_a;
- the heterogeneous hypergraph (Eq. 3) and its message passing over the visual nodes (Eq. 4, :mod:`.reasoning`), with
  the anomaly head (M_hg);
- anomaly inference (Eq. 5-7, :mod:`.scoring`): base map from text and support-gallery evidence, residual correction
  by the hypergraph, soft-histogram image head;
- the objective (Eq. 8-11, :mod:`.losses`) evaluated by :meth:`H2VLRModel.training_losses`.

The support set is given once with :meth:`H2VLRModel.set_support`; training (prompts, mapper, hypergraph layers, heads)
is driven from outside (the Lightning module, or any loop) by minimising :meth:`H2VLRModel.training_losses` and then
calling :meth:`H2VLRModel.refresh_inference_state`. Everything inference needs (support gallery, global support
feature, encoded prompts and centres, centring bias mu) is kept in persistent buffers, so a checkpoint reproduces the
scores; inference never runs the text encoder. :meth:`forward` returns an :class:`InferenceBatch`.

Ablation switches (paper Table 4, our reading; :class:`~.options.H2VLROptions`): ``use_dsi`` (support conditioning
through Psi, Eq. 1), ``use_hsr`` (high-order structural reasoning: message passing Eq. 4, M_hg and the correction
Eq. 6-7; off, the base map of Eq. 5 goes straight to the image head), ``use_sghm`` (prompt nodes and semantic
hyperedges in the reasoning's hypergraph). ``use_structural_loss`` switches L_str (Eq. 10) on its own; ``use_dsi`` and
``use_hsr`` off = the SAB baseline (learnable prompts, base map Eq. 5, image head).
"""

from __future__ import annotations

import logging
from dataclasses import replace
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
    alignment_loss,
    image_loss,
    segmentation_loss,
    structural_loss,
    total_loss,
)
from .options import H2VLROptions
from .prompts import PromptEmbeddings, PromptLearner
from .reasoning import HypergraphReasoner, ReasoningOutput
from .scoring import (
    HistogramImageHead,
    base_map,
    corrected_map,
    text_anomaly_map,
    upsample_map,
    visual_anomaly_map,
)
from .seeding import seeded

logger = logging.getLogger(__name__)

DEFAULT_CLASS_NAME = "object"
ENCODE_CHUNK = 16  # support images per CLIP forward pass


def shifted_view(images: torch.Tensor, shift: int) -> torch.Tensor:
    """Move images ``shift`` pixels right and down; the uncovered border is filled by reflection (same size)."""
    padded = F.pad(images, (shift, 0, shift, 0), mode="reflect")
    return padded[..., : images.shape[-2], : images.shape[-1]]


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
        options: every option (:class:`~.options.H2VLROptions`, documented there); None = the defaults.
        overrides: options given by name, replacing those of ``options`` (``H2VLRModel(class_name="bottle")``).
            Options that only the training loop reads (``k_shot``, ``lr``, ...) are kept but not used here.

    Initialisation: every part draws from its own seed derived from ``options.seed`` (:func:`~.seeding.seeded`: the
    random CLIP weights, the prompt learner, the hypergraph reasoner, beta and the image head), so the start is the
    same whatever torch's global generator holds and whether the class name comes from the constructor or later
    from :meth:`set_class_name`.

    """

    def __init__(self, options: H2VLROptions | None = None, **overrides: object) -> None:
        super().__init__()
        options = replace(options, **overrides) if options is not None else H2VLROptions(**overrides)
        self.options = options
        for name in options.inert_switches():
            logger.info("H2VLR use_hsr=False: no hypergraph reasoning, so %s=True has no effect.", name)
        seed = options.seed
        if options.backbone_config is not None:
            register_open_clip_config(options.backbone, options.backbone_config)
        with seeded(seed, "backbone"):  # random CLIP weights (pretrained=False)
            self.backbone = ClipBackbone(
                options.backbone,
                pretrained=options.pretrained_tag if options.pretrained else None,
                pretrained_weights=options.pretrained_weights,
                token_source=options.token_source,
                surgery_depth=options.surgery_depth,
                gallery_layers=options.gallery_layers,
            )
        self.class_name = options.class_name or DEFAULT_CLASS_NAME
        self.prompts = self._build_prompts(self.class_name)
        self.reasoner: HypergraphReasoner | None = None
        if options.use_hsr:
            with seeded(seed, "reasoner"):
                self.reasoner = HypergraphReasoner(
                    self.backbone.embed_dim,
                    self.backbone.num_patches,
                    self.prompts.num_prompts,
                    num_layers=options.num_layers,
                    num_neighbors=options.num_neighbors,
                    num_semantic_neighbors=options.num_semantic_neighbors,
                    semantic=options.semantic_hyperedges,
                    edge_weights=options.edge_weights,
                    vertex_degree=options.vertex_degree,
                    normalization=options.normalization,
                    prompt_messages=options.prompt_messages,
                    residual_update=options.residual_update,
                    head_reduction=options.head_reduction,
                    chunk_size=options.chunk_size,
                )
            self.residual_scale = nn.Parameter(torch.tensor(float(options.residual_scale)))  # beta of Eq. 6
        with seeded(seed, "image head"):
            self.image_head = HistogramImageHead(
                options.histogram_bins,
                options.image_head_hidden,
                options.image_head_init,
                learnable=options.learnable_histogram,
            )
        self.blur = SeparableGaussianBlur(options.sigma) if options.sigma > 0 else None

        # What inference needs; persistent so that checkpoints reproduce the scores exactly.
        self.register_buffer("support_gallery", torch.empty(0, 0, 0))  # (G, k*N, W), normalised
        self.register_buffer("support_embedding", torch.empty(0))  # G_s (D,)
        self.register_buffer("prompt_embeddings", torch.empty(0, 0))  # (P, D), normalised
        self.register_buffer("semantic_centres", torch.empty(0, 0))  # (2, D): C_n, C_a
        self.register_buffer("residual_centre", torch.tensor(0.0))  # mu of Eq. 6
        # Training only: the shots' text-aligned tokens (for mu) and, with one shot, its shifted view's gallery.
        self.register_buffer("support_tokens", torch.empty(0, 0, 0), persistent=False)
        self.register_buffer("support_view_gallery", torch.empty(0, 0, 0), persistent=False)
        self.support_gallery: torch.Tensor
        self.support_embedding: torch.Tensor
        self.prompt_embeddings: torch.Tensor
        self.semantic_centres: torch.Tensor
        self.residual_centre: torch.Tensor
        self.support_tokens: torch.Tensor
        self.support_view_gallery: torch.Tensor

    def _build_prompts(self, class_name: str) -> PromptLearner:
        """Build the prompt learner of ``class_name``, always from the same derived seed (one initialisation path)."""
        options = self.options
        with seeded(options.seed, "prompts"):
            return PromptLearner(
                self.backbone,
                class_name,
                context_init=options.context_init,
                context_length=options.context_length,
                groups=tuple(options.prompt_groups),
                num_local_prompts=options.num_local_prompts,
                local_prompt_tokens=options.local_prompt_tokens,
                use_support_conditioning=options.use_dsi,
                conditioning=options.support_conditioning,
            )

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
        temperature = self.options.text_temperature
        return temperature if temperature is not None else self.backbone.logit_scale

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that training updates (the CLIP model is frozen)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def num_learnable_parameters(self) -> int:
        """Count the learnable scalars (paper: about 2.3 M at the default backbone)."""
        return sum(parameter.numel() for parameter in self.learnable_parameters())

    def set_class_name(self, class_name: str) -> None:
        """Rebuild the prompt ensemble (and free semantic hyperedge weights) for another object class.

        The prompt parameters start exactly as if ``class_name`` had been given to the constructor; inference state
        that depends on the prompts is cleared.
        """
        if class_name == self.class_name:
            return
        device = self.prompt_embeddings.device
        self.class_name = class_name
        self.prompts = self._build_prompts(class_name).to(device)
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
        self.support_embedding = encoded.embedding.mean(dim=0)  # Eq. 1 input G_s: mean of the normalised embeddings
        self.support_tokens = encoded.tokens
        self.support_view_gallery = self.support_view_gallery.new_empty(0, 0, 0)
        if num_shots == 1 and self.options.single_shot_gallery == "shifted_view":
            view = self.encode(shifted_view(images, self.half_patch)).gallery  # (1, G, N, W)
            self.support_view_gallery = view[0]
        self.refresh_inference_state()

    @property
    def half_patch(self) -> int:
        """Half the patch size in pixels: the shift of the single-shot training view."""
        return max(self.backbone.image_size[0] // self.backbone.grid_size[0] // 2, 1)

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
            node_scores = self.reasoner(self.support_tokens, prompts.embeddings, self.logit_scale).node_scores
            self.residual_centre = node_scores.mean().detach().clone()  # Eq. 6: mu, mean M_hg over the support images

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
        """All maps of Eq. 5-7 and the image score for encoded images (without HSR: M* = the base map).

        Args:
            encoded: the images' normalised features.
            prompts: encoded prompts and centres.
            support_gallery: ``(G, R, W)`` shared gallery or ``(B, G, R, W)`` per image.
            residual_centre: mu of Eq. 6 (scalar tensor).

        """
        text_map = text_anomaly_map(encoded.tokens, prompts.normal_centre, prompts.anomaly_centre, self.logit_scale)
        visual_map = visual_anomaly_map(encoded.gallery, support_gallery, chunk_size=self.options.chunk_size)
        base = base_map(text_map, visual_map, self.options.alpha)  # Eq. 5
        reasoning = None
        if self.reasoner is None:  # no HSR: the base map goes straight to the image head
            corrected = base.clamp(0.0, 1.0)
        else:
            reasoning = self.reasoner(encoded.tokens, prompts.embeddings, self.logit_scale)  # Eq. 3-4, M_hg
            corrected = corrected_map(  # Eq. 6-7
                base, reasoning.node_scores, residual_centre, self.residual_scale, self.options.eta
            )
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
        """Per-image galleries ``(B, G, R, W)`` that give the training M_vis the distribution of a test image's.

        k >= 2 with ``leave_one_out``: the other shots' tokens. One shot with ``single_shot_gallery="shifted_view"``:
        the tokens of the shot shifted by half a patch (every token differs from the shot's own, as a test image's
        do). Otherwise all shots (a shot then finds itself: M_vis ~ 0 on its normal regions).
        """
        layers, rows, width = self.support_gallery.shape
        num_shots = self.num_shots
        per_shot = self.support_gallery.view(layers, num_shots, rows // num_shots, width)
        if num_shots == 1 and self.support_view_gallery.numel():
            return self.support_view_gallery.unsqueeze(0).expand(shot_index.shape[0], -1, -1, -1)
        if not self.options.leave_one_out or num_shots == 1:
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
                clean_scores = self.reasoner(encoded.tokens[clean], prompts.embeddings, self.logit_scale).node_scores
                centre = clean_scores.mean() if clean_scores.numel() else self.residual_centre
        scores = self.score(encoded, prompts, self.training_gallery(shot_index), centre)

        normal_tokens = torch.cat([encoded.tokens[patch_targets == 0], encoded.embedding[clean]])
        anomalous_tokens = encoded.tokens[patch_targets >= 0.5]
        align, v2t, triplet, eam = alignment_loss(  # Eq. 9
            normal_tokens, anomalous_tokens, prompts, self.logit_scale, self.options
        )
        structural = None
        laplacian = torch.zeros((), device=images.device)
        if self.options.structural_loss and scores.reasoning is not None:
            structural, laplacian = structural_loss(  # Eq. 10
                scores.reasoning.node_scores,
                patch_targets,
                scores.reasoning.hypergraph,
                scores.reasoning.edge_weight,
                self.options,
            )
        image_size = tuple(masks.shape[-2:])
        corrected = upsample_map(scores.corrected_map, grid, image_size).clamp(0.0, 1.0)
        text_map = upsample_map(scores.text_map, grid, image_size)
        segmentation = segmentation_loss(corrected, masks, text_map, self.options)  # Eq. 11
        image = image_loss(scores.image_score, labels)
        total = total_loss(align, structural, segmentation, image, self.options)  # Eq. 8
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
