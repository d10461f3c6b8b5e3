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
  blur that removes most of it;
- the filter is taken only when that blur removes at least ``min_gain`` (default half) of the noise energy: a smaller
  gain means the finest scale is mostly the part's own detail (edges, rendering, quantisation), which a blur would
  soften for little noise removed.

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
from torch import distributed, nn

from anomalib_hypergraph.hypergraph.distributed import gather_rows
from anomalib_hypergraph.models.smoothing import blur_separably
from anomalib_hypergraph.models.state import DefaultedState

# No filter, or a Gaussian of 0.5 to 3 pixels in quarter steps (below 0.5 the kernel's side taps are under 2 %: no
# filter in all but name).
DEFAULT_BLUR_CANDIDATES: tuple[float, ...] = (0.0, *(0.25 * step for step in range(2, 13)))
# Filter only when the best blur removes at least half of the noise energy (SURE). Smaller gains come from images whose
# finest scale is mostly detail (edges, texture, quantisation), where a blur softens what defects are seen by for
# little noise removed. Set after the gains were measured on our sets (README, results): see the model README.
DEFAULT_MIN_GAIN = 0.5
MAD_TO_STD = 0.6745  # median |N(0, 1)|: the median absolute deviation of white noise is 0.6745 std


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian weights of std ``sigma`` pixels over +-ceil(3 sigma) taps (``sigma > 0``)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    return (weights / weights.sum()).float()


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
    """What the choice of blur needs from a set of images, per image, so that repeats can be dropped.

    Target loaders repeat shots (a cycled loader, DDP padding), and a repeated shot must not weigh twice: every image
    carries its key, and :meth:`combined` keeps one copy per key.

    ``keys``: ``(n,)`` image keys; ``residual``: ``(n, candidates, C)``, per image the sum over pixels of
    ``(B_sigma y - y)^2``; ``pixels``: ``(n,)`` pixels per channel; ``haar``: ``(m, C)`` absolute diagonal Haar
    coefficients of all images, ``haar_image``: ``(m,)`` the image (row of ``keys``) each coefficient row belongs to.
    """

    keys: torch.Tensor
    residual: torch.Tensor
    pixels: torch.Tensor
    haar: torch.Tensor
    haar_image: torch.Tensor

    @classmethod
    def of(cls, images: torch.Tensor, candidates: Sequence[float], keys: torch.Tensor | None = None) -> NoiseStatistics:
        """Statistics of one batch ``(B, C, H, W)``; ``keys`` ``(B,)`` name its images (default: 0 .. B - 1)."""
        count, channels = images.shape[:2]
        keys = torch.arange(count) if keys is None else keys.detach().to("cpu", torch.long)
        with torch.no_grad():
            haar = diagonal_haar(images).abs().permute(0, 2, 3, 1).reshape(count, -1, channels)
            residual = torch.stack(
                [
                    (blur_separably(images, gaussian_kernel(sigma)) - images).square().sum(dim=(2, 3))
                    if sigma > 0
                    else images.new_zeros(count, channels)
                    for sigma in candidates
                ],
                dim=1,
            )
        return cls(
            keys=keys,
            residual=residual.double().cpu(),
            pixels=torch.full((count,), float(images.shape[-2] * images.shape[-1]), dtype=torch.float64),
            haar=haar.reshape(-1, channels).float().cpu(),
            haar_image=torch.arange(count).repeat_interleave(haar.shape[1]),
        )

    @classmethod
    def combined(cls, parts: Iterable[NoiseStatistics]) -> NoiseStatistics:
        """All parts of this rank and of every other rank (a collective under DDP), one copy of each image."""
        parts = list(parts)
        if not parts:
            msg = "NoiseStatistics.combined needs the statistics of at least one batch of target images."
            raise ValueError(msg)
        offsets = torch.tensor([0, *(len(part.keys) for part in parts)]).cumsum(0)[:-1].tolist()
        keys = torch.cat([part.keys for part in parts])
        haar_image = torch.cat([part.haar_image + offset for part, offset in zip(parts, offsets, strict=True)])
        first = _first_copies(keys)  # a shot the loader repeated on this rank counts once
        kept_haar = first[haar_image]
        rank = distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0
        keys, haar_keys = keys[first], keys[haar_image[kept_haar]]
        image_rank = gather_rows(torch.full((len(keys),), rank, dtype=torch.long))
        haar_rank = gather_rows(torch.full((len(haar_keys),), rank, dtype=torch.long))
        keys, haar_keys = gather_rows(keys), gather_rows(haar_keys)
        residual = gather_rows(torch.cat([part.residual for part in parts])[first])
        pixels = gather_rows(torch.cat([part.pixels for part in parts])[first])
        haar = gather_rows(torch.cat([part.haar for part in parts])[kept_haar])
        # A shot DDP padding gave to several ranks counts once: the copy of the lowest rank holding it.
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        owner = torch.full((len(unique_keys),), torch.iinfo(torch.long).max, dtype=torch.long)
        owner = owner.scatter_reduce(0, inverse, image_rank, reduce="amin")
        kept_images = image_rank == owner[inverse]
        kept_coefficients = haar_rank == owner[torch.searchsorted(unique_keys, haar_keys)]
        kept_keys = keys[kept_images]
        order = kept_keys.argsort()
        return cls(
            keys=kept_keys,
            residual=residual[kept_images],
            pixels=pixels[kept_images],
            haar=haar[kept_coefficients],
            haar_image=order[torch.searchsorted(kept_keys[order], haar_keys[kept_coefficients])],
        )


