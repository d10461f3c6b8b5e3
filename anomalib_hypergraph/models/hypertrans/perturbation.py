"""Domain perturbation (DP) of HyperTrans, Eq. 3-7: Perlin-AdaIN feature-statistics noise and residual adapters.

During stage 1 the frozen backbone sees its own intermediate features re-styled by random, spatially coherent
channel factors (Perlin noise), which imitates a change of imaging domain; small adapters placed after the perturbed
stages learn to map the perturbed features back to the clean ones (Eq. 7). At inference the adapters run without
perturbation, so features of an unseen domain are pulled towards the domain-invariant representation they learnt.

Feature layouts: CNN stage outputs are maps ``(B, C, H, W)``; ViT block outputs are tokens ``(B, T, C)`` whose first
``num_prefix_tokens`` tokens (CLS, registers) are not patches. Channel statistics are taken over the spatial positions
only, so prefix tokens are left out of them and pass through the perturbation unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.utils.generators.perlin import generate_perlin_noise
from torch import nn

BackboneKind = Literal["vit", "cnn"]

# Smallest Perlin field side, so that even a handful of channels is read from a field with several noise lattice cells.
_MIN_FIELD_SIDE = 8
# Pixels per Perlin lattice cell are at least this many when the noise scale is drawn at random (smooth along channels).
_MIN_PIXELS_PER_CELL = 4


def _split_prefix(features: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Separate ViT prefix tokens ``(B, P, C)`` from the patch tokens; CNN maps have no prefix (returns ``None``)."""
    if features.ndim == 4:
        if num_prefix_tokens:
            msg = f"num_prefix_tokens must be 0 for CNN feature maps (B, C, H, W), got {num_prefix_tokens}."
            raise ValueError(msg)
        return features, None
    if features.ndim == 3:
        if not 0 <= num_prefix_tokens < features.shape[1]:
            msg = (
                f"num_prefix_tokens must be in [0, {features.shape[1]}) for ViT tokens of shape "
                f"{tuple(features.shape)}, got {num_prefix_tokens}."
            )
            raise ValueError(msg)
        return features[:, num_prefix_tokens:], features[:, :num_prefix_tokens]
    msg = (
        "features must be CNN maps (B, C, H, W) or ViT tokens (B, T, C), "
        f"got a tensor with {features.ndim} dimensions {tuple(features.shape)}."
    )
    raise ValueError(msg)


