"""Frozen OpenCLIP encoders for vision-language anomaly detection: text-aligned patch tokens, visual gallery, prompts.

:class:`ClipBackbone` wraps an ``open_clip`` CLIP model (built by :func:`~.factory.create_open_clip_model`: hub,
local weights file or random weights) and exposes what few-shot vision-language detectors need:

- **image embedding**: the projected CLS token, as ``encode_image`` returns it;
- **text-aligned patch tokens**: CLIP's final patch tokens align poorly with text, because the last blocks' query-key
  attention mixes every patch with a few global "register" tokens. ``token_source="surgery"`` adds a second residual
  stream over the last ``surgery_depth`` blocks in which each block contributes *value-value* self-attention
  ``softmax(scale * V V^T) V`` (keys and queries replaced by the values, no MLP), computed from the normal stream's
  block input; the stream ends in ``ln_post`` and the projection, like the CLS token. This is the idea of "CLIP
  surgery" (Li et al., 2023) used by the PromptAD line of work. ``token_source="final"`` returns the plain final
  tokens through ``ln_post`` and the projection;
- **visual gallery tokens**: the patch tokens after chosen intermediate blocks (``gallery_layers``, 0-based block
  indices), of the visual width (896 for ``ViT-B-16-plus-240``), for nearest-neighbour matching against support shots;
- **prompt encoding from token embeddings** (:meth:`ClipBackbone.encode_token_embeddings`), so that learnable
  context vectors can replace some token embeddings (prompt learning). Sequences are cut after their last
  end-of-text token: the causal text transformer makes that exact and saves most of the 77-token context.

All CLIP weights are frozen (``requires_grad=False``) and the CLIP model always stays in eval mode.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_hypergraph.backbones.factory import backbone_normalization, create_open_clip_model

TokenSource = Literal["surgery", "final"]
TOKEN_SOURCES = ("surgery", "final")


def register_open_clip_config(name: str, config: Mapping) -> None:
    """Make ``open_clip`` know an architecture from a config dict (the content of a ``model_configs/*.json`` file).

    Useful for tiny test models and for architectures that open_clip does not ship. Registering the same config under
    the same name again is a no-op.

    Args:
        name: architecture name to register (then usable wherever open_clip takes a model name).
        config: ``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``.

    Raises:
        ValueError: ``config`` lacks a required section, or ``name`` is already an open_clip architecture with a
            different config (an existing architecture is never redefined silently).

    """
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        msg = f"open_clip config for '{name}' lacks {missing}; expected the content of an open_clip model config JSON."
        raise ValueError(msg)
    config = json.loads(json.dumps(dict(config)))  # plain, JSON-serialisable copy
    existing = open_clip.get_model_config(name)
    if existing is not None:
        if json.loads(json.dumps(existing)) == config:
            return
        msg = f"open_clip already defines an architecture '{name}' with another config; choose another backbone name."
        raise ValueError(msg)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


class ClipVisualFeatures(NamedTuple):
    """What :meth:`ClipBackbone.encode_image` returns for a batch of B images with N patches.

    Attributes:
        image_embedding: ``(B, D)`` projected CLS token (not normalised).
        patch_tokens: ``(B, N, D)`` text-aligned patch tokens in the joint embedding space (not normalised).
        gallery_tokens: ``(B, G, N, W)`` patch tokens after each of the G gallery blocks (visual width W).

    """

    image_embedding: torch.Tensor
    patch_tokens: torch.Tensor
    gallery_tokens: torch.Tensor


class ClipBackbone(nn.Module):
    """Frozen OpenCLIP model with patch-token, gallery-token and prompt-embedding access (see the module docstring).

    Args:
        name: open_clip architecture (default ``ViT-B-16-plus-240``).
        pretrained: open_clip pretrained tag (``laion400m_e32``), or None for random weights without network access.
        pretrained_weights: local state dict of the whole CLIP model (no download); overrides ``pretrained``.
        token_source: ``"surgery"`` (value-value attention stream) or ``"final"`` tokens for the text-aligned patches.
        surgery_depth: number of final blocks in the value-value stream; None = half of the blocks (6 of 12).
        gallery_layers: 0-based indices of the blocks whose output patch tokens form the visual gallery.

    Raises:
        ValueError: unknown token source, a depth or gallery index outside the model, or a vision tower that is not an
            open_clip ``VisionTransformer`` with a class token and multi-head attention blocks.

    """

    def __init__(
        self,
        name: str = "ViT-B-16-plus-240",
        *,
        pretrained: str | None = "laion400m_e32",
        pretrained_weights: str | Path | None = None,
        token_source: TokenSource = "surgery",
        surgery_depth: int | None = None,
        gallery_layers: Sequence[int] = (2, 7),
    ) -> None:
        super().__init__()
        if token_source not in TOKEN_SOURCES:
            msg = f"token_source must be one of {TOKEN_SOURCES}, got {token_source!r}."
            raise ValueError(msg)
        self.name = name
        self.clip = create_open_clip_model(name, pretrained=pretrained, pretrained_weights=pretrained_weights)
        self.clip.requires_grad_(False)
        self.clip.eval()
        visual = self.clip.visual
        _check_vision_tower(name, visual)
        self.num_blocks = len(visual.transformer.resblocks)
        self.token_source = token_source
        self.surgery_depth = self.num_blocks // 2 if surgery_depth is None else int(surgery_depth)
        if token_source == "surgery" and not 1 <= self.surgery_depth <= self.num_blocks:
            msg = f"surgery_depth must be between 1 and the {self.num_blocks} blocks of '{name}', got {surgery_depth}."
            raise ValueError(msg)
        self.gallery_layers = tuple(int(layer) for layer in gallery_layers)
        if not self.gallery_layers or any(not 0 <= layer < self.num_blocks for layer in self.gallery_layers):
            msg = (
                f"gallery_layers must be non-empty 0-based block indices of '{name}' (0..{self.num_blocks - 1}), "
                f"got {list(gallery_layers)}."
            )
            raise ValueError(msg)
        self.text_tower = _text_tower(name, self.clip)
        self.tokenizer = open_clip.get_tokenizer(name)
        mean, std = backbone_normalization(name)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.pixel_mean: torch.Tensor
        self.pixel_std: torch.Tensor

    def train(self, mode: bool = True) -> ClipBackbone:
        """Keep the frozen CLIP model in eval mode whatever the mode of the parent module."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------------------------------- properties
    @property
    def image_size(self) -> tuple[int, int]:
        """Input size (H, W) the positional embeddings were made for."""
        size = self.clip.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (h, w)."""
        return tuple(self.clip.visual.grid_size)

    @property
    def num_patches(self) -> int:
        """N = h * w patch tokens per image."""
        height, width = self.grid_size
        return height * width

    @property
    def embed_dim(self) -> int:
        """D, the joint image-text embedding size (640 for ``ViT-B-16-plus-240``)."""
        return int(self.clip.visual.output_dim)

    @property
    def visual_width(self) -> int:
        """W, the width of the vision transformer (896 for ``ViT-B-16-plus-240``)."""
        return int(self.clip.visual.transformer.width)

    @property
    def text_width(self) -> int:
        """Width of the text transformer's token embeddings."""
        return int(self.text_tower.token_embedding.embedding_dim)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned inverse temperature, a scalar tensor (100 for trained CLIP models, 1/0.07 for random ones).

        A tensor, not a float, so that exported graphs read it without a data-dependent ``.item()``.
        """
        return self.clip.logit_scale.detach().exp()

    def weights_fingerprint(self) -> str:
        """SHA-256 of the CLIP weights (names, shapes, dtypes, values): identifies them without storing them."""
        digest = hashlib.sha256()
        for name, tensor in self.clip.state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------------------------------------ image
    def encode_image(self, images: torch.Tensor) -> ClipVisualFeatures:
        """Encode images given in [0, 1] (normalised here with the statistics the CLIP weights expect).

        Args:
            images: ``(B, 3, H, W)`` with (H, W) = :attr:`image_size`.

        """
        expected = self.image_size
        if images.ndim != 4 or tuple(images.shape[-2:]) != expected:
            msg = (
                f"ClipBackbone '{self.name}' expects images of shape (B, 3, {expected[0]}, {expected[1]}), got "
                + str(tuple(images.shape))
            )
            raise ValueError(msg)
        visual = self.clip.visual
        x = (images - self.pixel_mean) / self.pixel_std
        x = visual.conv1(x.to(visual.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        cls_token = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))

        surgery_start = self.num_blocks - self.surgery_depth if self.token_source == "surgery" else self.num_blocks
        surgery: torch.Tensor | None = None
        gallery: dict[int, torch.Tensor] = {}
        for index, block in enumerate(visual.transformer.resblocks):
            if index >= surgery_start:
                surgery = x if surgery is None else surgery
                surgery = surgery + block.ls_1(_value_value_attention(block, x))
            x = _run_block(visual.transformer, block, x)
            if index in self.gallery_layers:
                gallery[index] = x[:, 1:]
        final = visual.ln_post(x)
        image_embedding = _project(final[:, 0], visual.proj)
        tokens = visual.ln_post(surgery[:, 1:]) if surgery is not None else final[:, 1:]
        gallery_tokens = torch.stack([gallery[layer] for layer in self.gallery_layers], dim=1)
        return ClipVisualFeatures(image_embedding, _project(tokens, visual.proj), gallery_tokens)

    # ------------------------------------------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``(P, context_length)`` of the texts (start token, BPE tokens, end token, zero padding)."""
        tokens = self.tokenizer(list(texts))
        context_length = tokens.shape[1]
        encode = getattr(self.tokenizer, "encode", None)  # open_clip's BPE tokenizer; truncation would be silent
        too_long = [text for text in texts if encode is not None and len(encode(text)) + 2 > context_length]
        if too_long:
            msg = f"Prompts longer than the text context of '{self.name}': {too_long[:3]}."
            raise ValueError(msg)
        return tokens

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(P, L, text_width)`` of token ids ``(P, L)``."""
        return self.text_tower.token_embedding(tokens.to(self.text_tower.token_embedding.weight.device))

    def encode_token_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text features ``(P, D)`` from token embeddings ``(P, L, text_width)`` (some may be learned vectors).

        ``tokens`` are the ids the embeddings stand for; only the position of each row's end-of-text token is read
        from them (open_clip's ``argmax`` pooling). Gradients flow to ``embeddings``.
        """
        tower = self.text_tower
        end = tokens.argmax(dim=-1)
        length = int(end.max()) + 1  # causal attention: positions after the last end token change nothing
        x = embeddings[:, :length] + tower.positional_embedding[:length].to(embeddings.dtype)
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        x = _run_transformer(tower.transformer, x, mask)
        x = tower.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), end]
        projection = tower.text_projection
        if isinstance(projection, nn.Linear):
            return projection(pooled)
        return pooled if projection is None else pooled @ projection

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text features ``(P, D)`` of plain texts (equal to open_clip's ``encode_text``)."""
        tokens = self.tokenize(texts).to(self.pixel_mean.device)
        return self.encode_token_embeddings(self.token_embedding(tokens), tokens)


# --------------------------------------------------------------------------------------------------- helpers
def _check_vision_tower(name: str, visual: nn.Module) -> None:
    """Refuse vision towers whose tokens this module cannot read (timm towers, ResNets, attention pooling)."""
    problems = []
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        problems.append(f"its vision tower is a {type(visual).__name__}, not an open_clip VisionTransformer")
    elif getattr(visual, "attn_pool", None) is not None:
        problems.append("it pools with attention instead of a class token")
    elif any(not isinstance(block.attn, nn.MultiheadAttention) for block in visual.transformer.resblocks):
        problems.append("its blocks do not use nn.MultiheadAttention")
    if problems:
        msg = (
            f"open_clip model '{name}' is not supported: {'; '.join(problems)}. "
            "Use a ViT CLIP (e.g. ViT-B-16-plus-240)."
        )
        raise ValueError(msg)


def _text_tower(name: str, clip: nn.Module) -> nn.Module:
    """Return the module holding the text transformer (``CLIP`` itself, or ``CustomTextCLIP.text``), checked."""
    tower = getattr(clip, "text", clip)
    required = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    pool_type = getattr(tower, "pool_type", getattr(clip, "text_pool_type", "argmax"))
    if any(not hasattr(tower, attribute) for attribute in required) or getattr(tower, "cls_emb", None) is not None:
        msg = f"open_clip model '{name}' has a text tower without open_clip's TextTransformer layout (unsupported)."
        raise ValueError(msg)
    if pool_type != "argmax":
        msg = f"open_clip model '{name}' pools text with {pool_type!r}; prompt learning here needs 'argmax' pooling."
        raise ValueError(msg)
    return tower


def _batch_first(transformer: nn.Module) -> bool:
    """Whether an open_clip transformer takes (N, L, C) tensors (newer open_clip) or (L, N, C) ones (2.24)."""
    return bool(getattr(transformer, "batch_first", False))


def _run_block(transformer: nn.Module, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One residual attention block on (N, L, C) tokens, whatever layout the installed open_clip uses."""
    if _batch_first(transformer):
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def _run_transformer(transformer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Run a whole open_clip transformer on (N, L, C) tokens with an optional attention mask."""
    if _batch_first(transformer):
        return transformer(x, attn_mask=mask)
    return transformer(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)


def _value_value_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Value-value self-attention of a block on its normalised input, through the block's output projection.

    ``attention = softmax(V V^T / sqrt(d)) V`` per head, with V = the block's value projection of ``ln_1(x)``; the
    query-key attention of the block is not used. Input and output ``(N, L, C)``.
    """
    attention: nn.MultiheadAttention = block.attn
    batch, length, width = x.shape
    heads = attention.num_heads
    head_dim = width // heads
    normed = block.ln_1(x)
    weight = attention.in_proj_weight[2 * width :]
    bias = attention.in_proj_bias[2 * width :] if attention.in_proj_bias is not None else None
    values = F.linear(normed, weight, bias).view(batch, length, heads, head_dim).transpose(1, 2)  # (N, h, L, d)
    affinity = torch.softmax(values @ values.transpose(-2, -1) * head_dim**-0.5, dim=-1)
    mixed = (affinity @ values).transpose(1, 2).reshape(batch, length, width)
    return attention.out_proj(mixed)


def _project(tokens: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """Apply the visual projection (a parameter matrix in open_clip) when the model has one."""
    return tokens if projection is None else tokens @ projection
