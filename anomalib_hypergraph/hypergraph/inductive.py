r"""Vertices attached to a fixed bank hypergraph by one hyperedge each: the inductive rows of the HGNN operator.

A memory bank's hypergraph has one hyperedge per bank vertex v, :math:`e_v = N_K(v)`, its K nearest bank vertices
(v itself among them, at distance 0), with soft incidence :math:`H[j, e_v]` and weight 1. A vertex x that is to be
convolved on that hypergraph (a query patch, or a bank vertex rectified the same way) is attached by its own hyperedge
:math:`e_x = \{x\} \cup N_K(x)`, with :math:`H[x, e_x] = 1`, and enters no other hyperedge, so :math:`D_v(x) = 1`.
Row x of Eq. 8's operator :math:`D_v^{-1/2} H W D_e^{-1} H^\top D_v^{-1/2} X` is then

.. math::
    x' = \frac{1}{D_e(e_x)} \Big( x + \sum_{j \in N_K(x)} H[j, e_x] \, D_v(j)^{-1/2} \, x_j \Big),
    \qquad D_e(e_x) = 1 + \sum_{j \in N_K(x)} H[j, e_x],

with :math:`D_v(j)` the degree of bank vertex j in the bank hypergraph (queries do not change it).

Why every vertex, bank or query, goes through this one operator: a query identical to a bank vertex must come out
identical to that vertex's stored feature (a target shot re-submitted as a test image must score 0, as with plain
nearest-neighbour scoring). Rectifying bank vertices with the transductive operator and queries with the inductive one
breaks that; rectifying both as attached vertices keeps it exactly, and the cost per vertex is O(K * C) whatever the
bank size, so inference never rebuilds the bank hypergraph.

The bank may be split into parts (one per domain, each searched on its own): an attached hyperedge then holds members
of several parts, and a member slot can be switched off (weight 0) when the K nearest over all parts are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_hypergraph.hypergraph.structure import SoftHypergraph, _safe_power


@dataclass
class AttachedHyperedges:
    r"""The attached hyperedge :math:`e_x` of each of Q rows, members split by bank part.

    Attributes:
        index: per part, ``(Q, K_p)`` int64 member rows in that part.
        weight: per part, ``(Q, K_p)`` :math:`H[j, e_x] D_v(j)^{-1/2}` (0 for a slot that is not a member).
        edge_degree: ``(Q, 1)`` :math:`D_e(e_x) = 1 + \sum_j H[j, e_x]`.

    """

    index: list[torch.Tensor]
    weight: list[torch.Tensor]
    edge_degree: torch.Tensor

    @classmethod
    def from_neighbours(
        cls,
        index: Sequence[torch.Tensor],
        incidence: Sequence[torch.Tensor],
        vertex_degree: Sequence[torch.Tensor],
    ) -> AttachedHyperedges:
        """Build the hyperedges from each part's neighbour table.

        Args:
            index: per part, ``(Q, K_p)`` member rows.
            incidence: per part, ``(Q, K_p)`` :math:`H[j, e_x]` (0 switches a slot off).
            vertex_degree: per part, ``(N_p,)`` bank vertex degrees :math:`D_v`.

        """
        if not len(index) == len(incidence) == len(vertex_degree) or not index:
            msg = "AttachedHyperedges needs one index, incidence and vertex-degree tensor per bank part (at least one)."
            raise ValueError(msg)
        weights, total = [], None
        for part_index, part_incidence, part_degree in zip(index, incidence, vertex_degree, strict=True):
            if part_index.shape != part_incidence.shape or part_index.ndim != 2:
                msg = (
                    "AttachedHyperedges: index and incidence of a part must both be (Q, K), got "
                    f"{tuple(part_index.shape)} and {tuple(part_incidence.shape)}."
                )
                raise ValueError(msg)
            inverse_sqrt_degree = _safe_power(part_degree.to(part_incidence.dtype), -0.5)
            weights.append(part_incidence * inverse_sqrt_degree[part_index])  # H[j,e_x] D_v(j)^-1/2
            summed = part_incidence.sum(dim=1, keepdim=True)
            total = summed if total is None else total + summed
        return cls(index=[part.long() for part in index], weight=weights, edge_degree=1.0 + total)  # D_e(e_x)

    def smooth(self, x: torch.Tensor, part_values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Eq. 8 rows (without Theta and activation) of the attached vertices, see the module docstring.

        Args:
            x: the attached vertices' own features ``(Q, C)``.
            part_values: per part, the bank vertices' features ``(N_p, C)`` in the same layer.

        Returns:
            ``(Q, C)``.

        """
        if len(part_values) != len(self.index):
            msg = f"smooth needs {len(self.index)} bank parts, got {len(part_values)}."
            raise ValueError(msg)
        total = x
        for index, weight, values in zip(self.index, self.weight, part_values, strict=True):
            total = total + weighted_gather_sum(values, index, weight)  # sum_j H[j,e_x] D_v(j)^-1/2 x_j
        return total / self.edge_degree.to(x.dtype)  # Eq. 8, row x (D_v(x) = W = H[x,e_x] = 1)


def weighted_gather_sum(values: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[q] = sum_k weight[q, k] * values[index[q, k]]`` without a ``(Q, K, C)`` temporary where possible.

    Eager mode uses ``embedding_bag`` (a fused gather-multiply-sum, differentiable in ``values`` and ``weight``); while
    ``torch.export`` traces (ONNX) the plain gather is used, which exports everywhere. Both give the same result.
    """
    if index.shape[1] == 0:  # no member in this part
        return values.new_zeros(index.shape[0], values.shape[1])
    if torch.compiler.is_exporting():
        return (weight.unsqueeze(-1).to(values.dtype) * values[index]).sum(dim=1)
    return F.embedding_bag(index, values, per_sample_weights=weight.to(values.dtype), mode="sum")


def bank_hypergraph(neighbour_index: torch.Tensor, neighbour_incidence: torch.Tensor) -> SoftHypergraph:
    """Build the bank hypergraph of the module docstring: hyperedge e_v holds the K nearest bank vertices of v.

    Args:
        neighbour_index: ``(N, K)`` the K nearest bank vertices of every bank vertex, itself included.
        neighbour_incidence: ``(N, K)`` their incidence :math:`H[j, e_v]`.

    """
    num_vertices = neighbour_index.shape[0]
    edges = torch.arange(num_vertices, device=neighbour_index.device)[:, None].expand_as(neighbour_index)
    return SoftHypergraph(
        num_vertices=num_vertices,
        vertex_index=neighbour_index.reshape(-1),
        edge_index=edges.reshape(-1),
        incidence=neighbour_incidence.reshape(-1),
        edge_weight=torch.ones(num_vertices, dtype=neighbour_incidence.dtype, device=neighbour_index.device),
    )
