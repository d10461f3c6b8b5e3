r"""H2VLR anomaly inference: text and visual maps, base map (Eq. 5), residual correction (Eq. 6-7), image score.

All maps are per patch, ``(B, N)``, in [0, 1]:

- :math:`M_{txt}`: softmax over the cosine similarities of a patch token to the semantic centres C_n and C_a, at
  CLIP's temperature; the abnormal probability;
- :math:`M_{vis}`: distance of a patch's gallery tokens to their nearest support-gallery token,
  :math:`\frac{1}{2}(1 - \max_j \cos)`, averaged over the gallery blocks (the halving maps [-1, 1] to [0, 1]);
- Eq. 5: :math:`M_{base} = \alpha M_{txt} + (1 - \alpha) M_{vis}`, alpha = 0.5;
- Eq. 6: :math:`M_{res} = \beta (M_{hg} - \mu)`, with mu the mean of :math:`M_{hg}` over the support images (so that a
  normal image's hypergraph evidence is centred at 0) and beta a learnable scale (ours; starts at 1);
- Eq. 7: :math:`M^* = \mathrm{clamp}(M_{base} + \eta M_{res}, 0, 1)`, eta = 0.4.

The image score is a small MLP on a learnable soft histogram of :math:`M^*` (paper: soft-histogram pooling, learnable;
ours: 16 bins, each patch spread over the bins by a softmax of :math:`-(m - c_b)^2 / 2h_b^2` and averaged over the
patches, so the histogram sums to 1; centres :math:`c_b` start at (b + 0.5) / 16 and widths :math:`h_b` at the bin
width, both learned unless ``learnable=False``; MLP 16 -> 32 -> 1 with a sigmoid, initialised as an increasing
function of the histogram's upper tail, see :class:`HistogramImageHead`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_hypergraph.hypergraph import nearest_cosine_similarity


def text_anomaly_map(
    patch_tokens: torch.Tensor,
    normal_centre: torch.Tensor,
    anomaly_centre: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """M_txt ``(B, N)``: abnormal probability of each normalised patch token against the two semantic centres."""
    centres = torch.stack([normal_centre, anomaly_centre])  # (2, D)
    logits = logit_scale * patch_tokens @ centres.T  # (B, N, 2)
    return torch.softmax(logits, dim=-1)[..., 1]  # Eq. 5: M_txt


def visual_anomaly_map(gallery_tokens: torch.Tensor, support_gallery: torch.Tensor, *, chunk_size: int) -> torch.Tensor:
    """M_vis ``(B, N)``: mean over the gallery blocks of (1 - max cosine to the support gallery) / 2.

    Args:
        gallery_tokens: ``(B, G, N, W)`` normalised gallery tokens of the query images.
        support_gallery: ``(G, R, W)`` normalised support tokens shared by the batch, or ``(B, G, R, W)`` per image
            (leave-one-out galleries during training).
        chunk_size: gallery rows per block of the nearest-neighbour search.

    """
    per_layer = []
    for layer in range(gallery_tokens.shape[1]):
        gallery = support_gallery[:, layer] if support_gallery.ndim == 4 else support_gallery[layer]
        similarity = nearest_cosine_similarity(
            gallery_tokens[:, layer], gallery, chunk_size=chunk_size, normalized=True
        )
        per_layer.append(0.5 * (1.0 - similarity))
    return torch.stack(per_layer).mean(dim=0)  # Eq. 5: M_vis


def base_map(text_map: torch.Tensor, visual_map: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 5: M_base = alpha * M_txt + (1 - alpha) * M_vis."""
    return alpha * text_map + (1.0 - alpha) * visual_map  # Eq. 5


def corrected_map(
    base: torch.Tensor, node_scores: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor, eta: float
) -> torch.Tensor:
    """Eq. 6-7: M* = clamp(M_base + eta * beta * (M_hg - mu), 0, 1)."""
    residual = scale * (node_scores - centre)  # Eq. 6: M_res = beta (M_hg - mu)
    return torch.clamp(base + eta * residual, 0.0, 1.0)  # Eq. 7


