"""The cross-domain batch contract, shared by the datamodules (``data/``) and the models (``models/``).

A cross-domain datamodule (:class:`~anomalib_hypergraph.data.CrossDomainDataModule` and its subclasses) returns
``{SOURCE: DataLoader, TARGET: DataLoader}`` from ``train_dataloader()``; Lightning combines the two loaders (cycling
the short target loader), so a training step receives ``{SOURCE: ImageBatch, TARGET: ImageBatch}``. Validation, test
and prediction batches are plain target-domain batches. A single-domain datamodule (e.g. ``FewShot``) trains with
plain batches, which count as target shots.

Paired shots (the sensor-upgrade case: the first parts are captured by both sensors). A datamodule that pairs its
target shots adds a third loader, ``PAIRED_SOURCE``: the source-domain captures of the target shots, in the same order
and with the same batch size as the ``TARGET`` loader (neither is shuffled), so that in every training step
``batch[PAIRED_SOURCE]`` row ``i`` is the pixel-aligned source-sensor image of ``batch[TARGET]`` row ``i``.

- :data:`SOURCE`, :data:`TARGET`: the two domain keys (also the names of a model's per-domain memory banks);
- :data:`PAIRED_SOURCE`: the key of the paired source captures of the target shots;
- :func:`split_domains`: ``(source, target)`` of a training batch of either kind;
- :func:`paired_source`: the paired source captures of a training batch's target shots, or ``None``;
- :class:`CrossDomainPreProcessor`: anomalib's pre-processor, extended to transform each batch of such a dictionary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anomalib.pre_processing import PreProcessor

if TYPE_CHECKING:
    from anomalib.data import Batch
    from lightning.pytorch import LightningModule, Trainer

SOURCE = "source"
TARGET = "target"
PAIRED_SOURCE = "paired_source"


def split_domains(batch: Batch | dict[str, Batch]) -> tuple[Batch | None, Batch]:
    """(source, target) batches of a training step; a plain single-domain batch counts as target shots.

    Raises:
        KeyError: A dictionary batch without a :data:`TARGET` entry (the message lists the keys found).

    """
    if isinstance(batch, dict):
        if TARGET not in batch:
            msg = f"Cross-domain training batches need a '{TARGET}' entry, got keys {sorted(batch)}."
            raise KeyError(msg)
        return batch.get(SOURCE), batch[TARGET]
    return None, batch


def paired_source(batch: Batch | dict[str, Batch]) -> Batch | None:
    """Return the source captures of a training batch's target shots (row ``i`` pairs target row ``i``), or ``None``.

    Raises:
        ValueError: The paired batch does not hold one image per target shot (the loaders are out of step).

    """
    if not isinstance(batch, dict) or batch.get(PAIRED_SOURCE) is None:
        return None
    pairs, target = batch[PAIRED_SOURCE], batch[TARGET]
    if len(pairs.image) != len(target.image):
        msg = (
            f"Paired training batch out of step: {len(target.image)} target shots but {len(pairs.image)} paired "
            f"source images; the '{TARGET}' and '{PAIRED_SOURCE}' loaders must have the same length and order."
        )
        raise ValueError(msg)
    return pairs


class CrossDomainPreProcessor(PreProcessor):
    """anomalib ``PreProcessor`` whose training hook also accepts a dictionary of per-domain batches.

    anomalib's :class:`~anomalib.pre_processing.PreProcessor` transforms one batch; this subclass transforms each
    batch of a ``{domain: batch}`` dictionary and otherwise behaves exactly like its parent (exported graphs included).
    """

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Transform every batch of a ``{domain: batch}`` dictionary, or the batch itself."""
        batches = batch.values() if isinstance(batch, dict) else [batch]
        for domain_batch in batches:
            super().on_train_batch_start(trainer, pl_module, domain_batch, batch_idx)

    @classmethod
    def from_pre_processor(cls, pre_processor: PreProcessor) -> CrossDomainPreProcessor:
        """Wrap the same transform in a pre-processor that accepts cross-domain batches."""
        if isinstance(pre_processor, cls):
            return pre_processor
        return cls(transform=pre_processor.transform)
