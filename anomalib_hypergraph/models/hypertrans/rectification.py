"""Hypergraph domain rectification (HDR) of HyperTrans, Eq. 8-11.

The target shots and the source bank become the vertices of one soft hypergraph: one hyperedge per vertex, holding its
K nearest vertices (itself included), incidence = similarity through the shared scale-free kernel. A residual
hypergraph network (Res-HGNN, Eq. 9) is trained so that every vertex moves towards its most correlated vertex of the
*other* domain (pseudo features, Eq. 10) while staying close to itself (Eq. 11).

One operator for bank and queries: every vertex is rectified as a vertex attached to the bank hypergraph by its own
hyperedge (:mod:`anomalib_hypergraph.hypergraph.inductive`). Training applies it to the bank vertices, the stored
rectified banks are its output on the bank vertices, and a query patch goes through exactly the same function, so a
query identical to a bank vertex is mapped exactly onto that vertex's stored feature. Inference stays linear in the
bank size and never rebuilds the bank hypergraph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_hypergraph.hypergraph import AttachedHyperedges, HypergraphConv, SoftHypergraph, chunked_knn


class ResHGNN(nn.Module):
    """Residual hypergraph network of Eq. 9: ``R(F) = alpha * c1(dropout(sigmoid(c2(F)))) + (1 - alpha) * F``.

    ``c1`` and ``c2`` are hypergraph convolutions (Eq. 8) evaluated on attached hyperedges (see the module docstring).
    Eq. 8 wraps the convolution in an activation sigma; we read Eq. 9 as spelling those activations out: sigma is the
    sigmoid written in Eq. 9 for ``c2`` and the identity for ``c1``, so the residual branch can produce features of any
    sign and scale, like the backbone features it is added to.

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

    def hidden(
        self, x: torch.Tensor, hyperedges: AttachedHyperedges, bank_features: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """sigmoid(c2(x)) of attached vertices, before dropout: the input of ``c1``."""
        return torch.sigmoid(self.c2.forward_attached(x, hyperedges, bank_features))  # Eq. 8 (c2), sigma of Eq. 9

    def forward(
        self,
        x: torch.Tensor,
        hyperedges: AttachedHyperedges,
        bank_features: Sequence[torch.Tensor],
        bank_hidden: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Rectify attached vertices ``(Q, C)`` whose bank members have ``bank_features`` / ``bank_hidden`` per part."""
        hidden = self.dropout(self.hidden(x, hyperedges, bank_features))
        return self.alpha * self.c1.forward_attached(hidden, hyperedges, bank_hidden) + (1 - self.alpha) * x  # Eq. 9

    def rectify_bank(
        self, bank_parts: Sequence[torch.Tensor], hyperedges: AttachedHyperedges
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rectify every bank vertex as a vertex attached by its own hyperedge.

        Args:
            bank_parts: the bank, one tensor per part (domain), in the order ``hyperedges`` indexes them.
            hyperedges: the attached hyperedge of every bank vertex (rows in the order of the concatenated parts).

        Returns:
            ``(R(bank), hidden)`` over the concatenated parts: the rectified bank and sigmoid(c2(bank)) (dropout applied
            in training mode), the hidden states a query's ``c1`` reads at its bank members.

        """
        bank = torch.cat(list(bank_parts))
        hidden = self.dropout(self.hidden(bank, hyperedges, bank_parts))
        hidden_parts = hidden.split([part.shape[0] for part in bank_parts])
        residual = self.c1.forward_attached(hidden, hyperedges, hidden_parts)
        rectified = self.alpha * residual + (1 - self.alpha) * bank  # Eq. 9
        return rectified, hidden


@dataclass
class PseudoFeatures:
    """Result of :func:`pseudo_features` (Eq. 10).

    Attributes:
        features: S(F), the feature of each vertex's chosen partner ``(N, C)``.
        index: the chosen partner vertex of each vertex ``(N,)``; always of the other domain.
        used_fallback: ``True`` where no hyperedge holds the vertex together with an other-domain centre, and the
            partner is its nearest vertex of the other domain instead ``(N,)``.

    """

    features: torch.Tensor
    index: torch.Tensor
    used_fallback: torch.Tensor


def pseudo_features(
    features: torch.Tensor, domain: torch.Tensor, hypergraph: SoftHypergraph, chunk_size: int = 2048
) -> PseudoFeatures:
    r"""Pseudo features S(F) of Eq. 10: per vertex, the row arg-max of the cross-domain incidence :math:`H^c`.

    :math:`H^c` is the incidence with same-domain connections zeroed: :math:`H^c[i, e_j] = H[i, e_j]` when the centre j
    of hyperedge :math:`e_j` is of the other domain than vertex i, else 0. The partner of i is the centre of the row's
    arg-max hyperedge, i.e. the other-domain vertex j whose hyperedge holds i with the largest incidence (its nearest
    other-domain "neighbour of". Ties go to the smallest index). A vertex whose row of :math:`H^c` is empty (no
    other-domain vertex counts it among its K nearest) falls back to its nearest vertex of the other domain (exact,
    chunked); ``used_fallback`` marks those vertices. Sparse: linear in the number of incidence entries.

    Args:
        features: vertex features ``(N, C)``.
        domain: domain of each vertex ``(N,)``: 0 / ``False`` for source, 1 / ``True`` for target.
        hypergraph: the hypergraph over these N vertices, one hyperedge per vertex (hyperedge j centred on vertex j).
        chunk_size: fallback queries processed per block.

    Returns:
        :class:`PseudoFeatures` with the partner features (detached: a fixed training target), partner indices and the
        fallback mask.

    """
    num_vertices = features.shape[0]
    if features.ndim != 2:
        msg = f"pseudo_features expects features of shape (N, C), got {tuple(features.shape)}."
        raise ValueError(msg)
    if domain.shape != (num_vertices,):
        msg = f"pseudo_features expects domain of shape ({num_vertices},) matching features, got {tuple(domain.shape)}."
        raise ValueError(msg)
    if hypergraph.num_vertices != num_vertices or hypergraph.num_edges != num_vertices:
        msg = (
            f"pseudo_features needs one hyperedge per vertex over the {num_vertices} vertices, got a hypergraph with "
            f"{hypergraph.num_vertices} vertices and {hypergraph.num_edges} hyperedges."
        )
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
        member, centre = hypergraph.vertex_index, hypergraph.edge_index
        cross = domain[member] != domain[centre]  # the non-zero entries of H^c
        member, centre = member[cross], centre[cross]
        incidence = hypergraph.incidence[cross].to(features.dtype)
        best = torch.full((num_vertices,), -torch.inf, dtype=features.dtype, device=features.device)
        best = best.scatter_reduce(0, member, incidence, reduce="amax")
        is_best = incidence == best[member]
        index = torch.full((num_vertices,), num_vertices, dtype=torch.long, device=features.device)
        index = index.scatter_reduce(0, member[is_best], centre[is_best], reduce="amin")  # Eq. 10, row arg-max of H^c

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


def train_rectifier(
    rectifier: ResHGNN,
    bank_parts: Sequence[torch.Tensor],
    hyperedges: AttachedHyperedges,
    pseudo: torch.Tensor,
    *,
    iterations: int,
    lr: float,
    seed: int,
    on_iteration: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Stage 2 (Algorithm 1): ``iterations`` full-graph Adam steps of the Res-HGNN on Eq. 11.

    The dropout draws come from a forked RNG seeded with ``seed``, so the result does not depend on the caller's random
    state and every rank of a data-parallel run computes the same steps on the same (gathered) bank. Gradients are taken
    with ``torch.autograd.grad``, outside any DDP wrapper.

    Args:
        rectifier: the network to train (left in eval mode afterwards).
        bank_parts: the bank vertices, one tensor per part (domain); N rows in all.
        hyperedges: their attached hyperedges.
        pseudo: pseudo features S(F) ``(N, C)`` (Eq. 10).
        iterations: epochsR (paper: 100).
        lr: Adam learning rate.
        seed: seed of the dropout draws.
        on_iteration: called with ``(iteration, loss)`` after every step (logging).

    Returns:
        The loss of every iteration.

    """
    rectifier.requires_grad_(True)  # a Lightning module may keep it frozen outside stage 2 (DDP, see its setup)
    parameters = list(rectifier.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses: list[float] = []
    features = torch.cat(list(bank_parts))
    rectifier.train()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        for iteration in range(iterations):
            rectified, _ = rectifier.rectify_bank(bank_parts, hyperedges)  # Eq. 9
            loss = rectification_loss(rectified, pseudo, features)  # Eq. 11
            gradients = torch.autograd.grad(loss, parameters)
            for parameter, gradient in zip(parameters, gradients, strict=True):
                parameter.grad = gradient
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_iteration is not None:
                on_iteration(iteration, losses[-1])
    rectifier.eval()
    return losses
