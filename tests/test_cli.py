"""The stock ``anomalib`` executable resolves ``--model HyperTrans`` (start-up hook), trains and predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_IMAGE_SIZE, TINY_VIT_KWARGS

ANOMALIB = Path(sys.executable).parent / "anomalib"

pytestmark = pytest.mark.skipif(not ANOMALIB.exists(), reason="the anomalib console script is not installed")


def run(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(arguments, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, check=False)


def model_arguments() -> list[str]:
    return [
        "--model",
        "HyperTrans",
        "--model.backbone",
        "vit_tiny_patch16_224",
        "--model.pretrained",
        "false",
        "--model.model_kwargs",
        json.dumps(TINY_VIT_KWARGS),
        "--model.image_size",
        f"[{TINY_IMAGE_SIZE}, {TINY_IMAGE_SIZE}]",
        "--model.epochs_perturbation",
        "1",
        "--model.epochs_rectification",
        "3",
        "--model.num_neighbors",
        "4",
    ]


def test_start_up_hook_only_loads_the_plugin_for_the_anomalib_command() -> None:
    probe = "import sys; print('anomalib_hypergraph' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_train_then_predict_with_the_stock_command_never_into_the_training_run(
    tmp_path: Path,
    synthetic_root: Path,
    synthetic_category: str,
) -> None:
    data_arguments = [
        "--data",
        "anomalib_hypergraph.data.MVTec3DCrossDomain",
        "--data.root",
        str(synthetic_root),
        "--data.category",
        synthetic_category,
        "--data.num_workers",
        "0",
        "--data.cache_dir",
        str(tmp_path / "cache"),
    ]
    train = run(
        [
            str(ANOMALIB),
            "train",
            *model_arguments(),
            *data_arguments,
            "--trainer.max_epochs",
            "2",
            "--trainer.logger",
            "false",
            "--default_root_dir",
            str(tmp_path / "results"),
        ],
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-4000:]
    checkpoints = sorted((tmp_path / "results").rglob("*.ckpt"))
    assert checkpoints, f"no checkpoint written; stderr:\n{train.stderr[-3000:]}"
    assert "image_AUROC" in train.stdout + train.stderr

    depth_folder = next((tmp_path / "cache").rglob("test/*/depth"))
    predict = run(
        [
            str(ANOMALIB),
            "predict",
            *model_arguments(),
            "--ckpt_path",
            str(checkpoints[-1]),
            "--data",
            str(depth_folder),
            "--default_root_dir",
            str(tmp_path / "predict"),
        ],
        cwd=tmp_path,
    )
    assert predict.returncode == 0, predict.stderr[-4000:]
    written = sorted(path.name for path in (tmp_path / "predict").rglob("*.png"))
    expected = sorted(path.name for path in depth_folder.glob("*.png"))
    assert expected
    assert set(expected) <= set(written), f"missing visualisations: {set(expected) - set(written)}"

    # With the training datamodule and root, anomalib would predict into the training run (.../latest): refused
    # before its config.yaml or any of its files is replaced.
    run_folder = checkpoints[-1].parents[2]
    files = {path: path.read_bytes() for path in run_folder.rglob("*") if path.is_file()}
    assert run_folder / "config.yaml" in files
    into_run = run(
        [
            str(ANOMALIB),
            "predict",
            *model_arguments(),
            "--ckpt_path",
            str(checkpoints[-1]),
            *data_arguments,
            "--default_root_dir",
            str(tmp_path / "results"),
        ],
        cwd=tmp_path,
    )
    assert into_run.returncode != 0
    expected = f"predict would write into '{run_folder}', the folder of a training run"
    assert "".join(expected.split()) in "".join(into_run.stderr.split())  # the log wraps long lines
    assert {path: path.read_bytes() for path in run_folder.rglob("*") if path.is_file()} == files
