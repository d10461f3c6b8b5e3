"""A pre-processor that also understands cross-domain training batches.

Cross-domain datamodules train with ``{"source": ImageBatch, "target": ImageBatch}`` (Lightning combines the two
loaders). anomalib's :class:`~anomalib.pre_processing.PreProcessor` transforms one batch; this subclass transforms each
batch of such a dictionary and otherwise behaves exactly like its parent (exported graphs included).
"""

from __future__ import annotations

from typing import Any

from anomalib.pre_processing import PreProcessor
from lightning.pytorch import LightningModule, Trainer


class CrossDomainPreProcessor(PreProcessor):
    """anomalib ``PreProcessor`` whose training hook also accepts a dictionary of per-domain batches."""

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
