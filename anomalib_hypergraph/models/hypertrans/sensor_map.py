"""Paired shots: translating source-sensor patch features into the target sensor's feature space (ours).

HyperTrans carries knowledge from a source domain with plenty of normal images to a target domain with k shots. When
the two sensors see a part so differently that their features never meet (measured on every cross-domain set we have:
Eq. 10 falls back for ~100 % of the vertices and moment alignment does not help), the source bank cannot judge a
target patch as it is. A sensor upgrade usually has what is needed to bridge the gap: the first parts are captured by
both sensors, pixel-aligned (MVTec 3D-AD: ``rgb/NNN.png`` and ``xyz/NNN.tiff`` of one sample). Those pairs give
thousands of (source patch, target patch) feature pairs from which a map between the two feature spaces can be learnt,
as in Crossmodal Feature Mapping (CFM, Costanzino et al., CVPR 2024), which learns per-patch maps between 2D and 3D
features on normal pairs.

Direction. Only the target sensor is seen at test time, so a map in either direction makes the source bank usable:
source -> target (translate the source bank once, compare the query as it is; ``"bank"``, the default) or target ->
source (map every query patch, compare it with the source bank as captured; ``"query"``). Which one works depends on
the new sensor. Behind our grey, 4x coarser simulated sensor (MVTec AD bottle, MPDD metal plates) and from RGB to
depth (synthetic), the translated bank scored higher: a sensor that loses detail cannot be mapped back onto the
source. Behind a second simulated sensor that keeps more detail (2x coarser, red-weighted, RGB camera not registered),
mapping the queries scored far higher (README, "A second sensor"). And where the target sees what the source cannot
(colour contamination in RGB behind a depth source), mapping the queries into the source space erases it. The
translated bank costs nothing per query and, alone of the two, lets HDR join both banks in one space.
``translation_direction="auto"`` decides at fit time: each group of pairs is held out in turn, and the direction in
which the held-out target patches lie closer to their source evidence (smaller median nearest distance) is kept, with
its map. It chose right on the two simulated sensors and on RGB -> depth, and wrongly on the depth -> RGB demo (the
medians are distances in two feature spaces), so it is an option, not the default. Scale-free versions of that
evidence (medians or map residuals divided by each space's own spacing between shots, or the unexplained share of
variance) each chose wrongly on one of the simulated sensors, metal plates or the demo (model README).

Registration. Two cameras on one line rarely see a part pixel-aligned, so before the map is fitted each view's source
captures are read at the offset and zoom (in half-patch steps, up to ``max_offset`` patches) at which a ridge map
explains the shots best (:func:`register_pairs`); pairs that no alignment explains clearly better are used as they
are.

The map is a ridge regression with an unpenalised bias, fitted on the paired patch rows of the shots (in the views
that enter the target bank). Its strength is chosen by grouped cross-validation over the pairs (leave one shot out;
with one shot, leave one view out), so that it is decided from the training data alone, and stored with the map.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn
from torch.nn import functional

from anomalib_hypergraph.models.state import DefaultedState

logger = logging.getLogger(__name__)

DEFAULT_RIDGE_CANDIDATES: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
REGISTRATION_STEP = 0.5  # alignments of paired feature grids move them in half-patch steps
REGISTRATION_GAIN = 0.01  # an alignment must lower the residual by this share to be taken (noise cannot move pairs)


@dataclass
class TranslationReport:
    """How :meth:`SensorTranslation.fit` chose the map: candidate strengths and their cross-validated errors.

    ``held_out_maps`` holds, per group label, the map fitted at the chosen strength without that group (weight and
    bias), for estimates on held-out pairs; it is not printed.
    """

    ridge: float
    candidates: tuple[float, ...]
    validation_errors: tuple[float, ...]
    pairs: int
    groups: int
    held_out_maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)


class SensorTranslation(DefaultedState, DynamicBufferMixin, nn.Module):
    """Ridge map from one sensor's patch features to the other's, fitted on paired shots (either direction).

    ``T(x) = x W + b`` with ``W = argmin ||Y - X W - b||^2 + lambda * m * ||W||^2``, where ``m`` is the mean
    squared norm of the centred source rows per channel (so ``lambda`` does not depend on the backbone's feature
    scale) and ``b`` is not penalised. ``lambda`` is chosen among ``ridge_candidates`` by grouped cross-validation
    (mean squared error on held-out groups of pairs). Weight and bias are persistent buffers (``(0, 0)`` / ``(0,)``
    before :meth:`fit`), so checkpoints and exported graphs hold the map.

    Args:
        ridge_candidates: relative ridge strengths to choose from (one value: no cross-validation).

    """

    defaulted_state = ("weight", "bias")  # checkpoints from before paired shots: no map

    def __init__(self, ridge_candidates: Sequence[float] = DEFAULT_RIDGE_CANDIDATES) -> None:
        super().__init__()
        candidates = tuple(float(value) for value in ridge_candidates)
        if not candidates or any(not value > 0 for value in candidates):
            msg = f"ridge_candidates must be positive numbers, got {ridge_candidates!r}."
            raise ValueError(msg)
        self.ridge_candidates = candidates
        self.register_buffer("weight", torch.empty(0, 0))
        self.register_buffer("bias", torch.empty(0))
        self.weight: torch.Tensor
        self.bias: torch.Tensor

    @property
    def middle_ridge(self) -> float:
        """The strength taken without cross-validation: the middle candidate."""
        return self.ridge_candidates[len(self.ridge_candidates) // 2]

    @property
    def is_fitted(self) -> bool:
        """Whether a map has been fitted (or loaded from a checkpoint)."""
        return self.weight.numel() > 0

    def clear(self) -> None:
        """Forget the map (back to the unfitted state), e.g. when the other direction is used."""
        self.weight = self.weight.new_empty(0, 0)
        self.bias = self.bias.new_empty(0)

    @torch.no_grad()
    def fit(self, source: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> TranslationReport:
        """Fit the map on paired rows and choose its strength by grouped cross-validation.

        Args:
            source: source-sensor patch features ``(n, C_s)``.
            target: the pixel-aligned target-sensor patch features ``(n, C_t)`` (row ``i`` pairs row ``i``).
            groups: ``(n,)`` integer group of every pair (e.g. the shot, or the view with one shot); each group is
                held out once. With a single group, the strength is the middle candidate.

        Raises:
            ValueError: shapes do not match, or there are fewer pairs than channels plus one.

        """
        rows = source.shape[0]
        if source.ndim != 2 or target.ndim != 2 or target.shape[0] != rows or groups.shape != (rows,):
            msg = (
                "SensorTranslation.fit needs source (n, C_s), target (n, C_t) and groups (n,) with the same n, got "
                f"{tuple(source.shape)}, {tuple(target.shape)}, {tuple(groups.shape)}."
            )
            raise ValueError(msg)
        if source.shape[0] <= source.shape[1]:
            msg = f"SensorTranslation.fit needs more paired rows than channels, got {rows} for {source.shape[1]}."
            raise ValueError(msg)
        x, y = source.double(), target.double()
        labels = torch.unique(groups)
        # Sufficient statistics per group: the ridge solution of any union of groups follows from their sums.
        stats = [_moments(x[groups == label], y[groups == label]) for label in labels]
        total = _Moments.sum(stats)
        errors: list[float] = []
        if len(labels) > 1 and len(self.ridge_candidates) > 1:
            for ridge in self.ridge_candidates:
                squared_error = 0.0
                for held_out in stats:
                    weight, bias = total.minus(held_out).solve(ridge)
                    squared_error += held_out.squared_error(weight, bias)
                errors.append(squared_error / (x.shape[0] * y.shape[1]))
            chosen = self.ridge_candidates[min(range(len(errors)), key=errors.__getitem__)]
        else:
            chosen = self.middle_ridge
        weight, bias = total.solve(chosen)
        self.weight = weight.to(source.dtype).to(source.device)
        self.bias = bias.to(source.dtype).to(source.device)
        held_out_maps = {}
        if len(labels) > 1:
            for label, held_out in zip(labels.tolist(), stats, strict=True):
                part_weight, part_bias = total.minus(held_out).solve(chosen)
                held_out_maps[int(label)] = (part_weight.to(source.dtype), part_bias.to(source.dtype))
        return TranslationReport(
            ridge=chosen,
            candidates=self.ridge_candidates,
            validation_errors=tuple(errors),
            pairs=int(x.shape[0]),
            groups=len(labels),
            held_out_maps=held_out_maps,
        )

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        """Translate source-sensor rows ``(n, C_s)`` into the target sensor's feature space ``(n, C_t)``."""
        if not self.is_fitted:
            msg = "SensorTranslation has no map yet: fit it on paired shots first."
            raise RuntimeError(msg)
        return torch.addmm(self.bias.to(source.dtype), source, self.weight.to(source.dtype))


