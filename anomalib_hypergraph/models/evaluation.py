"""The test metrics of both models: anomalib's default four plus AU-PRO, the papers' evaluation protocol."""

from __future__ import annotations

from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score

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
