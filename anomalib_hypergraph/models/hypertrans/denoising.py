"""Target-sensor denoising chosen from the shots (ours, not in the paper).

A new sensor's read noise reaches every patch feature: the nearest-neighbour distance of a normal test patch to the
shots then measures noise against noise as much as the part, and a faint defect drowns in it. When the sensor's
images carry less detail than their pixel grid (a coarser or blurred sensor), a low-pass filter removes the noise and
keeps the part. How much to filter is decided from the target shots alone, at fit time:

- the noise level ``s`` per channel: the median absolute finest-scale diagonal Haar coefficient divided by 0.6745
  (Donoho and Johnstone's estimator: on white noise of std ``s`` those coefficients have std ``s``, and a part's edges
  touch too few of them to move the median);
- the blur: the Gaussian ``sigma`` among ``candidates`` (0 = none) with the lowest Stein unbiased risk estimate of the
  denoised image's mean squared error, ``SURE(sigma) = mean((B y - y)^2) + 2 s^2 b_0 - s^2``, ``b_0`` the kernel's
  centre weight (the trace of the linear filter per pixel). SURE needs no clean image: where the shots hold detail at
  the finest scale the first term grows fast and ``sigma`` stays small or 0; where that scale is noise it picks the
  blur that removes most of it.

The filter is applied to every target-domain image (shots, their views, test and predicted images) with reflected
borders; source images are left as they are (another sensor). The chosen kernel is a persistent buffer (empty: no
filter), so checkpoints and exported graphs filter as the model was fitted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn
from torch.nn import functional

from anomalib_hypergraph.hypergraph.distributed import gather_rows
from anomalib_hypergraph.models.state import DefaultedState

# No filter, or a Gaussian of 0.5 to 3 pixels in quarter steps (below 0.5 the kernel's side taps are under 2 %: no
# filter in all but name).
DEFAULT_BLUR_CANDIDATES: tuple[float, ...] = (0.0, *(0.25 * step for step in range(2, 13)))
MAD_TO_STD = 0.6745  # median |N(0, 1)|: the median absolute deviation of white noise is 0.6745 std


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian weights of std ``sigma`` pixels over +-ceil(3 sigma) taps (``sigma > 0``)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    return (weights / weights.sum()).float()


def separable_blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter ``(B, C, H, W)`` images by ``kernel`` along both axes, borders reflected (an exportable pair of convs)."""
    channels, radius = images.shape[1], kernel.numel() // 2
    weights = kernel.to(images)
    padded = functional.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = functional.conv2d(padded, weights.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return functional.conv2d(rows, weights.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def diagonal_haar(images: torch.Tensor) -> torch.Tensor:
    """Finest-scale diagonal Haar coefficients ``(B, C, H/2, W/2)``: ``(a - b - c + d) / 2`` of every 2x2 block.

    Orthonormal, so white noise of std ``s`` gives coefficients of std ``s``; row- or column-constant patterns (a
    sensor's fixed-pattern row noise, which every image of the sensor shares) cancel.
    """
    height, width = images.shape[-2] // 2 * 2, images.shape[-1] // 2 * 2
    x = images[..., :height, :width]
    return (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2


@dataclass
class NoiseStatistics:
    """What the choice of blur needs from a set of images, in a form that sums over batches and ranks.

    ``haar``: absolute diagonal Haar coefficients, one row per coefficient and a column per channel; ``residual``:
    per candidate (rows) and channel (columns), the sum over pixels of ``(B_sigma y - y)^2``; ``pixels``: pixels per
    channel summed.
    """

    haar: torch.Tensor
    residual: torch.Tensor
    pixels: int

    @classmethod
    def of(cls, images: torch.Tensor, candidates: Sequence[float]) -> NoiseStatistics:
        """Statistics of one batch ``(B, C, H, W)``."""
        with torch.no_grad():
            haar = diagonal_haar(images).abs().permute(0, 2, 3, 1).reshape(-1, images.shape[1])
            residual = torch.stack(
                [
                    (separable_blur(images, gaussian_kernel(sigma)) - images).square().sum(dim=(0, 2, 3))
                    if sigma > 0
                    else images.new_zeros(images.shape[1])
                    for sigma in candidates
                ]
            )
        pixels = images.shape[0] * images.shape[-2] * images.shape[-1]
        return cls(haar=haar.float(), residual=residual.double(), pixels=pixels)

    @classmethod
    def combined(cls, parts: Iterable[NoiseStatistics]) -> NoiseStatistics:
        """Combine the statistics of all parts of this rank with every other rank's (a collective under DDP)."""
        parts = list(parts)
        if not parts:
            msg = "NoiseStatistics.combined needs the statistics of at least one batch of target images."
            raise ValueError(msg)
        haar = gather_rows(torch.cat([part.haar for part in parts]))
        residual = gather_rows(torch.stack([part.residual for part in parts]).sum(dim=0, keepdim=True)).sum(dim=0)
        pixels = gather_rows(torch.tensor([[sum(part.pixels for part in parts)]], dtype=torch.float64)).sum()
        return cls(haar=haar, residual=residual, pixels=int(pixels))


@dataclass(frozen=True)
class DenoisingReport:
    """How the target blur was chosen: noise std per channel, SURE risk per candidate (mean over channels), sigma."""

    noise: tuple[float, ...]
    candidates: tuple[float, ...]
    risks: tuple[float, ...]
    sigma: float

    def __str__(self) -> str:
        noise = ", ".join(f"{value:.4f}" for value in self.noise)
        reduction = 1 - self.risks[self.candidates.index(self.sigma)] / max(self.risks[0], 1e-20)
        return (
            f"target noise std ({noise}) in normalised units; blur sigma {self.sigma:g} px "
            f"(SURE: {100 * reduction:.0f} % of the noise energy removed)"
        )


def choose_blur(statistics: NoiseStatistics, candidates: Sequence[float]) -> DenoisingReport:
    """Pick the candidate blur with the lowest SURE risk (Stein's unbiased estimate of the mean squared error)."""
    if not candidates or candidates[0] != 0:
        msg = f"blur candidates must start with 0 (no filter), got {tuple(candidates)!r}."
        raise ValueError(msg)
    noise = statistics.haar.double().median(dim=0).values / MAD_TO_STD  # per channel
    variance = noise.square()
    risks = []
    for index, sigma in enumerate(candidates):
        centre = float(gaussian_kernel(sigma).max()) ** 2 if sigma > 0 else 1.0  # b_0: trace of the filter per pixel
        per_channel = statistics.residual[index] / statistics.pixels + 2 * variance * centre - variance
        risks.append(float(per_channel.mean()))
    best = min(range(len(candidates)), key=risks.__getitem__)
    return DenoisingReport(
        noise=tuple(float(value) for value in noise),
        candidates=tuple(float(value) for value in candidates),
        risks=tuple(risks),
        sigma=float(candidates[best]),
    )


class TargetDenoiser(DefaultedState, DynamicBufferMixin, nn.Module):
    """The fit-time low-pass filter of target-domain images: a persistent 1-D Gaussian kernel (empty: none).

    Args:
        sigma: ``"auto"`` (chosen from the shots by :func:`choose_blur`) or a fixed blur in pixels (0: none).
        candidates: the blurs ``"auto"`` chooses among, starting with 0.

    """

    defaulted_state = ("kernel", "sigma")  # checkpoints from before the filter: none

    def __init__(self, sigma: float | str = "auto", candidates: Sequence[float] = DEFAULT_BLUR_CANDIDATES) -> None:
        super().__init__()
        if sigma != "auto" and (isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma >= 0):
            msg = f"target_denoising must be 'auto' or a blur sigma >= 0 in pixels, got {sigma!r}."
            raise ValueError(msg)
        self.option = sigma
        self.candidates = tuple(float(value) for value in candidates)
        self.register_buffer("kernel", torch.empty(0))
        self.register_buffer("sigma", torch.zeros(()))
        self.kernel: torch.Tensor
        self.sigma: torch.Tensor

    def fit(self, statistics: NoiseStatistics | None) -> DenoisingReport | None:
        """Set the kernel: the SURE choice under ``"auto"`` (its report returned), else the fixed sigma."""
        report = None
        if self.option == "auto":
            if statistics is None:
                msg = "TargetDenoiser.fit: target_denoising='auto' needs the statistics of the target shots."
                raise ValueError(msg)
            report = choose_blur(statistics, self.candidates)
            sigma = report.sigma
        else:
            sigma = float(self.option)
        self.kernel = gaussian_kernel(sigma).to(self.kernel.device) if sigma > 0 else self.kernel.new_empty(0)
        self.sigma = torch.tensor(sigma, dtype=self.sigma.dtype, device=self.sigma.device)
        return report

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` filtered by the stored kernel (as they are without one)."""
        if self.kernel.numel() == 0:
            return images
        return separable_blur(images, self.kernel)
