"""Cross-domain scoring (CDS) of HyperTrans, Eq. 12-19.

A query image's (rectified) patches join the hypergraph; the part linking them to the source bank is the source
sub-hypergraph H^s, the part linking them to the target bank the target one H^t. With incidence = similarity, the
defect score of a patch on a sub-hypergraph is its dissimilarity to its best-matching bank vertex,
``1 - max_j H(f, j)``; for the kernels used here that is a strictly increasing function of the patch's nearest-neighbour
distance d (reciprocal kernel: ``1 - 1/(1+d) = d/(1+d)``), so it is computed with an exact, chunked 1-NN search and
never materialises a query x bank matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components import GaussianBlur2d
from torch import nn

from anomalib_hypergraph.hypergraph import chunked_knn, incidence_from_distance


def _require_fixed_bandwidth(kernel: str, bandwidth: float | None) -> None:
    """Reject a Gaussian kernel without bandwidth: its data-dependent default would make scores depend on the batch."""
    if kernel == "gaussian" and bandwidth is None:
        msg = (
            "Scoring with kernel='gaussian' needs an explicit bandwidth (e.g. the bank hypergraph's mean kNN "
            "distance): without one the width would be re-estimated from each query batch."
        )
        raise ValueError(msg)


def patch_defect_scores(
    query: torch.Tensor,
    bank: torch.Tensor,
    *,
    kernel: str = "reciprocal",
    bandwidth: float | None = None,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Defect score of every query patch on one sub-hypergraph (psi / phi of Eq. 12-17): ``1 - max_j H(f, j)``.

    The best-matching bank vertex is the nearest one, so the score equals ``1 - incidence(d_nn)``, a monotone
    (increasing) function of the nearest-neighbour distance ``d_nn``; it is 0 for a patch identical to a bank patch.

    Args:
        query: query patch features ``(Q, C)``.
        bank: bank features ``(N, C)`` of one domain.
        kernel: distance-to-incidence kernel, ``"reciprocal"`` 1/(1+d) or ``"gaussian"``.
        bandwidth: Gaussian kernel width; required for ``"gaussian"`` (a width re-estimated from the query batch
            would make a patch's score depend on the other patches scored with it).
        chunk_size: query rows per distance block.

    Returns:
        Scores ``(Q,)`` in [0, 1).

    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        msg = (
            f"patch_defect_scores expects query (Q, C) and bank (N, C) with equal C, got query {tuple(query.shape)} "
            f"and bank {tuple(bank.shape)}."
        )
        raise ValueError(msg)
    if bank.shape[0] == 0:
        msg = "patch_defect_scores needs a non-empty bank."
        raise ValueError(msg)
    _require_fixed_bandwidth(kernel, bandwidth)
    distances, _ = chunked_knn(query, bank, 1, chunk_size=chunk_size)
    best_incidence = incidence_from_distance(distances[:, 0], kernel=kernel, bandwidth=bandwidth)  # max_j H(f, j)
    return 1.0 - best_incidence  # Eq. 12-17 (per-patch defect score)


class CrossDomainScorer(nn.Module):
    """Image scores and anomaly maps from the source and target sub-hypergraphs (Eq. 18-19).

    Per query patch, a defect score on the source bank (phi(H^s)) and one on the target bank (phi(H^t)). The image
    score is ``a = beta * psi(H^s) + (1 - beta) * psi(H^t)`` with psi the maximum over the image's patches of the
    *un-blurred* patch scores, exactly as in the equations (Eq. 18); the map ``S = beta * phi(H^s) + (1 - beta) *
    phi(H^t)`` (Eq. 19) is upsampled bilinearly to the image size and smoothed by a Gaussian (as PatchCore does).

    Which banks are used: ``beta == 0`` or no/empty source bank -> target only; ``beta == 1`` -> source only.

    Args:
        beta: weight of the source sub-hypergraph (paper: 0.6).
        kernel: distance-to-incidence kernel, ``"reciprocal"`` or ``"gaussian"``.
        bandwidth: Gaussian kernel width (required for ``"gaussian"``).
        sigma: standard deviation of the Gaussian smoothing of the upsampled map (paper: 4); kernel size
            ``2 * int(4 * sigma + 0.5) + 1``.
        chunk_size: query rows per distance block.
        enabled_cross_domain: ablation switch. ``False`` replaces CDS by a plain nearest-neighbour baseline: one bank,
            the union of the source and target banks, and the patch score on it serves as both map and (by its maximum)
            image score; ``beta`` is then unused.

    """

    def __init__(
        self,
        beta: float = 0.6,
        *,
        kernel: str = "reciprocal",
        bandwidth: float | None = None,
        sigma: float = 4.0,
        chunk_size: int = 2048,
        enabled_cross_domain: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            msg = f"CrossDomainScorer beta must be in [0, 1], got {beta}."
            raise ValueError(msg)
        _require_fixed_bandwidth(kernel, bandwidth)
        if sigma <= 0:
            msg = f"CrossDomainScorer sigma must be positive, got {sigma}."
            raise ValueError(msg)
        self.beta = beta
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.chunk_size = chunk_size
        self.enabled_cross_domain = enabled_cross_domain
        kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
        self.blur = GaussianBlur2d(sigma=(sigma, sigma), channels=1, kernel_size=(kernel_size, kernel_size))

    def _scores(self, rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return patch_defect_scores(rows, bank, kernel=self.kernel, bandwidth=self.bandwidth, chunk_size=self.chunk_size)

    def patch_maps(
        self, query_patches: torch.Tensor, source_bank: torch.Tensor | None, target_bank: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(B,)`` (Eq. 18) and patch-resolution maps ``(B, 1, h, w)`` (Eq. 19), before upsampling/blur.

        Args:
            query_patches: query patch features ``(B, C, h, w)``.
            source_bank: source bank ``(N_s, C)``, or ``None`` / empty when there is no source domain.
            target_bank: target bank ``(N_t, C)``.

        """
        if query_patches.ndim != 4:
            msg = f"query_patches must have shape (B, C, h, w), got {tuple(query_patches.shape)}."
            raise ValueError(msg)
        batch_size, channels, height, width = query_patches.shape
        rows = query_patches.permute(0, 2, 3, 1).reshape(-1, channels)
        has_source = source_bank is not None and source_bank.numel() > 0
        if not has_source and self.beta == 1.0:
            msg = "CrossDomainScorer with beta=1 scores on the source bank only, but no source bank was given."
            raise ValueError(msg)

        def as_map(scores: torch.Tensor) -> torch.Tensor:
            return scores.reshape(batch_size, 1, height, width)

        if not self.enabled_cross_domain:
            union = torch.cat([source_bank, target_bank]) if has_source else target_bank
            union_map = as_map(self._scores(rows, union))
            return union_map.amax(dim=(1, 2, 3)), union_map
        if not has_source or self.beta == 0.0:
            target_map = as_map(self._scores(rows, target_bank))
            return target_map.amax(dim=(1, 2, 3)), target_map
        source_map = as_map(self._scores(rows, source_bank))  # phi(H^s), Eq. 14
        if self.beta == 1.0:
            return source_map.amax(dim=(1, 2, 3)), source_map
        target_map = as_map(self._scores(rows, target_bank))  # phi(H^t), Eq. 17
        source_score = source_map.amax(dim=(1, 2, 3))  # psi(H^s), Eq. 12-13
        target_score = target_map.amax(dim=(1, 2, 3))  # psi(H^t), Eq. 15-16
        image_score = self.beta * source_score + (1 - self.beta) * target_score  # Eq. 18
        anomaly_map = self.beta * source_map + (1 - self.beta) * target_map  # Eq. 19
        return image_score, anomaly_map

    def forward(
        self,
        query_patches: torch.Tensor,
        source_bank: torch.Tensor | None,
        target_bank: torch.Tensor,
        image_size: tuple[int, int] | torch.Size,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images: ``(B,)`` image scores and ``(B, 1, H, W)`` anomaly maps, upsampled and Gaussian-smoothed."""
        image_score, patch_map = self.patch_maps(query_patches, source_bank, target_bank)
        anomaly_map = F.interpolate(patch_map, size=tuple(image_size), mode="bilinear", align_corners=False)
        return image_score, self.blur(anomaly_map)
