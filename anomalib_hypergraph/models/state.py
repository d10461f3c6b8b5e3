"""State that checkpoints written before it existed lack: loaded as constructed, not reported as missing."""

from __future__ import annotations

from typing import Any, ClassVar


class DefaultedState:
    """Mixin for ``nn.Module`` subclasses whose newer buffers older checkpoints do not hold.

    The buffers named in :attr:`defaulted_state` keep their construction value when a state dict lacks them (their
    construction value must mean "not used", e.g. an empty map or a zero switch), and
    :meth:`recomputed_state_keys` tells :class:`~anomalib_hypergraph.models.checkpoints.CheckpointGuard` not to count
    them as missing. Put the mixin before ``nn.Module`` in the bases.
    """

    defaulted_state: ClassVar[tuple[str, ...]] = ()

    def recomputed_state_keys(self) -> tuple[str, ...]:
        """State entries (relative to this module) a state dict may lack."""
        return self.defaulted_state

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self.defaulted_state:
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
