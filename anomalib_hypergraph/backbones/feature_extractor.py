"""Frozen backbone seen as a sequence of stages, giving patch features and a hook between stages.

HyperTrans perturbs and adapts the features *inside* a frozen backbone (after chosen transformer blocks or CNN
stages) and then matches patch features. :class:`PatchFeatureExtractor` therefore runs the backbone stage by stage,
hands the intermediate tensor of every stage to an optional ``stage_hook`` (which may contain trainable adapters:
gradients flow through it, while the backbone's own parameters stay frozen), and returns a patch-feature map.

Two backbone kinds are supported, both from timm:

* ``"vit"``: timm ``VisionTransformer`` (e.g. DINO ``vit_base_patch8_224.dino``). Stages are the transformer blocks
  (timm's ``feature_info``); the hook sees tokens ``(B, T, C)`` including the ``num_prefix_tokens`` class/register
  tokens. Output: timm's ``forward_intermediates`` of the chosen blocks (tokens after the final norm, prefix tokens
  removed, on the patch grid: 28x28x768 for ViT-B/8 at 224 px), with the hook installed after every block as a
  PyTorch forward hook, so only timm's public API is used. No pooling is applied (the paper uses raw tokens),
  ``pool_size`` only affects CNNs.
* ``"cnn"``: EfficientNet/MobileNet-style (``conv_stem`` + ``bn1`` stem, stages ``blocks.0``...) and ResNet-style
  (``conv1``/``bn1``/``act1``/``maxpool`` stem, stages ``layer1``...). The hook sees feature maps ``(B, C, H, W)``.
  Output: each chosen stage's map averaged over a ``pool_size`` x ``pool_size`` neighbourhood (stride 1, same size),
  upsampled bilinearly to the first chosen stage's resolution and concatenated along channels: PatchCore's locally
  aware patch features, computed exactly as anomalib's PatchCore does (zero-padded average, bilinear resize).

Images must already be normalised with :attr:`PatchFeatureExtractor.mean` / ``std`` (the pre-processor's job).
Another kind (e.g. an open_clip visual tower) fits the same pattern: an embedding step, a list of stages, and a
readout of the chosen stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - conventional alias
from timm.models import is_model, model_entrypoint
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from anomalib_hypergraph.backbones.factory import backbone_normalization, create_timm_backbone

StageHook = Callable[[int, Tensor], Tensor]

# Default stages per CNN family: mid-level stages at strides 8 and 16, as PatchCore uses.
_EFFICIENTNET_DEFAULT_LAYERS = ("blocks.2", "blocks.4")
_RESNET_DEFAULT_LAYERS = ("layer2", "layer3")
# Side of the blank image used once at construction to read channel counts and strides of CNN stages.
_PROBE_IMAGE_SIZE = 64


class PatchFeatureExtractor(nn.Module):
    """Frozen timm backbone returning patch features of chosen stages, with an optional hook after every stage.

    Args:
        backbone: timm model name (with optional pretrained tag).
        layers: Stage names whose outputs form the features (see :attr:`stage_names`). ``None``: the last block
            for ViTs; ``("blocks.2", "blocks.4")`` for EfficientNet-style, ``("layer2", "layer3")`` for ResNet-style.
        pretrained: Load pretrained weights (see :func:`create_timm_backbone` for where they come from).
        pretrained_weights: Local weights file of the backbone; no download happens when given.
        pool_size: CNN only: side of the local averaging window (odd; 1 disables it).
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``img_size``, ``depth``, ``embed_dim``). ViTs from
            timm's ``vision_transformer`` module are built with ``dynamic_img_size=True`` unless given here, so
            inputs of any size divisible by the patch size work (position embeddings are interpolated).

    Attributes:
        kind: ``"vit"`` or ``"cnn"``.
        stage_names: Names of all stages, in execution order; the hook's index refers to this list.
        num_stages: ``len(stage_names)``.
        stage_channels: Channels of every stage's output (the tensors the hook sees), one entry per stage.
        layers: Chosen stage names, in execution order.
        feature_dim: Channels of the output.
        patch_size: Stride of the output grid in input pixels.
        num_prefix_tokens: ViT: class/register tokens before the patch tokens in the hook's tensors; CNN: 0.
        mean, std: Normalisation the backbone expects for its inputs.

    """

    def __init__(
        self,
        backbone: str = "vit_base_patch8_224.dino",
        layers: Sequence[str] | None = None,
        *,
        pretrained: bool = True,
        pretrained_weights: str | Path | None = None,
        pool_size: int = 3,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1 or pool_size % 2 == 0:
            msg = f"pool_size must be a positive odd integer (1 disables pooling), got {pool_size!r}."
            raise ValueError(msg)
        if isinstance(layers, str):
            msg = f"layers must be a sequence of stage names, got the single string {layers!r}; use ({layers!r},)."
            raise TypeError(msg)
        timm_kwargs = dict(model_kwargs or {})
        if is_model(backbone) and model_entrypoint(backbone).__module__ == VisionTransformer.__module__:
            timm_kwargs.setdefault("dynamic_img_size", True)
        self.backbone_name = backbone
        self.backbone = create_timm_backbone(
            backbone, pretrained=pretrained, pretrained_weights=pretrained_weights, **timm_kwargs
        )
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.pool_size = pool_size
        self.mean, self.std = backbone_normalization(backbone)
        self.kind: Literal["vit", "cnn"]
        if isinstance(self.backbone, VisionTransformer):
            self.kind = "vit"
            self._setup_vit(layers)
        else:
            self.kind = "cnn"
            self._setup_cnn(layers)
        self.num_stages = len(self.stage_names)

    # ------------------------------------------------------------------ setup

    def _setup_vit(self, layers: Sequence[str] | None) -> None:
        """Stages = transformer blocks, as timm's ``feature_info`` lists them; features = chosen blocks, normed."""
        vit = self.backbone
        self.stage_names = [info["module"] for info in vit.feature_info]
        self._stages: list[nn.Module] = [vit.get_submodule(name) for name in self.stage_names]
        self.layers = self._resolve_layers(layers, default=(self.stage_names[-1],))
        self._layer_indices = [self.stage_names.index(name) for name in self.layers]
        patch_height, patch_width = vit.patch_embed.patch_size
        if patch_height != patch_width:
            msg = f"Backbone {self.backbone_name} has non-square patches {vit.patch_embed.patch_size}; not supported."
            raise ValueError(msg)
        self.patch_size = vit.feature_info[-1]["reduction"]
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.stage_channels = [info["num_chs"] for info in vit.feature_info]
        self.feature_dim = sum(self.stage_channels[index] for index in self._layer_indices)

    def _setup_cnn(self, layers: Sequence[str] | None) -> None:
        """Find stem and stages of an EfficientNet- or ResNet-style CNN; probe channels and strides on a blank image."""
        cnn = self.backbone
        if hasattr(cnn, "conv_stem") and hasattr(cnn, "blocks"):
            self._stem: list[nn.Module] = [cnn.conv_stem, cnn.bn1]
            self._stages = list(cnn.blocks)
            self.stage_names = [f"blocks.{index}" for index in range(len(self._stages))]
            default_layers = _EFFICIENTNET_DEFAULT_LAYERS
        elif hasattr(cnn, "conv1") and hasattr(cnn, "layer1"):
            self._stem = [cnn.conv1, cnn.bn1, cnn.act1, cnn.maxpool]
            self.stage_names = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(cnn, name)]
            self._stages = [getattr(cnn, name) for name in self.stage_names]
            default_layers = _RESNET_DEFAULT_LAYERS
        else:
            msg = (
                f"Backbone {self.backbone_name} ({type(cnn).__name__}) is not supported: expected a timm "
                "VisionTransformer, an EfficientNet/MobileNet-style CNN (conv_stem + blocks) or a ResNet-style CNN "
                "(conv1 + layer1..layer4)."
            )
            raise ValueError(msg)
        self.num_prefix_tokens = 0
        self.layers = self._resolve_layers(layers, default=default_layers)
        probed_shapes = []
        with torch.no_grad():
            feature_map = torch.zeros(1, 3, _PROBE_IMAGE_SIZE, _PROBE_IMAGE_SIZE)
            for module in [*self._stem, *self._stages]:
                feature_map = module(feature_map)
                probed_shapes.append(feature_map.shape)
        stage_shapes = probed_shapes[len(self._stem) :]
        self.stage_channels = [shape[1] for shape in stage_shapes]
        chosen_shapes = [stage_shapes[self.stage_names.index(name)] for name in self.layers]
        self.feature_dim = sum(shape[1] for shape in chosen_shapes)
        self.patch_size = _PROBE_IMAGE_SIZE // chosen_shapes[0][-1]

    def _resolve_layers(self, layers: Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
        """Validate chosen stage names and put them in execution order."""
        chosen = tuple(default if layers is None else layers)
        unknown = [name for name in chosen if name not in self.stage_names]
        if unknown or not chosen:
            msg = (
                f"layers {list(chosen)} of backbone {self.backbone_name} must be a non-empty selection of its stages "
                f"{self.stage_names}; unknown: {unknown}."
            )
            raise ValueError(msg)
        if len(set(chosen)) != len(chosen):
            msg = f"layers {list(chosen)} of backbone {self.backbone_name} name a stage twice."
            raise ValueError(msg)
        return tuple(sorted(chosen, key=self.stage_names.index))

    # ------------------------------------------------------------------ train/eval

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        """Set train/eval mode of the wrapper, but keep the frozen backbone in eval mode (BatchNorm, dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ------------------------------------------------------------------ forward

    def forward(self, images: Tensor, stage_hook: StageHook | None = None) -> Tensor:
        """Patch features of ``images``; ``stage_hook(i, x)`` replaces the output ``x`` of stage ``i`` if given.

        Args:
            images: ``(B, 3, H, W)``, normalised with :attr:`mean`/:attr:`std`.
            stage_hook: Called after every executed stage ``i`` (index into :attr:`stage_names`) with the stage output
                (ViT: tokens ``(B, T, C)`` including prefix tokens; CNN: ``(B, C, h, w)``); must return a tensor of
                the same shape, which the next stage consumes. Not wrapped in ``no_grad``, so trainable modules
                inside the hook receive gradients.

        Returns:
            ``(B, feature_dim, H / patch_size, W / patch_size)`` patch features.

        """
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"images must have shape (B, 3, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        if self.kind == "vit":
            return self._forward_vit(images, stage_hook)
        return self._aggregate_cnn_maps(self._run_cnn_stages(images, stage_hook))

    def _forward_vit(self, images: Tensor, stage_hook: StageHook | None) -> Tensor:
        """Normed chosen blocks on the patch grid by timm's ``forward_intermediates``; the hook after every block."""
        vit = self.backbone
        height, width = images.shape[-2:]
        if vit.dynamic_img_size:
            if height % self.patch_size or width % self.patch_size:
                msg = (
                    f"Image size {height}x{width} is not divisible by the patch size {self.patch_size} of "
                    f"{self.backbone_name}."
                )
                raise ValueError(msg)
        elif (height, width) != tuple(vit.patch_embed.img_size):
            msg = (
                f"Backbone {self.backbone_name} was built for {tuple(vit.patch_embed.img_size)} images without "
                f"dynamic_img_size; got {height}x{width}. Resize the images or build it with dynamic_img_size=True."
            )
            raise ValueError(msg)
        with self._hooked_stages(stage_hook):
            chosen_maps = vit.forward_intermediates(
                images,
                indices=self._layer_indices,
                norm=True,
                stop_early=True,
                output_fmt="NCHW",
                intermediates_only=True,
            )
        return torch.cat(chosen_maps, dim=1)

    @contextmanager
    def _hooked_stages(self, stage_hook: StageHook | None) -> Iterator[None]:
        """Make ``stage_hook`` replace the output of every stage while the context is open (PyTorch forward hooks).

        A forward hook's return value replaces the module's output, so the next block consumes the hooked tensor and
        gradients flow through the hook, exactly as if the blocks were run one by one with the hook in between.
        """
        if stage_hook is None:
            yield
            return
        handles = [
            stage.register_forward_hook(partial(self._stage_hook_output, index, stage_hook))
            for index, stage in enumerate(self._stages)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _stage_hook_output(
        self, index: int, stage_hook: StageHook, _module: nn.Module, _inputs: tuple[Tensor, ...], outputs: Tensor
    ) -> Tensor:
        """Forward hook of stage ``index``: the checked output of ``stage_hook``."""
        return self._checked_hook(index, outputs, stage_hook)

    def _run_cnn_stages(self, images: Tensor, stage_hook: StageHook | None) -> list[Tensor]:
        """Stem and stages up to the last chosen one; return the chosen stages' maps."""
        feature_map = images
        for module in self._stem:
            feature_map = module(feature_map)
        chosen = {self.stage_names.index(name) for name in self.layers}
        chosen_maps = []
        for index in range(max(chosen) + 1):
            feature_map = self._apply_stage(index, feature_map, stage_hook)
            if index in chosen:
                chosen_maps.append(feature_map)
        return chosen_maps

    def _apply_stage(self, index: int, inputs: Tensor, stage_hook: StageHook | None) -> Tensor:
        """Run stage ``index``, then the hook."""
        outputs = self._stages[index](inputs)
        return outputs if stage_hook is None else self._checked_hook(index, outputs, stage_hook)

    def _checked_hook(self, index: int, outputs: Tensor, stage_hook: StageHook) -> Tensor:
        """``stage_hook(index, outputs)``, checked to keep the shape of the stage output."""
        hooked = stage_hook(index, outputs)
        if not isinstance(hooked, Tensor) or hooked.shape != outputs.shape:
            found = tuple(hooked.shape) if isinstance(hooked, Tensor) else type(hooked).__name__
            msg = (
                f"stage_hook must return a tensor shaped like the output of stage {self.stage_names[index]} "
                f"{tuple(outputs.shape)}, got {found}."
            )
            raise ValueError(msg)
        return hooked

    def _aggregate_cnn_maps(self, chosen_maps: list[Tensor]) -> Tensor:
        """Local average of each map, bilinear resize to the first (finest) map, channel concatenation."""
        target_size = chosen_maps[0].shape[-2:]
        aligned = []
        for feature_map in chosen_maps:
            smoothed = feature_map
            if self.pool_size > 1:
                # Zero padding counted at the borders, exactly PatchCore's AvgPool2d(3, 1, 1): the features an anomalib
                # user's PatchCore matches, so comparisons isolate the matching and not the descriptor.
                smoothed = F.avg_pool2d(smoothed, self.pool_size, stride=1, padding=self.pool_size // 2)
            if smoothed.shape[-2:] != target_size:
                smoothed = F.interpolate(smoothed, size=target_size, mode="bilinear", align_corners=False)
            aligned.append(smoothed)
        return torch.cat(aligned, dim=1)