def _first_copies(keys: torch.Tensor) -> torch.Tensor:
    """Mask of the first occurrence of every key in ``keys``."""
    mask = torch.zeros(len(keys), dtype=torch.bool)
    seen: set[int] = set()
    for index, key in enumerate(keys.tolist()):
        if key not in seen:
            seen.add(key)
            mask[index] = True
    return mask


@dataclass(frozen=True)
class DenoisingReport:
    """How the target blur was chosen.

    ``noise``: std per channel; ``risks``: SURE risk per candidate (mean over channels); ``best``: the candidate of the
    lowest risk; ``gain``: the share of the unfiltered risk (the noise energy) it removes; ``sigma``: the blur taken,
    ``best`` when ``gain`` reaches ``min_gain``, else 0.
    """

    noise: tuple[float, ...]
    candidates: tuple[float, ...]
    risks: tuple[float, ...]
    best: float
    gain: float
    min_gain: float
    sigma: float

    def __str__(self) -> str:
        noise = ", ".join(f"{value:.4f}" for value in self.noise)
        verdict = (
            f"blur sigma {self.sigma:g} px"
            if self.sigma > 0
            else f"no filter (the best blur, sigma {self.best:g} px, stays under the {100 * self.min_gain:.0f} % asked)"
        )
        return (
            f"target noise std ({noise}) in normalised units; SURE: a blur of {self.best:g} px removes "
            f"{100 * self.gain:.0f} % of the noise energy; {verdict}"
        )


def choose_blur(
    statistics: NoiseStatistics, candidates: Sequence[float], min_gain: float = DEFAULT_MIN_GAIN
) -> DenoisingReport:
    """Pick the candidate blur with the lowest SURE risk if it removes at least ``min_gain`` of the noise energy.

    SURE is Stein's unbiased estimate of the filtered image's mean squared error; the unfiltered risk is the noise
    variance, so ``1 - risk / unfiltered risk`` is the share of the noise energy the blur removes.
    """
    if not candidates or candidates[0] != 0:
        msg = f"blur candidates must start with 0 (no filter), got {tuple(candidates)!r}."
        raise ValueError(msg)
    if statistics.residual.shape[1] != len(candidates):
        msg = f"statistics of {statistics.residual.shape[1]} blurs cannot choose among {len(candidates)} candidates."
        raise ValueError(msg)
    noise = statistics.haar.double().median(dim=0).values / MAD_TO_STD  # per channel
    variance = noise.square()
    residual, pixels = statistics.residual.sum(dim=0), statistics.pixels.sum()  # (candidates, C), pixels per channel
    risks = []
    for index, sigma in enumerate(candidates):
        centre = float(gaussian_kernel(sigma).max()) ** 2 if sigma > 0 else 1.0  # b_0: trace of the filter per pixel
        per_channel = residual[index] / pixels + 2 * variance * centre - variance
        risks.append(float(per_channel.mean()))
    best = min(range(len(candidates)), key=risks.__getitem__)
    gain = 1 - risks[best] / risks[0] if risks[0] > 0 else 0.0
    return DenoisingReport(
        noise=tuple(float(value) for value in noise),
        candidates=tuple(float(value) for value in candidates),
        risks=tuple(risks),
        best=float(candidates[best]),
        gain=gain,
        min_gain=min_gain,
        sigma=float(candidates[best]) if gain >= min_gain else 0.0,
    )


class TargetDenoiser(DefaultedState, DynamicBufferMixin, nn.Module):
    """The fit-time low-pass filter of target-domain images: a persistent 1-D Gaussian kernel (empty: none).

    Args:
        sigma: ``"auto"`` (chosen from the shots by :func:`choose_blur`) or a fixed blur in pixels (0: none).
        min_gain: ``"auto"`` filters only when the best blur removes at least this share of the noise energy.
        candidates: the blurs ``"auto"`` chooses among, starting with 0.

    """

    defaulted_state = ("kernel", "sigma")  # checkpoints from before the filter: none

    def __init__(
        self,
        sigma: float | str = "auto",
        min_gain: float = DEFAULT_MIN_GAIN,
        candidates: Sequence[float] = DEFAULT_BLUR_CANDIDATES,
    ) -> None:
        super().__init__()
        if sigma != "auto" and (isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma >= 0):
            msg = f"target_denoising must be 'auto' or a blur sigma >= 0 in pixels, got {sigma!r}."
            raise ValueError(msg)
        if not 0 <= min_gain < 1:
            msg = f"target_denoising_min_gain must be in [0, 1), got {min_gain!r}."
            raise ValueError(msg)
        self.option = sigma
        self.min_gain = float(min_gain)
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
            report = choose_blur(statistics, self.candidates, self.min_gain)
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
        return blur_separably(images, self.kernel)
