"""Per-domain patch-feature memory banks that survive checkpoints and data-parallel filling.

HyperTrans keeps a source bank (coreset of all source patches) and a target bank (the k shots' patches); H2VLR keeps a
support gallery. Rows are staged batch by batch (:meth:`HypergraphMemoryBank.add`) and turned into the stored bank
once (:meth:`HypergraphMemoryBank.finalize`):

- under data parallelism every rank saw a different shard; the staged rows (and their keys) are gathered from all
  ranks, so every rank ends with the full bank;
- rows carry integer keys (e.g. image index * patches + patch): sorting by key and dropping repeated keys undoes the
  rank interleaving and the samples a DistributedSampler repeats to pad the last batch, making the bank identical to
  the one a single process builds. Without keys the order is rank order and repeats are kept;
- an optional greedy k-center coreset (:mod:`.coreset`, the rule of anomalib's ``KCenterGreedy``, much faster) is
  drawn with a fixed seed from a private generator, so all ranks (and reruns) pick the same rows.

Banks are persistent buffers named ``f"{domain}_bank"``, each with its squared row norms
``f"{domain}_bank_squared_norm"``, cached once so that a search against the bank makes no temporary of the bank's size
(a state dict without them, from before the cache, gets them recomputed at load). anomalib's ``DynamicBufferMixin``
resizes the buffers when a state dict of another size is loaded, so a fresh instance can load any checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

from anomalib_hypergraph.hypergraph.coreset import DEFAULT_PROJECTION_DIM, greedy_k_center
from anomalib_hypergraph.hypergraph.distributed import gather_rows
from anomalib_hypergraph.hypergraph.knn import chunked_knn, squared_row_norms


def _deduplicate_by_key(features: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by key and keep the first row of every key; return the rows and their keys."""
    keys, order = torch.sort(keys, stable=True)
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    return features[order[first]], keys[first]


def _bank_squared_norm(bank: torch.Tensor) -> torch.Tensor:
    """Squared row norms of a bank, ``(rows,)``; empty for the ``(0, 0)`` placeholder."""
    if bank.ndim != 2 or bank.shape[0] == 0:
        return bank.new_empty(0)
    return squared_row_norms(bank)


def greedy_coreset(
    features: torch.Tensor, ratio: float, seed: int, *, projection_dim: int | None = DEFAULT_PROJECTION_DIM
) -> torch.Tensor:
    """Greedy k-center coreset of ``int(len(features) * ratio)`` rows, seeded (see :mod:`.coreset`).

    The farthest-point rule of anomalib's ``KCenterGreedy`` (random start, then always the row farthest from the
    selected ones), computed by :func:`~anomalib_hypergraph.hypergraph.coreset.greedy_k_center`: a seeded Gaussian
    projection to ``projection_dim`` columns, fused squared distances against cached row norms and several picks per
    pass; all randomness from a private generator, so the caller's random streams are untouched.
    """
    num_rows = features.shape[0]
    num_centers = int(num_rows * ratio)
    if num_centers < 1:
        msg = f"coreset_ratio={ratio} keeps no row of a {num_rows}-row bank; use a larger ratio or None."
        raise ValueError(msg)
    indices = greedy_k_center(features, num_centers, seed=seed, projection_dim=projection_dim)
    return features[indices]