def _join_prefix(patches: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`_split_prefix`: put the untouched prefix tokens back in front of the patch tokens."""
    return patches if prefix is None else torch.cat([prefix, patches], dim=1)


def _spatial_dims(features: torch.Tensor) -> tuple[int, ...]:
    """Axes holding spatial positions: (H, W) of a CNN map, the token axis of ViT tokens."""
    return (2, 3) if features.ndim == 4 else (1,)


def _broadcast_factors(factors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample factors ``(B, C)`` to broadcast against maps ``(B, C, H, W)`` or tokens ``(B, T, C)``."""
    if factors.ndim != 2:
        msg = f"Channel factors must have shape (B, C), got {tuple(factors.shape)}."
        raise ValueError(msg)
    batch_size, channels = factors.shape
    if features.ndim == 4:
        expected = (features.shape[0], features.shape[1])
        shaped = factors.reshape(batch_size, channels, 1, 1)
    else:
        expected = (features.shape[0], features.shape[2])
        shaped = factors.reshape(batch_size, 1, channels)
    if (batch_size, channels) != expected:
        msg = f"Channel factors of shape {tuple(factors.shape)} do not match features {tuple(features.shape)}."
        raise ValueError(msg)
    return shaped.to(dtype=features.dtype)


def channel_statistics(
    features: torch.Tensor, num_prefix_tokens: int = 0, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean avg(F) and standard deviation std(F) over the spatial positions (Eq. 3).

    Args:
        features: CNN maps ``(B, C, H, W)`` (statistics over H, W) or ViT tokens ``(B, T, C)`` (statistics over the
            tokens after the first ``num_prefix_tokens``, i.e. CLS/register tokens are excluded).
        num_prefix_tokens: leading non-patch tokens of ViT inputs (must be 0 for CNN maps).
        eps: added to the variance before the square root so that constant channels do not divide by zero.

    Returns:
        ``(avg, std)``, each shaped ``(B, C, 1, 1)`` for maps or ``(B, 1, C)`` for tokens, to broadcast against
        the input.

    """
    patches, _ = _split_prefix(features, num_prefix_tokens)
    dims = _spatial_dims(patches)
    avg = patches.mean(dim=dims, keepdim=True)  # Eq. 3: avg(F), per channel over positions
    std = (patches.var(dim=dims, keepdim=True, correction=0) + eps).sqrt()  # Eq. 3: std(F)
    return avg, std


def _serpentine(field: torch.Tensor) -> torch.Tensor:
    """Flatten a 2-D field row by row, reversing every other row, so consecutive values are always neighbours."""
    snake = field.clone()
    snake[1::2] = snake[1::2].flip(-1)
    return snake.reshape(-1)


def perlin_channel_factors(
    batch_size: int,
    channels: int,
    *,
    mean: float = 0.0,
    std: float = 0.75,
    scale: int | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw DP channel factors (P_avg or P_std of Eq. 4) from Perlin noise, fresh on every call.

    For every sample a square Perlin field (anomalib's ``generate_perlin_noise``) of side
    ``max(8, next_pow2(ceil(sqrt(C))))`` is drawn and its first ``C`` values are read along a serpentine path (row by
    row, every other row reversed), so neighbouring channels get neighbouring, correlated noise values. The ``C`` values
    are then standardised per sample and rescaled to the requested ``mean`` and ``std`` (one channel: all ``mean``).

    Args:
        batch_size: number of samples B.
        channels: number of channels C.
        mean: mean of the factors of each sample (paper: 0).
        std: standard deviation of the factors of each sample (paper: 0.75).
        scale: Perlin lattice cells per field side (a power of two smaller than the field side); ``None`` draws it per
            sample among the powers of two that leave at least 4 field pixels per cell (our choice: smooth noise at
            random granularity, as anomalib draws its scales).
        seed: make the draw reproducible without touching the global random state; ``None`` uses the global generator.
        device: device of the returned factors (default: CPU).

    Returns:
        Factors of shape ``(B, C)``.

    """
    if batch_size < 1 or channels < 1:
        msg = f"batch_size and channels must be positive, got batch_size={batch_size}, channels={channels}."
        raise ValueError(msg)
    if std < 0:
        msg = f"std of the Perlin channel factors must be non-negative, got {std}."
        raise ValueError(msg)
    device = torch.device("cpu") if device is None else torch.device(device)
    side = max(_MIN_FIELD_SIDE, 2 ** math.ceil(math.log2(math.ceil(math.sqrt(channels)))))
    if scale is not None and (scale < 1 or scale >= side or scale & (scale - 1)):
        msg = f"scale must be a power of two in [1, {side}) for {channels} channels, got {scale}."
        raise ValueError(msg)
    max_exponent = int(math.log2(side // _MIN_PIXELS_PER_CELL))

    def draw() -> torch.Tensor:
        rows = []
        for _ in range(batch_size):
            cells = scale if scale is not None else 2 ** int(torch.randint(0, max_exponent + 1, (1,)).item())
            field = generate_perlin_noise(side, side, scale=(cells, cells), device=device)
            rows.append(_serpentine(field)[:channels])
        return torch.stack(rows)

    if seed is None:
        values = draw()
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            values = draw()
    centred = values - values.mean(dim=1, keepdim=True)
    spread = centred.std(dim=1, keepdim=True, correction=0).clamp_min(torch.finfo(values.dtype).eps)
    return centred / spread * std + mean


def adain_perturb(
    features: torch.Tensor, p_avg: torch.Tensor, p_std: torch.Tensor, num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Perturb feature statistics with AdaIN (Eq. 4-5); prefix (CLS) tokens pass through unchanged.

    Args:
        features: CNN maps ``(B, C, H, W)`` or ViT tokens ``(B, T, C)``.
        p_avg: factors P_avg ``(B, C)``.
        p_std: factors P_std ``(B, C)``.
        num_prefix_tokens: leading non-patch tokens of ViT inputs.

    Returns:
        w(F), same shape as ``features``.

    """
    patches, prefix = _split_prefix(features, num_prefix_tokens)
    avg, std = channel_statistics(patches)
    p_avg = _broadcast_factors(p_avg, patches)
    p_std = _broadcast_factors(p_std, patches)
    avg_p = avg + p_avg * avg  # Eq. 4
    std_p = std + p_std * std  # Eq. 4
    perturbed = std_p * (patches - avg) / std + avg_p  # Eq. 5
    return _join_prefix(perturbed, prefix)


def simplified_perturb(
    features: torch.Tensor, p_avg: torch.Tensor, p_std: torch.Tensor, num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Perturb with the closed form of Eq. 4-5 (Eq. 6): no division by std; prefix tokens pass through unchanged.

    Same arguments and result as :func:`adain_perturb` (up to rounding).
    """
    patches, prefix = _split_prefix(features, num_prefix_tokens)
    avg = patches.mean(dim=_spatial_dims(patches), keepdim=True)
    p_avg = _broadcast_factors(p_avg, patches)
    p_std = _broadcast_factors(p_std, patches)
    perturbed = (1 + p_std) * patches + (p_avg - p_std) * avg  # Eq. 6
    return _join_prefix(perturbed, prefix)


class ResidualAdapter(nn.Module):
    """Learnable adapter after a perturbed backbone stage: ``x + up(GELU(down(x)))``, exactly the identity at start.

    The paper only says "learnable adapter"; ours is a residual bottleneck (channels -> channels // reduction ->
    channels) whose ``up`` projection is zero-initialised, so the frozen backbone's features are unchanged until
    stage-1 training moves it. ViT tokens ``(B, T, C)`` use Linear layers on the channel axis (applied to every token,
    prefix tokens included, since later blocks attend to them); CNN maps ``(B, C, H, W)`` use 1x1 convolutions.

    Args:
        channels: channels C of the stage output.
        kind: ``"vit"`` for tokens, ``"cnn"`` for maps.
        reduction: bottleneck reduction factor (hidden width ``max(1, C // reduction)``).

    """

    def __init__(self, channels: int, kind: BackboneKind, reduction: int = 4) -> None:
        super().__init__()
        if kind not in ("vit", "cnn"):
            msg = f"ResidualAdapter kind must be 'vit' or 'cnn', got {kind!r}."
            raise ValueError(msg)
        if channels < 1 or reduction < 1:
            msg = f"ResidualAdapter needs channels >= 1 and reduction >= 1, got {channels=}, {reduction=}."
            raise ValueError(msg)
        self.kind = kind
        self.channels = channels
        hidden = max(1, channels // reduction)
        if kind == "vit":
            self.down: nn.Module = nn.Linear(channels, hidden)
            self.up: nn.Linear | nn.Conv2d = nn.Linear(hidden, channels)
        else:
            self.down = nn.Conv2d(channels, hidden, kernel_size=1)
            self.up = nn.Conv2d(hidden, channels, kernel_size=1)
        self.activation = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Adapt tokens ``(B, T, C)`` (kind ``"vit"``) or maps ``(B, C, H, W)`` (kind ``"cnn"``); shape is kept."""
        channel_axis = -1 if self.kind == "vit" else 1
        expected_ndim = 3 if self.kind == "vit" else 4
        if features.ndim != expected_ndim or features.shape[channel_axis] != self.channels:
            layout = "(B, T, C)" if self.kind == "vit" else "(B, C, H, W)"
            msg = (
                f"ResidualAdapter({self.kind!r}) expects {layout} with C={self.channels}, "
                f"got shape {tuple(features.shape)}."
            )
            raise ValueError(msg)
        return features + self.up(self.activation(self.down(features)))


class DomainPerturbation(nn.Module):
    """Perlin-AdaIN perturbation and residual adapters after chosen backbone stages (DP, Eq. 3-7).

    The backbone calls the hook from :meth:`stage_hook` after each stage ``i`` with that stage's output; at perturbed
    stages the hook perturbs the statistics with fresh Perlin factors (if ``perturb``) and then applies the stage's
    adapter (if ``adapt``). Modes: clean reference ``(perturb=False, adapt=False)``, stage-1 training ``(True, True)``,
    inference and bank building ``(False, True)``.

    Args:
        stage_channels: channels of every backbone stage output, indexed by stage.
        perturbed_stages: 0-based indices of the stages followed by perturbation and an adapter.
        kind: ``"vit"`` (stage outputs are tokens ``(B, T, C)``) or ``"cnn"`` (maps ``(B, C, H, W)``).
        num_prefix_tokens: leading non-patch ViT tokens, excluded from the statistics and not perturbed.
        noise_mean: mean of the Perlin factors P_avg, P_std (paper: 0).
        noise_std: standard deviation of the Perlin factors (paper: 0.75).
        adapter_reduction: bottleneck reduction of each :class:`ResidualAdapter`.
        use_simplified: perturb with the closed form Eq. 6 (default, cheaper) instead of AdaIN Eq. 4-5 (same result).
        seed: seed of the adapters' initialisation and of the sequence of Perlin draws. Both come from private
            generators, so stage 1 is reproducible whatever the caller does with the global random state.

    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        perturbed_stages: Sequence[int],
        kind: BackboneKind,
        *,
        num_prefix_tokens: int = 0,
        noise_mean: float = 0.0,
        noise_std: float = 0.75,
        adapter_reduction: int = 4,
        use_simplified: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        stage_channels = list(stage_channels)
        stages = list(perturbed_stages)
        if not stages:
            msg = "perturbed_stages must name at least one backbone stage."
            raise ValueError(msg)
        if len(set(stages)) != len(stages) or any(not 0 <= stage < len(stage_channels) for stage in stages):
            msg = (
                f"perturbed_stages must be distinct stage indices in [0, {len(stage_channels)}) "
                f"(the backbone has {len(stage_channels)} stages), got {stages}."
            )
            raise ValueError(msg)
        if kind == "cnn" and num_prefix_tokens:
            msg = f"num_prefix_tokens must be 0 for CNN backbones, got {num_prefix_tokens}."
            raise ValueError(msg)
        self.kind = kind
        self.perturbed_stages = tuple(sorted(stages))
        self.num_prefix_tokens = num_prefix_tokens
        self.noise_mean = noise_mean
        self.noise_std = noise_std
        self.use_simplified = use_simplified
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adapters = nn.ModuleDict(
                {
                    str(stage): ResidualAdapter(stage_channels[stage], kind, reduction=adapter_reduction)
                    for stage in self.perturbed_stages
                }
            )
        self._noise_generator = torch.Generator().manual_seed(seed)

    def perturb(self, features: torch.Tensor) -> torch.Tensor:
        """Re-style one stage output with fresh Perlin channel factors (Eq. 4-6)."""
        batch_size = features.shape[0]
        channels = features.shape[-1] if self.kind == "vit" else features.shape[1]
        with torch.no_grad():
            p_avg, p_std = (
                perlin_channel_factors(
                    batch_size,
                    channels,
                    mean=self.noise_mean,
                    std=self.noise_std,
                    seed=int(torch.randint(2**62, (), generator=self._noise_generator)),
                    device=features.device,
                )
                for _ in range(2)
            )
        perturb_fn = simplified_perturb if self.use_simplified else adain_perturb
        return perturb_fn(features, p_avg, p_std, self.num_prefix_tokens)

    def stage_hook(self, perturb: bool, adapt: bool) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Build the hook ``(stage_index, stage_output) -> stage_output`` for the backbone's ``stage_hook`` argument."""

        def hook(stage: int, features: torch.Tensor) -> torch.Tensor:
            key = str(stage)
            if key not in self.adapters:
                return features
            if perturb:
                features = self.perturb(features)
            if adapt:
                features = self.adapters[key](features)
            return features

        return hook


def perturbation_loss(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Stage-1 objective (Eq. 7): MSE of perturbed-adapted features to the clean ones (a fixed target, detached)."""
    if clean.shape != perturbed.shape:
        msg = (
            f"perturbation_loss needs equal shapes, got clean {tuple(clean.shape)} "
            f"and perturbed {tuple(perturbed.shape)}."
        )
        raise ValueError(msg)
    return F.mse_loss(perturbed, clean.detach())  # Eq. 7
