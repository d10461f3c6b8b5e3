"""Hypergraph convolution on a soft hypergraph (HGNN, HyperTrans Eq. 8), transductive and inductive."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from anomalib_hypergraph.hypergraph.structure import SoftHypergraph

if TYPE_CHECKING:
    from anomalib_hypergraph.hypergraph.inductive import AttachedHyperedges


class HypergraphConv(nn.Module):
    r"""HGNN convolution with soft incidence, without the activation (Eq. 8).

    Matrix format:

    .. math::
        \mathbf{X}^{\prime} = \mathbf{D}_v^{-\frac{1}{2}} \mathbf{H} \mathbf{W} \mathbf{D}_e^{-1}
        \mathbf{H}^\top \mathbf{D}_v^{-\frac{1}{2}} \mathbf{X} \mathbf{\Theta} + \mathbf{b}

    where :math:`\mathbf{H}` is the (soft) incidence matrix, :math:`\mathbf{W}` the diagonal hyperedge weights,
    :math:`\mathbf{D}_v`, :math:`\mathbf{D}_e` the vertex and hyperedge degrees of the weighted incidence and
    :math:`\mathbf{\Theta}` the learnable projection. Eq. 8 is :math:`\sigma(\mathbf{X}^{\prime})`: the caller applies
    the activation (Res-HGNN, Eq. 9, puts a sigmoid and dropout between its two convolutions). Unlike dhg's
    ``HGNNConv`` (bias inside Theta, before smoothing), the bias is added after smoothing, so every vertex gets the
    same offset whatever its degree.

    Args:
        in_channels: :math:`C_{in}`.
        out_channels: :math:`C_{out}`.
        bias: learn the additive bias :math:`\mathbf{b}` (zero-initialised).

    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.theta = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def _add_bias(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.bias is None else x + self.bias

    def forward(
        self, x: torch.Tensor, hypergraph: SoftHypergraph, edge_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Convolve vertex features ``x`` ``(N, C_in)`` over ``hypergraph`` to ``(N, C_out)``.

        Args:
            x: vertex features.
            hypergraph: the soft hypergraph over the N vertices.
            edge_weight: optional W override ``(E,)`` (a learnable weight receives gradients).

        """
        smoothed = hypergraph.smooth(self.theta(x), edge_weight)  # HyperTrans Eq. 8 / H2VLR Eq. 4 (before sigma)
        return self._add_bias(smoothed)

    def forward_attached(
        self, x: torch.Tensor, hyperedges: AttachedHyperedges, bank_x: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Convolve vertices attached to a fixed bank hypergraph by one hyperedge each (see :mod:`.inductive`).

        The smoothing is linear, so it runs before Theta: the cost is O(Q * K * C_in + Q * C_in * C_out) per call,
        independent of the bank size.

        Args:
            x: the attached vertices' features ``(Q, C_in)``.
            hyperedges: their attached hyperedges.
            bank_x: per bank part, the bank vertices' input to this layer ``(N_p, C_in)``.

        Returns:
            ``(Q, C_out)``.

        """
        return self._add_bias(self.theta(hyperedges.smooth(x, bank_x)))  # Eq. 8 (before sigma), attached rows
