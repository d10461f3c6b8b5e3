"""Hypergraph domain rectification (HDR) of HyperTrans, Eq. 8-11.

The source bank and the target shots become the vertices of one soft hypergraph (one hyperedge per vertex: the vertex
and its K nearest vertices, incidence = similarity). A residual hypergraph network (Res-HGNN, Eq. 9) is trained so that
every vertex moves towards its most correlated vertex of the *other* domain (pseudo features, Eq. 10) while staying
close to itself (Eq. 11). Query patches are rectified inductively: each gets one new hyperedge to its K nearest bank
vertices, so inference never rebuilds the bank hypergraph and stays linear in the bank size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_hypergraph.hypergraph import HypergraphConv, SoftHypergraph, chunked_knn


class ResHGNN(nn.Module):
    """Residual hypergraph network of Eq. 9: ``R(F) = alpha * c1(dropout(sigmoid(c2(F)))) + (1 - alpha) * F``.

    ``c1`` and ``c2`` are hypergraph convolutions (Eq. 8) ``L X Theta + b`` with
    ``L = D_v^-1/2 H W D_e^-1 H^T D_v^-1/2`` on the soft incidence. Eq. 8 wraps the convolution in an activation
    sigma; we read Eq. 9 as spelling those activations out: sigma is the sigmoid written in Eq. 9 for ``c2`` and the
    identity for ``c1``, so the residual branch can produce features of any sign and scale, like the backbone
    features it is added to.

    Args:
        channels: feature channels C (both convolutions map C -> C).
        alpha: weight of the hypergraph branch (paper: 0.3); ``alpha = 0`` makes R the identity.
        dropout: dropout probability on the hidden representation (paper: 0.5), active in training mode only.

    """

    def __init__(self, channels: int, alpha: float = 0.3, dropout: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            msg = f"ResHGNN alpha must be in [0, 1], got {alpha}."
            raise ValueError(msg)
        if not 0.0 <= dropout < 1.0:
            msg = f"ResHGNN dropout must be in [0, 1), got {dropout}."
            raise ValueError(msg)
        self.alpha = alpha
        self.c2 = HypergraphConv(channels, channels)
        self.c1 = HypergraphConv(channels, channels)
        self.dropout = nn.Dropout(dropout)

    def _hidden(self, features: torch.Tensor, hypergraph: SoftHypergraph) -> torch.Tensor:
        """sigmoid(c2(F)): the hidden representation before dropout."""
        return torch.sigmoid(self.c2(features, hypergraph))  # Eq. 8 (c2, sigma = sigmoid of Eq. 9)

    def forward(self, features: torch.Tensor, hypergraph: SoftHypergraph) -> torch.Tensor:
        """Rectify all vertices ``(N, C)`` of ``hypergraph`` (transductive, used in training and for the banks)."""
        hidden = self.dropout(self._hidden(features, hypergraph))
        return self.alpha * self.c1(hidden, hypergraph) + (1 - self.alpha) * features  # Eq. 9

    def bank_hidden(self, bank_features: torch.Tensor, hypergraph: SoftHypergraph) -> torch.Tensor:
        """Bank side of the second convolution at inference: sigmoid(c2(F_bank)) without dropout (eval semantics).

        Cache it (with the bank vertex degrees) after training; :meth:`forward_queries` needs it as ``bank_hidden``.
        """
        return self._hidden(bank_features, hypergraph)

    def forward_queries(  # noqa: PLR0917 - positional like HypergraphConv.forward_queries
        self,
        query: torch.Tensor,
        bank_features: torch.Tensor,
        bank_hidden: torch.Tensor,
        bank_vertex_degree: torch.Tensor,
        neighbour_index: torch.Tensor,
        neighbour_incidence: torch.Tensor,
    ) -> torch.Tensor:
        """Rectify query patches ``(Q, C)`` inductively (Eq. 9 on the bank hypergraph extended by the queries).

        Each query vertex gets one new hyperedge: itself (incidence 1) and its K bank neighbours ``neighbour_index``
        ``(Q, K)`` with incidence ``neighbour_incidence`` ``(Q, K)``; the bank's vertex degrees stay as trained
        (``bank_vertex_degree`` ``(N,)``), so queries do not influence each other or the bank.

        Args:
            query: query patch features ``(Q, C)``.
            bank_features: bank vertex features ``(N, C)`` (input of ``c2``).
            bank_hidden: :meth:`bank_hidden` of the bank ``(N, C)`` (input of ``c1``).
            bank_vertex_degree: weighted vertex degrees of the bank hypergraph ``(N,)``.
            neighbour_index: indices of each query's K nearest bank vertices ``(Q, K)``.
            neighbour_incidence: their incidence values in (0, 1] ``(Q, K)``.

        Returns:
            Rectified query features ``(Q, C)``.

        """
        if bank_hidden.shape != bank_features.shape:
            msg = (
                f"bank_hidden {tuple(bank_hidden.shape)} must match bank_features {tuple(bank_features.shape)}; "
                "compute it with ResHGNN.bank_hidden on the same bank."
            )
            raise ValueError(msg)
        hidden = torch.sigmoid(  # Eq. 8 (c2, sigma = sigmoid of Eq. 9)
            self.c2.forward_queries(query, bank_features, bank_vertex_degree, neighbour_index, neighbour_incidence)
        )
        hidden = self.dropout(hidden)
        smoothed = self.c1.forward_queries(
            hidden, bank_hidden, bank_vertex_degree, neighbour_index, neighbour_incidence
        )
        return self.alpha * smoothed + (1 - self.alpha) * query  # Eq. 9


@dataclass
class PseudoFeatures:
    """Result of :func:`pseudo_features` (Eq. 10).

    Attributes:
        features: S(F), the feature of each vertex's chosen partner ``(N, C)``.
        index: the chosen partner vertex of each vertex ``(N,)``; always of the other domain.
        used_fallback: ``True`` where no hyperedge of the vertex holds a vertex of the other domain and the partner is
            its nearest vertex of the other domain instead ``(N,)``.

    """

    features: torch.Tensor
    index: torch.Tensor
    used_fallback: torch.Tensor


def _cross_domain_pairs(
    domain: torch.Tensor, hypergraph: SoftHypergraph, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (i, j, H[i,e] w_e H[j,e]) with i, j in a common hyperedge e and domain(i) != domain(j).

    Hyperedges are laid out as a padded member table (edges x largest edge size) and processed ``chunk_size`` edges at
    a time, so memory is O(chunk_size * size^2) and the total work is linear in the number of edges for kNN hyperedges.
    """
    num_edges = hypergraph.num_edges
    edge_index = hypergraph.edge_index.long()
    vertex_index = hypergraph.vertex_index.long()
    weighted = hypergraph.incidence * hypergraph.edge_weight[edge_index].to(hypergraph.incidence.dtype)
    order = torch.argsort(edge_index, stable=True)
    sizes = torch.bincount(edge_index, minlength=num_edges)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(edge_index.numel(), device=edge_index.device) - starts[edge_index[order]]
    largest = int(sizes.max()) if num_edges else 0
    members = torch.full((num_edges, largest), -1, dtype=torch.long, device=edge_index.device)
    members[edge_index[order], slot] = vertex_index[order]
    member_incidence = torch.zeros((num_edges, largest), dtype=hypergraph.incidence.dtype, device=edge_index.device)
    member_incidence[edge_index[order], slot] = hypergraph.incidence[order]
    member_weighted = torch.zeros_like(member_incidence)
    member_weighted[edge_index[order], slot] = weighted[order]

    rows, partners, scores = [], [], []
    for start in range(0, num_edges, chunk_size):
        vertices = members[start : start + chunk_size]
        present = vertices >= 0
        vertex_domain = domain[vertices.clamp_min(0)]
        pair_score = (
            member_weighted[start : start + chunk_size, :, None] * member_incidence[start : start + chunk_size, None, :]
        )
        cross = present[:, :, None] & present[:, None, :] & (vertex_domain[:, :, None] != vertex_domain[:, None, :])
        chunk_rows, first, second = torch.nonzero(cross, as_tuple=True)
        rows.append(vertices[chunk_rows, first])
        partners.append(vertices[chunk_rows, second])
        scores.append(pair_score[chunk_rows, first, second])
    if not rows:
        empty = edge_index.new_empty(0)
        return empty, empty, hypergraph.incidence.new_empty(0)
    return torch.cat(rows), torch.cat(partners), torch.cat(scores)