@dataclass
class _Moments:
    """Sums over a set of pairs: count, sum of x and y, x^T x, x^T y, and the sum of squared y."""

    count: float
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    xx: torch.Tensor
    xy: torch.Tensor
    yy: float

    @staticmethod
    def sum(parts: Sequence[_Moments]) -> _Moments:
        return _Moments(
            count=sum(part.count for part in parts),
            sum_x=sum(part.sum_x for part in parts),
            sum_y=sum(part.sum_y for part in parts),
            xx=sum(part.xx for part in parts),
            xy=sum(part.xy for part in parts),
            yy=sum(part.yy for part in parts),
        )

    def minus(self, other: _Moments) -> _Moments:
        return _Moments(
            count=self.count - other.count,
            sum_x=self.sum_x - other.sum_x,
            sum_y=self.sum_y - other.sum_y,
            xx=self.xx - other.xx,
            xy=self.xy - other.xy,
            yy=self.yy - other.yy,
        )

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Ridge weight and unpenalised bias from the centred moments."""
        mean_x, mean_y = self.sum_x / self.count, self.sum_y / self.count
        centred_xx = self.xx - self.count * torch.outer(mean_x, mean_x)
        centred_xy = self.xy - self.count * torch.outer(mean_x, mean_y)
        penalty = ridge * centred_xx.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
        system = centred_xx + penalty * torch.eye(centred_xx.shape[0], dtype=centred_xx.dtype)
        weight = torch.linalg.solve(system, centred_xy)
        return weight, mean_y - mean_x @ weight

    def squared_error(self, weight: torch.Tensor, bias: torch.Tensor) -> float:
        """Sum of ``||y - x W - b||^2`` over the pairs, from the moments alone."""
        prediction_energy = (weight * (self.xx @ weight)).sum() + 2 * (self.sum_x @ weight) @ bias
        prediction_energy = prediction_energy + self.count * bias @ bias
        cross = (weight * self.xy).sum() + self.sum_y @ bias
        return float(self.yy - 2 * cross + prediction_energy)


def _moments(x: torch.Tensor, y: torch.Tensor) -> _Moments:
    return _Moments(
        count=float(x.shape[0]),
        sum_x=x.sum(dim=0),
        sum_y=y.sum(dim=0),
        xx=x.T @ x,
        xy=x.T @ y,
        yy=float(y.square().sum()),
    )


@dataclass(frozen=True)
class Alignment:
    """How one view's paired source grids are read to line up with the shots' grids (:func:`register_pairs`).

    ``out[y, x] = in[c_y + zoom * (y - c_y) + dy, c_x + zoom * (x - c_x) + dx]`` in patches, ``c`` the grid's centre:
    the offset ``(dy, dx)`` is where the target camera looks relative to the source camera, the zoom how much more of
    the part the target camera's grid spans. The identity (the default) reads the captures as they are.
    """

    dy: float = 0.0
    dx: float = 0.0
    zoom: float = 1.0

    def as_tuple(self) -> tuple[float, float, float]:
        """``(dy, dx, zoom)``."""
        return (self.dy, self.dx, self.zoom)

    def resample(self, grids: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` grids read at this alignment (bilinear, borders repeated)."""
        count, _, height, width = grids.shape
        theta = grids.new_tensor([[self.zoom, 0.0, 2 * self.dx / width], [0.0, self.zoom, 2 * self.dy / height]])
        sampling = functional.affine_grid(theta.expand(count, 2, 3), list(grids.shape), align_corners=False)
        return functional.grid_sample(grids, sampling, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def register_pairs(
    source: torch.Tensor,
    target: torch.Tensor,
    groups: torch.Tensor,
    grid: tuple[int, int],
    *,
    max_offset: float,
    ridge: float,
) -> tuple[torch.Tensor, dict[int, Alignment]]:
    """Line the paired source feature grids up with the target grids, one offset and zoom per group (ours).

    Two sensors rarely see a part pixel-aligned: cameras on one line are mounted apart, zoomed and aimed a little
    differently, so row ``i`` of a source capture may show a spot a few pixels away from row ``i`` of its shot, and a
    map fitted on such pairs learns a blurred correspondence. The rig is the same for every shot, so each group (a
    view of every shot: a turned view turns the offset) gets one :class:`Alignment`: an offset ``(dy, dx)`` in
    patches and a zoom about the grid's centre, each moving the grid by multiples of half a patch (the zoom at the
    grid's corners along its longer side), up to ``max_offset`` patches. Every combination is tried: the source grids
    are resampled by it (bilinear, borders repeated), a ridge map from them to the target grids is fitted on the inner
    patches (the outer ring sees the border), and the one with the smallest residual is kept if it lowers the residual
    of none by at least ``REGISTRATION_GAIN``; otherwise the rows stay as they are, so pairs that are aligned already
    (one sensor's depth and colour from one sample) are untouched, unless their two modalities' features line up
    better at another reading (synthetic dome, disc: zoom 1.031 on some fits, same scores). The residual is in-sample:
    every candidate fits a map with the same number of parameters to the same target rows; with no more inner patches
    than channels it is zero for every candidate, and the group keeps none.

    Args:
        source: source rows ``(n, C_s)``; within a group, whole grids of ``grid`` patches in row-major order.
        target: the paired target rows ``(n, C_t)``, in the same order.
        groups: ``(n,)`` group of every row (the view).
        grid: ``(h, w)`` patches of one feature grid.
        max_offset: largest displacement tried, in patches: of the offset along each axis, and of the grid's corners
            by the zoom (0: none).
        ridge: relative ridge strength of the maps that judge the candidates (see :class:`SensorTranslation`).

    Returns:
        The source rows resampled by each group's alignment, and the alignment per group label.

    Raises:
        ValueError: a group's rows do not make whole grids.

    """
    height, width = grid
    reach = int(max_offset / REGISTRATION_STEP)
    moves = [step * REGISTRATION_STEP for step in range(-reach, reach + 1)]
    half_side = max(height, width) / 2
    candidates = [Alignment()] + [
        Alignment(dy, dx, 1.0 + corner / half_side)
        for corner in moves
        for dy in moves
        for dx in moves
        if dy or dx or corner
    ]
    registered = source.clone()
    alignments: dict[int, Alignment] = {}
    for label in torch.unique(groups).tolist():
        rows = groups == label
        if int(rows.sum()) % (height * width):
            msg = f"register_pairs: group {label} has {int(rows.sum())} rows, not whole {height} x {width} grids."
            raise ValueError(msg)
        grids = source[rows].reshape(-1, height, width, source.shape[1]).permute(0, 3, 1, 2)
        inner_target = _inner(target[rows].reshape(-1, height, width, target.shape[1])).double()
        errors = []
        for candidate in candidates if inner_target.shape[0] > source.shape[1] else candidates[:1]:
            moments = _moments(_inner(candidate.resample(grids).permute(0, 2, 3, 1)).double(), inner_target)
            errors.append(moments.squared_error(*moments.solve(ridge)))
        best = min(range(len(errors)), key=errors.__getitem__)
        if errors[best] > (1 - REGISTRATION_GAIN) * errors[0]:
            best = 0  # nothing explains the pairs clearly better than the captures as they are
        alignments[int(label)] = candidates[best]
        if best:
            registered[rows] = candidates[best].resample(grids).permute(0, 2, 3, 1).reshape(-1, source.shape[1])
    return registered, alignments


def _inner(grids: torch.Tensor) -> torch.Tensor:
    """Rows of ``(N, h, w, C)`` grids without their outer ring (all rows when the grid is too small for one)."""
    if grids.shape[1] > 2 and grids.shape[2] > 2:
        grids = grids[:, 1:-1, 1:-1]
    return grids.reshape(-1, grids.shape[-1])
