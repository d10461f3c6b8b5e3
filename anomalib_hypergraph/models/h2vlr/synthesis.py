"""Synthetic anomalies on the support shots: the masks H2VLR's objective needs from normal-only few-shot data.

Eq. 10-11 supervise node scores and the corrected map with defect masks, but a few-shot training set holds only
normal images. Every training step therefore pastes fresh Perlin-noise anomalies onto copies of the shots with
anomalib's :class:`~anomalib.data.utils.generators.perlin.PerlinAnomalyGenerator` (the DRAEM recipe: a thresholded,
rotated Perlin mask; inside it the image is blended with an augmented noise texture or an anomaly-source image).
Images are expected in [0, 1], before any normalisation.

Every draw is keyed by ``(seed, step, shot, copy)`` (:func:`~.seeding.seeded`): which anomaly a shot gets at a step
does not depend on torch's global generator, on the order in which the loader delivered the shots, nor on which
other shots share the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn

from .seeding import seeded


class SyntheticBatch(NamedTuple):
    """Training images with their masks, the shot each derives from, and whether it is an unmodified shot."""

    images: torch.Tensor
    masks: torch.Tensor
    shot_index: torch.Tensor
    clean: torch.Tensor


class SupportAnomalySynthesizer(nn.Module):
    """Shots + ``anomalies_per_shot`` synthetic-anomaly copies of each shot, with their masks.

    Args:
        anomalies_per_shot: synthetic copies per shot and step (ours: 1, so a step sees every shot clean and defective).
        anomaly_source_path: optional folder of texture images (e.g. DTD) blended into the masks; None = Perlin noise
            textures (no extra data needed).
        blend_factor: opacity range of the pasted texture (anomalib's default (0.2, 1.0)).
        seed: the model's seed; the generator's own construction-time draw (its solarisation threshold) and every
            anomaly derive from it.

    """

    def __init__(
        self,
        anomalies_per_shot: int = 1,
        anomaly_source_path: str | Path | None = None,
        blend_factor: tuple[float, float] = (0.2, 1.0),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if anomalies_per_shot < 1:
            msg = f"anomalies_per_shot must be >= 1, got {anomalies_per_shot}."
            raise ValueError(msg)
        if anomaly_source_path is not None and not Path(anomaly_source_path).is_dir():
            msg = f"anomaly_source_path must be a folder of images, got {anomaly_source_path!r} (not a folder)."
            raise ValueError(msg)
        self.anomalies_per_shot = anomalies_per_shot
        self.seed = seed
        # probability=1: every copy gets an anomaly (the generator retries until its mask is non-empty).
        with seeded(seed, "anomaly generator"):  # its augmenters draw a solarisation threshold when built
            self.generator = PerlinAnomalyGenerator(
                anomaly_source_path=anomaly_source_path, probability=1.0, blend_factor=tuple(blend_factor)
            )

    @torch.no_grad()
    def forward(self, shots: torch.Tensor, shot_index: torch.Tensor, step: int = 0) -> SyntheticBatch:
        """Build the training batch of optimisation step ``step`` from shots ``(k, 3, H, W)`` in [0, 1].

        Args:
            shots: the step's shots.
            shot_index: ``(k,)`` their positions in the support set (the key of their anomalies).
            step: optimisation step (the other part of the key).

        """
        anomalous, masks = [], []
        for copy in range(self.anomalies_per_shot):
            for image, shot in zip(shots, shot_index.tolist(), strict=True):
                with seeded(self.seed, "anomaly", step, shot, copy, device=shots.device):
                    pasted, mask = self.generator(image.unsqueeze(0))
                anomalous.append(pasted)
                masks.append(mask)
        copies = torch.cat(anomalous).clamp(0.0, 1.0)
        masks = torch.cat(masks)
        clean_masks = torch.zeros_like(masks[: shots.shape[0]])
        return SyntheticBatch(
            images=torch.cat([shots, copies]),
            masks=torch.cat([clean_masks, (masks > 0.5).to(shots.dtype)]),
            shot_index=torch.cat([shot_index, shot_index.repeat(self.anomalies_per_shot)]),
            clean=torch.cat(
                [
                    torch.ones(shots.shape[0], dtype=torch.bool, device=shots.device),
                    torch.zeros(copies.shape[0], dtype=torch.bool, device=shots.device),
                ]
            ),
        )