def uniform_bins(num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``(b + 0.5) / num_bins`` and widths ``1 / num_bins`` of ``num_bins`` equal bins over [0, 1]."""
    if num_bins < 2:
        msg = f"A soft histogram needs at least 2 bins, got {num_bins}."
        raise ValueError(msg)
    centres = (torch.arange(num_bins, dtype=torch.float32) + 0.5) / num_bins
    return centres, torch.full((num_bins,), 1.0 / num_bins)


def soft_histogram(maps: torch.Tensor, centres: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Differentiable histogram ``(B, bins)`` of per-patch scores ``(B, N)``; each row sums to 1.

    Args:
        maps: ``(B, N)`` scores.
        centres: ``(bins,)`` bin centres.
        widths: ``(bins,)`` Gaussian widths of the soft assignment (positive).

    """
    logits = -((maps.unsqueeze(-1) - centres) ** 2) / (2.0 * widths**2)  # (B, N, bins)
    return torch.softmax(logits, dim=-1).mean(dim=1)


class HistogramImageHead(nn.Module):
    """Image anomaly score from the soft histogram of the corrected map: MLP(bins -> hidden -> 1), sigmoid.

    The histogram's bin centres and log-widths are parameters (learned with ``learnable=True``, the paper's learnable
    soft histogram; frozen at the uniform bins otherwise; the same state entries either way).

    Initialisation (ours, ``init="tail"``): the first ``num_bins`` hidden units start as the upper-tail masses of the
    histogram (unit j sums the bins >= j), the output layer as a rising ramp over them (the other hidden units start
    with zero output weight). The untrained head is thus an increasing function of how much of the map lies in high
    bins, and the few training steps refine it; ``init="random"`` keeps PyTorch's default initialisation.

    Args:
        num_bins: histogram bins.
        hidden: hidden units (>= ``num_bins`` with ``init="tail"``).
        init: ``"tail"`` or ``"random"``.
        learnable: learn the bin centres and widths.

    """

    def __init__(self, num_bins: int = 16, hidden: int = 32, init: str = "tail", learnable: bool = True) -> None:
        super().__init__()
        if init not in {"tail", "random"}:
            msg = f"image head init must be 'tail' or 'random', got {init!r}."
            raise ValueError(msg)
        if init == "tail" and hidden < num_bins:
            msg = f"image head init='tail' needs hidden >= num_bins, got hidden={hidden}, num_bins={num_bins}."
            raise ValueError(msg)
        self.num_bins = num_bins
        centres, widths = uniform_bins(num_bins)
        self.bin_centres = nn.Parameter(centres, requires_grad=learnable)
        self.bin_log_widths = nn.Parameter(widths.log(), requires_grad=learnable)
        self.mlp = nn.Sequential(nn.Linear(num_bins, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        if init == "tail":
            with torch.no_grad():
                first, last = self.mlp[0], self.mlp[2]
                first.weight[:num_bins] = torch.ones(num_bins, num_bins).triu()  # unit j: mass of the bins >= j
                first.bias[:num_bins] = 0.0
                last.weight.zero_()
                last.weight[0, :num_bins] = 4.0 * torch.arange(num_bins) / num_bins**2  # rising ramp
                last.bias.zero_()

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Scores ``(B,)`` in (0, 1) of per-patch maps ``(B, N)``."""
        histogram = soft_histogram(maps, self.bin_centres, self.bin_log_widths.exp())
        return torch.sigmoid(self.mlp(histogram).squeeze(-1))


def upsample_map(patch_map: torch.Tensor, grid_size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """``(B, N)`` patch scores -> ``(B, 1, H, W)`` map, bilinear."""
    grid = patch_map.reshape(patch_map.shape[0], 1, *grid_size)
    return F.interpolate(grid, size=image_size, mode="bilinear", align_corners=False)