def pseudo_features(
    features: torch.Tensor,
    domain: torch.Tensor,
    hypergraph: SoftHypergraph,
    chunk_size: int = 2048,
    correlation: Literal["max", "sum"] = "max",
) -> PseudoFeatures:
    """Pseudo features S(F) of Eq. 10: each vertex's most correlated vertex of the other domain within its hyperedges.

    The incidence with same-domain connections zeroed is searched row by row for the best cross-domain partner. The
    correlation of vertices i and j (our definition; the paper gives only the arg-max) is, over the hyperedges e that
    contain both, ``H[i,e] * w_e * H[j,e]``:

    - ``"max"`` (default): the largest such product, i.e. the partner seen with the highest joint incidence in any
      single shared hyperedge;
    - ``"sum"``: their sum, the (i, j) entry of ``H W H^T``, which also rewards partners sharing many hyperedges.

    Ties go to the smallest vertex index. A vertex none of whose hyperedges holds a vertex of the other domain falls
    back to its nearest vertex of the other domain (exact Euclidean, chunked); ``used_fallback`` marks those vertices.
    Everything is sparse: the work is linear in the number of incidence entries (times the hyperedge size).

    Args:
        features: vertex features ``(N, C)``.
        domain: domain of each vertex ``(N,)``: 0 / ``False`` for source, 1 / ``True`` for target.
        hypergraph: the soft hypergraph over these N vertices.
        chunk_size: hyperedges (and fallback queries) processed per block.
        correlation: ``"max"`` or ``"sum"`` over shared hyperedges, see above.

    Returns:
        :class:`PseudoFeatures` with the partner features (detached: they are a fixed training target), partner
        indices and the fallback mask.

    """
    if features.ndim != 2:
        msg = f"pseudo_features expects features of shape (N, C), got {tuple(features.shape)}."
        raise ValueError(msg)
    num_vertices = features.shape[0]
    if domain.shape != (num_vertices,):
        msg = f"pseudo_features expects domain of shape ({num_vertices},) matching features, got {tuple(domain.shape)}."
        raise ValueError(msg)
    if hypergraph.num_vertices != num_vertices:
        msg = f"The hypergraph has {hypergraph.num_vertices} vertices but features has {num_vertices} rows."
        raise ValueError(msg)
    if correlation not in ("max", "sum"):
        msg = f"correlation must be 'max' or 'sum', got {correlation!r}."
        raise ValueError(msg)
    domain = domain.to(device=features.device, dtype=torch.long)
    if bool(((domain != 0) & (domain != 1)).any()):
        msg = "domain must hold only 0 (source) and 1 (target)."
        raise ValueError(msg)
    counts = torch.bincount(domain, minlength=2)
    if bool((counts == 0).any()):
        msg = (
            f"pseudo_features needs vertices of both domains, got {int(counts[0])} source and {int(counts[1])} target "
            "vertices."
        )
        raise ValueError(msg)

    with torch.no_grad():
        rows, partners, scores = _cross_domain_pairs(domain, hypergraph, chunk_size)
        if correlation == "sum" and rows.numel():
            keys, inverse = torch.unique(rows * num_vertices + partners, return_inverse=True)
            scores = torch.zeros(keys.shape[0], dtype=scores.dtype, device=scores.device).index_add_(0, inverse, scores)
            rows, partners = keys // num_vertices, keys % num_vertices
        best_score = torch.full((num_vertices,), -torch.inf, dtype=features.dtype, device=features.device)
        best_score = best_score.scatter_reduce(0, rows, scores.to(features.dtype), reduce="amax")
        is_best = scores.to(features.dtype) == best_score[rows]
        index = torch.full((num_vertices,), num_vertices, dtype=torch.long, device=features.device)
        index = index.scatter_reduce(0, rows[is_best], partners[is_best], reduce="amin")  # Eq. 10 (arg-max per row)

        used_fallback = index == num_vertices
        for own_domain in (0, 1):
            lonely = torch.nonzero(used_fallback & (domain == own_domain), as_tuple=True)[0]
            if lonely.numel() == 0:
                continue
            others = torch.nonzero(domain != own_domain, as_tuple=True)[0]
            _, nearest = chunked_knn(features[lonely], features[others], 1, chunk_size=chunk_size)
            index[lonely] = others[nearest[:, 0]]
        return PseudoFeatures(features=features[index].detach(), index=index, used_fallback=used_fallback)


def rectification_loss(rectified: torch.Tensor, pseudo: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Stage-2 objective (Eq. 11): ``MSE(R(F), S(F)) + MSE(R(F), F)``; S(F) and F are fixed targets (detached)."""
    if not rectified.shape == pseudo.shape == features.shape:
        msg = (
            "rectification_loss needs equal shapes, got rectified "
            f"{tuple(rectified.shape)}, pseudo {tuple(pseudo.shape)}, features {tuple(features.shape)}."
        )
        raise ValueError(msg)
    return F.mse_loss(rectified, pseudo.detach()) + F.mse_loss(rectified, features.detach())  # Eq. 11
