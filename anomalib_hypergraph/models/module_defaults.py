"""What both models set alike as anomalib modules: test metrics, post-processing, trainer arguments, learning type."""

from __future__ import annotations

from typing import Any

from anomalib import LearningType
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.post_processing import PostProcessor

AUPRO_FPR_LIMIT = 0.3


def protocol_evaluator() -> Evaluator:
    """Image AUROC / F1, pixel AUROC / F1 (anomalib's defaults) and pixel AU-PRO up to a false-positive rate of 0.3.

    AU-PRO is what both papers report beside the AUROCs; anomalib's default evaluator leaves it out. Pixel metrics are
    skipped (``strict=False``) when a data set has no masks, as anomalib's own pixel metrics are.
    """
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=AUPRO_FPR_LIMIT),
        ]
    )


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
