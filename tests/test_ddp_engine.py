"""HyperTrans under Lightning DDP end to end: 2 CPU processes (gloo) through anomalib's Engine, as
``anomalib train --model HyperTrans --trainer.strategy ddp --trainer.devices 2`` runs it.

What "the same as one process" can fairly mean:

- **Equality run** (``epochs_perturbation=0``): with no stage-1 epoch the adapters stay at their (identity)
  initialisation, so the banks depend only on the data: each rank embeds its shard, the banks are gathered and
  deduplicated by patch key, the coreset and stage 2 (HDR) are seeded and run on identical data on every rank. The
  banks, the rectified banks, the trained HGNN, the post-processing statistics and every test score must equal those of
  a single process (up to float round-off from other batch compositions).
- **Stage-1 run** (``epochs_perturbation=1``): under data parallelism each rank perturbs other images and DDP averages
  the gradients, so the adapters legitimately differ from a single process's; what must hold is that both ranks end
  with identical adapters, banks and HGNN (no rank drifts).

The DDP run is ``python -m tests.test_ddp_engine <dir> <data root> <category>`` in a subprocess (Lightning's ``ddp``
strategy relaunches that command for rank 1); each rank writes its state and test scores to ``<dir>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import distributed

from tests.conftest import TINY_IMAGE_SIZE, TINY_VIT_KWARGS

pytestmark = pytest.mark.skipif(
    not (distributed.is_available() and distributed.is_gloo_available()), reason="torch.distributed gloo backend"
)

REPOSITORY = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
MODEL_KWARGS = {
    "backbone": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": dict(TINY_VIT_KWARGS),
    "image_size": (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
    "epochs_rectification": 5,
    "coreset_sampling_ratio": 0.5,
    "num_neighbors": 4,
    "chunk_size": 256,
    "visualizer": False,
}
RUNS = {"equal": {"epochs_perturbation": 0}, "stage1": {"epochs_perturbation": 1}}
STATE_PREFIXES = ("model.memory_bank.", "model.rectified", "model.rectifier", "model.perturbation", "post_processor.")


def train_and_record(output: Path, data_root: Path, category: str, runs: list[str], devices: int) -> None:
    """Fit (and for the equality run, test) HyperTrans per run; every rank saves its state and test scores."""
    from anomalib.engine import Engine
    from lightning.pytorch import Callback

    from anomalib_hypergraph.data import MVTec3DCrossDomain
    from anomalib_hypergraph.models import HyperTrans

    class RecordTestScores(Callback):
        def __init__(self) -> None:
            self.scores: dict[str, float] = {}

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            for path, score in zip(outputs.image_path, outputs.pred_score, strict=True):
                self.scores[str(Path(path).resolve())] = float(score)

    for run in runs:
        torch.manual_seed(0)  # identical initial weights in every process (DDP also broadcasts rank 0's)
        model = HyperTrans(**MODEL_KWARGS, **RUNS[run])
        datamodule = MVTec3DCrossDomain(
            root=data_root,
            category=category,
            k_shot=1,
            train_batch_size=4,
            eval_batch_size=4,
            num_workers=0,
            cache_dir=data_root.parent / "cache",
        )
        scores = RecordTestScores()
        # Each rank gets its own root: after the first fit both ranks run this loop concurrently, and anomalib's
        # Engine creates the next versioned directory in every process (two ranks would race for the same "v0").
        rank_root = output / run / f"rank{os.environ.get('LOCAL_RANK', '0')}"
        engine = Engine(
            default_root_dir=rank_root,
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            max_epochs=3,
            logger=False,
            enable_progress_bar=False,
            callbacks=[scores],
        )
        engine.fit(model=model, datamodule=datamodule)
        rank = engine.trainer.global_rank
        state = {key: value for key, value in model.state_dict().items() if key.startswith(STATE_PREFIXES)}
        torch.save(state, output / f"{run}_state_rank{rank}.pt")
        if run == "equal":
            engine.test(model=model, datamodule=datamodule)
            (output / f"{run}_scores_rank{rank}.json").write_text(json.dumps(scores.scores))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path, synthetic_category: str) -> dict[str, Path]:
    """One single-process equality run (in this process) and the 2-rank DDP runs (subprocess)."""
    single = tmp_path_factory.mktemp("single_process")
    train_and_record(single, synthetic_root, synthetic_category, ["equal"], devices=1)  # also fills the depth cache
    ddp = tmp_path_factory.mktemp("ddp")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "tests.test_ddp_engine", str(ddp), str(synthetic_root), synthetic_category]
    result = subprocess.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {"single": single, "ddp": ddp}


def load_state(directory: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(directory / name, weights_only=True)


# Lightning's DistributedSampler pads the odd validation set by repeating one image, whose pixels then count twice
# in the pixel-level F1 curve: the adaptive pixel threshold of a DDP run legitimately differs from one process's
# whenever that image's pixels straddle the threshold (banks, image statistics and test scores stay equal).
PADDING_DEPENDENT = ("post_processor._pixel_threshold",)


def assert_states_close(actual: dict, expected: dict, atol: float, skip: tuple[str, ...] = ()) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        if key not in skip:
            torch.testing.assert_close(actual[key], value, atol=atol, rtol=0, msg=key)


def test_ddp_builds_the_single_process_banks_and_scores(runs: dict[str, Path]) -> None:
    expected = load_state(runs["single"], "equal_state_rank0.pt")
    assert expected["model.memory_bank.target_bank"].shape[0] == 8 * 64  # 1 shot x 8 views x 8 x 8 patches, no padding
    for rank in range(WORLD_SIZE):
        state = load_state(runs["ddp"], f"equal_state_rank{rank}.pt")
        assert_states_close(state, expected, atol=1e-5, skip=PADDING_DEPENDENT)
    expected_scores = json.loads((runs["single"] / "equal_scores_rank0.json").read_text())
    scores: dict[str, float] = {}
    for rank in range(WORLD_SIZE):  # each rank tested its shard (one image padded twice)
        scores.update(json.loads((runs["ddp"] / f"equal_scores_rank{rank}.json").read_text()))
    assert scores.keys() == expected_scores.keys()
    for path, score in expected_scores.items():
        assert scores[path] == pytest.approx(score, abs=1e-5), path


def test_ddp_ranks_stay_in_lockstep_through_stage_one(runs: dict[str, Path]) -> None:
    rank0 = load_state(runs["ddp"], "stage1_state_rank0.pt")
    rank1 = load_state(runs["ddp"], "stage1_state_rank1.pt")
    assert_states_close(rank1, rank0, atol=0)
    untrained = load_state(runs["ddp"], "equal_state_rank0.pt")
    adapters = [key for key in rank0 if key.startswith("model.perturbation")]
    assert adapters and any(not torch.equal(rank0[key], untrained[key]) for key in adapters), "stage 1 did not train"


if __name__ == "__main__":
    output_dir, data_root, category_name = sys.argv[1:4]
    torch.set_num_threads(1)
    train_and_record(Path(output_dir), Path(data_root), category_name, list(RUNS), devices=WORLD_SIZE)