class HypergraphMemoryBank(DynamicBufferMixin, nn.Module):
    """Feature banks, one per domain, stored as persistent buffers ``f"{domain}_bank"`` ``(rows, C)``.

    Args:
        domains: bank names (valid Python identifiers, unique), e.g. ``("source", "target")``.
        persistent: whether the banks belong to the module's state dict (``False`` for staging areas whose rows are
            only needed while fitting, e.g. paired shots).

    Example:
        >>> bank = HypergraphMemoryBank(domains=("target",))
        >>> bank.add("target", torch.randn(6, 4), keys=torch.arange(6))
        >>> bank.finalize("target").shape
        torch.Size([6, 4])

    """

    def __init__(self, domains: Sequence[str] = ("source", "target"), *, persistent: bool = True) -> None:
        super().__init__()
        domains = tuple(domains)
        if not domains or len(set(domains)) != len(domains):
            msg = f"HypergraphMemoryBank needs at least one domain and unique names, got {domains}."
            raise ValueError(msg)
        for domain in domains:
            if not isinstance(domain, str) or not domain.isidentifier():
                msg = f"HypergraphMemoryBank domain names must be Python identifiers, got {domain!r}."
                raise ValueError(msg)
            self.register_buffer(self._buffer_name(domain), torch.empty(0, 0), persistent=persistent)
            self.register_buffer(self._norm_buffer_name(domain), torch.empty(0), persistent=persistent)
        self._domains = domains
        self._staged_features: dict[str, list[torch.Tensor]] = {domain: [] for domain in domains}
        self._staged_keys: dict[str, list[torch.Tensor]] = {domain: [] for domain in domains}

    @staticmethod
    def _buffer_name(domain: str) -> str:
        return f"{domain}_bank"

    @staticmethod
    def _norm_buffer_name(domain: str) -> str:
        return f"{domain}_bank_squared_norm"

    def _load_from_state_dict(  # noqa: PLR0917 - torch's signature
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Recompute the squared row norms of banks whose state dict has none (checkpoints from before the cache)."""
        for domain in self._domains:
            bank_key = prefix + self._buffer_name(domain)
            norm_key = prefix + self._norm_buffer_name(domain)
            if bank_key in state_dict and norm_key not in state_dict:
                state_dict[norm_key] = _bank_squared_norm(state_dict[bank_key])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def recomputed_state_keys(self) -> tuple[str, ...]:
        """State entries (relative to this module) that a state dict may lack: they are rebuilt from the banks."""
        return tuple(self._norm_buffer_name(domain) for domain in self._domains)

    @property
    def domains(self) -> tuple[str, ...]:
        """The bank names, in construction order."""
        return self._domains

    def _check_domain(self, domain: str) -> None:
        if domain not in self._domains:
            msg = f"Unknown memory-bank domain {domain!r}; known domains: {list(self._domains)}."
            raise KeyError(msg)

    def add(self, domain: str, features: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Stage rows for ``domain`` (not stored until :meth:`finalize`).

        Args:
            domain: bank name.
            features: ``(n, C)`` rows (detached).
            keys: optional ``(n,)`` integer keys identifying each row across ranks; give them for every batch of a
                domain or for none.

        """
        self._check_domain(domain)
        if features.ndim != 2:
            msg = f"HypergraphMemoryBank.add expects features of shape (n, C), got {tuple(features.shape)}."
            raise ValueError(msg)
        staged = self._staged_features[domain]
        if staged and staged[0].shape[1] != features.shape[1]:
            msg = (
                f"HypergraphMemoryBank.add: staged {domain!r} rows have {staged[0].shape[1]} channels, "
                f"got {features.shape[1]}."
            )
            raise ValueError(msg)
        if keys is not None:
            if keys.shape != (features.shape[0],) or keys.is_floating_point() or keys.is_complex():
                msg = (
                    f"HypergraphMemoryBank.add: keys must be an integer tensor of shape ({features.shape[0]},), "
                    f"got {keys.dtype} {tuple(keys.shape)}."
                )
                raise ValueError(msg)
            keys = keys.to(device=features.device, dtype=torch.long)
        if staged and (keys is None) != (not self._staged_keys[domain]):
            msg = f"HypergraphMemoryBank.add: give keys for every batch of {domain!r} or for none."
            raise ValueError(msg)
        staged.append(features.detach())
        if keys is not None:
            self._staged_keys[domain].append(keys)

    def collect(
        self, domain: str, gather: bool = True, channels: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the staged rows of ``domain`` (and their keys) and clear the stage, without storing them.

        Steps: concatenate; gather from all ranks (``gather=True``, no-op without torch.distributed); with keys, sort by
        key and keep one row per key. Under data parallelism every rank must call it (gathering is collective).

        Args:
            domain: bank name.
            gather: gather the rows of all ranks.
            channels: for a domain that may have no staged rows on some rank: take part with ``(0, channels)`` rows
                and no keys instead of failing (keys are then expected wherever rows were staged).

        Returns:
            ``(rows, keys)``: rows ``(n, C)`` and their sorted unique keys ``(n,)`` (``None`` when staged without keys).

        Raises:
            RuntimeError: nothing was staged for ``domain`` and ``channels`` is not given.

        """
        self._check_domain(domain)
        if not self._staged_features[domain]:
            if channels is None:
                msg = f"HypergraphMemoryBank: nothing staged for domain {domain!r}; call add() first."
                raise RuntimeError(msg)
            self._staged_features[domain] = [self.get(domain).new_empty(0, channels)]
            self._staged_keys[domain] = [torch.empty(0, dtype=torch.long)]
        features = torch.cat(self._staged_features[domain])
        keys = torch.cat(self._staged_keys[domain]) if self._staged_keys[domain] else None
        self._staged_features[domain] = []
        self._staged_keys[domain] = []
        if gather:
            features = gather_rows(features)
            keys = gather_rows(keys) if keys is not None else None
        if keys is not None:
            features, keys = _deduplicate_by_key(features, keys)
        return features, keys

    def has_staged(self, domain: str) -> bool:
        """Whether rows are staged for ``domain`` (on this rank)."""
        self._check_domain(domain)
        return bool(self._staged_features[domain])

    def finalize(
        self, domain: str, coreset_ratio: float | None = None, gather: bool = True, seed: int = 0
    ) -> torch.Tensor:
        """Turn the staged rows into the stored bank and clear the stage.

        :meth:`collect` (gather, one row per key), then with ``coreset_ratio < 1`` a seeded greedy coreset of
        ``int(rows * coreset_ratio)`` rows. Under data parallelism every rank must call it (gathering is collective).

        Args:
            domain: bank name.
            coreset_ratio: fraction kept by the greedy coreset, in (0, 1]; None or 1 keeps every row.
            gather: gather the rows of all ranks.
            seed: seed of the coreset's random start and projection.

        Returns:
            The stored bank ``(rows, C)``.

        Raises:
            RuntimeError: nothing was staged for ``domain``.
            ValueError: ``coreset_ratio`` outside (0, 1] or too small to keep one row.

        """
        if coreset_ratio is not None and not 0 < coreset_ratio <= 1:
            msg = f"coreset_ratio must be in (0, 1] or None, got {coreset_ratio}."
            raise ValueError(msg)
        features, _ = self.collect(domain, gather=gather)
        if coreset_ratio is not None and coreset_ratio < 1:
            features = greedy_coreset(features, coreset_ratio, seed)
        self.set(domain, features)
        return self.get(domain)

    def set(self, domain: str, features: torch.Tensor) -> None:
        """Store ``features`` ``(rows, C)`` as the bank of ``domain`` directly (no gathering or coreset)."""
        self._check_domain(domain)
        if features.ndim != 2:
            msg = f"HypergraphMemoryBank.set expects features of shape (rows, C), got {tuple(features.shape)}."
            raise ValueError(msg)
        bank = features.detach().contiguous()
        setattr(self, self._buffer_name(domain), bank)
        setattr(self, self._norm_buffer_name(domain), _bank_squared_norm(bank))

    def get(self, domain: str) -> torch.Tensor:
        """Return the stored bank of ``domain`` (``(0, 0)`` before anything was stored)."""
        self._check_domain(domain)
        return getattr(self, self._buffer_name(domain))

    def squared_norm(self, domain: str) -> torch.Tensor:
        """Return the cached squared row norms ``(rows,)`` of the bank of ``domain`` (a persistent buffer).

        Recomputed (block by block) if the bank was replaced without them, e.g. a buffer assigned directly.
        """
        bank = self.get(domain)
        norm = getattr(self, self._norm_buffer_name(domain))
        if norm.shape != (bank.shape[0],) or norm.dtype != bank.dtype or norm.device != bank.device:
            norm = _bank_squared_norm(bank)
            setattr(self, self._norm_buffer_name(domain), norm)
        return norm

    def has(self, domain: str) -> bool:
        """Whether the bank of ``domain`` holds at least one row."""
        return self.get(domain).shape[0] > 0

    def nearest(
        self, query: torch.Tensor, domain: str, k: int = 1, chunk_size: int = 2048
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact k nearest bank rows of each query row (chunked), as ``(distances, indices)`` ``(Q, k)``."""
        if not self.has(domain):
            msg = f"HypergraphMemoryBank.nearest: the {domain!r} bank is empty."
            raise RuntimeError(msg)
        bank = self.get(domain)
        return chunked_knn(
            query.to(bank.dtype), bank, k, chunk_size=chunk_size, reference_squared_norm=self.squared_norm(domain)
        )

    def extra_repr(self) -> str:
        """Bank sizes, e.g. ``source=(1200, 768), target=(784, 768)``."""
        return ", ".join(f"{domain}={tuple(self.get(domain).shape)}" for domain in self._domains)
