"""Scale-free incidence kernel: how a Euclidean distance becomes an incidence value H in (0, 1].

HyperTrans (sec. 3.3) uses "reciprocal Euclidean distance" as the similarity behind its soft incidence but gives no
formula. A raw ``1 / (1 + d)`` depends on the scale of the features: with large distances it saturates, so how much the
hypergraph convolution mixes and how much a bank contributes to a fused score change with the backbone and with the
domain. :class:`IncidenceKernel` therefore divides every distance by one statistic of the memory bank (its ``scale``,
a persistent buffer fitted once when the bank hypergraph is built), and the same kernel object is used everywhere a
distance becomes an incidence: the bank hypergraph, the hyperedges of query patches, and the defect scores.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch
from torch import nn

logger = logging.getLogger(__name__)

KernelKind = Literal["reciprocal", "gaussian"]
KERNEL_KINDS: tuple[str, ...] = get_args(KernelKind)


class IncidenceKernel(nn.Module):
    r"""Distance-to-incidence kernel on distances measured in units of a bank statistic.

    With :math:`u = d / s` (``s`` = :attr:`scale`):

    - ``"reciprocal"``: :math:`H = 1 / (1 + u)`, the reciprocal Euclidean similarity of the paper, heavy-tailed;
    - ``"gaussian"``: :math:`H = \exp(-u^2 / 2)`.

    Both are 1 at distance 0 and strictly decreasing, so ``1 - H`` (the defect score of a patch on a bank,
    Eq. 12-17) is a strictly increasing function of the nearest-neighbour distance.

    ``scale`` is fitted by :meth:`fit` from the bank's own k-NN distances (their mean: the typical distance between a
    bank vertex and its hyperedge members), so a patch one "typical neighbour distance" away from the bank has
    incidence 1/2 with the reciprocal kernel whatever the backbone. It is a persistent buffer: checkpoints restore it.
    Before :meth:`fit` it is 1 (raw distances).

    Args:
        kind: ``"reciprocal"`` or ``"gaussian"``.

    """

    def __init__(self, kind: KernelKind = "reciprocal") -> None:
        super().__init__()
        if kind not in KERNEL_KINDS:
            msg = f"incidence kernel must be one of {KERNEL_KINDS}, got {kind!r}."
            raise ValueError(msg)
        self.kind = kind
        self.register_buffer("scale", torch.ones(()))
        self.scale: torch.Tensor

    @torch.no_grad()
    def fit(self, neighbour_distances: torch.Tensor) -> None:
        """Set :attr:`scale` to the mean of the bank's k-NN distances (self-matches excluded by the caller).

        Args:
            neighbour_distances: distances of bank vertices to their nearest other bank vertices, any shape.

        Raises:
            ValueError: if there is no distance, or a distance is not finite.

        """
        if neighbour_distances.numel() == 0:
            msg = "IncidenceKernel.fit needs at least one neighbour distance."
            raise ValueError(msg)
        if not bool(torch.isfinite(neighbour_distances).all()):
            msg = "IncidenceKernel.fit got non-finite distances: the bank holds NaN or inf features."
            raise ValueError(msg)
        scale = neighbour_distances.float().mean()
        if float(scale) <= 0:
            # Every bank vertex duplicates its neighbours: any positive unit gives the same ordering.
            logger.warning("All bank neighbour distances are 0 (duplicate features); the kernel keeps scale 1.")
            scale = torch.ones(())
        self.scale = scale.to(self.scale.device)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        """Incidence H in (0, 1] of each distance (same shape)."""
        relative = distances / self.scale.to(distances.dtype)
        if self.kind == "reciprocal":
            return 1.0 / (1.0 + relative)
        return torch.exp(-0.5 * relative.square())

    def defect(self, distances: torch.Tensor) -> torch.Tensor:
        """Defect score ``1 - H(d)`` in [0, 1) of a patch whose best match is at distance ``d`` (Eq. 12-17)."""
        return 1.0 - self(distances)

    def extra_repr(self) -> str:
        """Show the kind and the fitted scale in ``print(model)``."""
        return f"kind={self.kind!r}, scale={float(self.scale):.4g}"
