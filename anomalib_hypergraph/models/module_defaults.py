"""What both models set alike as anomalib modules: test metrics, post-processing, trainer arguments, learning type."""

from __future__ import annotations

from typing import Any

from anomalib import LearningType
from anomalib.metrics import AUPRO, Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor

AUPRO_FPR_LIMIT = 0.3


def protocol_evaluator() -> Evaluator:
    """Anomalib's default test metrics (image AUROC / F1, pixel AUROC / F1) plus pixel AU-PRO up to an FPR of 0.3.

    AU-PRO is what both papers report beside the AUROCs; anomalib's default evaluator leaves it out. Like anomalib's own
    pixel metrics it is skipped (``strict=False``) when a data set has no masks.
    """
    defaults = AnomalibModule.configure_evaluator()
    aupro = AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=AUPRO_FPR_LIMIT)
    return Evaluator(val_metrics=list(defaults.val_metrics), test_metrics=[*defaults.test_metrics, aupro])


class TrainedFewShotDefaults:
    """Mixin (before ``AnomalibModule`` in the bases) for few-shot models that ``Engine.fit`` must really train."""

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Anomalib's default test metrics plus pixel AU-PRO (FPR limit 0.3), as the papers report."""
        return protocol_evaluator()

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Anomalib's default one-class post-processing (normalisation and adaptive thresholds from validation)."""
        return PostProcessor()

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No trainer overrides: the user's ``--trainer.*`` flags are honoured as given."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """``ONE_CLASS``: trained on normal images only and (unlike ``FEW_SHOT``) really trained by ``Engine.fit``."""
        return LearningType.ONE_CLASS
