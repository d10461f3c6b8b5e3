"""``predict`` reads and writes what a user expects: the images as training read them, nothing of a training run lost.

The fixture trains a tiny HyperTrans on a folder of 16-bit depth PNGs (``FewShot`` of an anomalib ``Folder``, as
README suggests for depth sensors) with the post-processor off, so the scores compared are the raw ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from PIL import Image

from anomalib_hypergraph.data import FewShot
from anomalib_hypergraph.models import HyperTrans
from tests.conftest import TINY_IMAGE_SIZE

DEPTH_BASE = 20_000  # 16-bit depth values, far above 255: anomalib's read_image saturates every pixel
DEPTH_RANGE = 20_000


def _depth_image(rng: np.random.Generator, defect: bool) -> np.ndarray:
    """A tilted 16-bit depth surface with sensor noise; a defect is a raised square."""
    rows, columns = np.mgrid[0:TINY_IMAGE_SIZE, 0:TINY_IMAGE_SIZE] / TINY_IMAGE_SIZE
    surface = DEPTH_BASE + DEPTH_RANGE * (0.6 * rows + 0.3 * columns) + rng.normal(0, 300, rows.shape)
    if defect:
        top, left = rng.integers(8, TINY_IMAGE_SIZE - 24, size=2)
        surface[top : top + 16, left : left + 16] += DEPTH_RANGE * 0.8
    return np.clip(surface, 0, 65535).astype(np.uint16)


def write_depth_folder(root: Path, normal: int = 7, abnormal: int = 3, seed: int = 0) -> Path:
    """``root/good`` and ``root/bad`` of 16-bit grayscale PNGs (PIL mode ``I;16``)."""
    rng = np.random.default_rng(seed)
    for folder, count in (("good", normal), ("bad", abnormal)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(_depth_image(rng, defect=folder == "bad")).save(root / folder / f"{index:03d}.png")
    return root


def depth_datamodule(root: Path) -> FewShot:
    folder = Folder(
        name=root.name,
        root=root,
        normal_dir="good",
        abnormal_dir="bad",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )
    return FewShot(folder, k_shot=2)


def scores_by_path(predictions: list) -> dict[str, float]:
    return {
        str(Path(path).resolve()): float(score)
        for batch in predictions
        for path, score in zip(batch.image_path, batch.pred_score, strict=True)
    }


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory: pytest.TempPathFactory, tiny_hypertrans_kwargs: dict) -> dict:
    """HyperTrans trained by Engine.fit on 2 shots of 16-bit depth PNGs; its checkpoint and options."""
    root = write_depth_folder(tmp_path_factory.mktemp("depth") / "depth_camera")
    kwargs = {**tiny_hypertrans_kwargs, "epochs_rectification": 2, "post_processor": False}
    torch.manual_seed(0)
    datamodule = depth_datamodule(root)
    engine = Engine(default_root_dir=tmp_path_factory.mktemp("runs"), accelerator="cpu", devices=1, logger=False)
    engine.fit(model=HyperTrans(**kwargs), datamodule=datamodule)
    checkpoint = Path(engine.trainer.checkpoint_callback.best_model_path)
    assert checkpoint.is_file()
    return {"root": root, "kwargs": kwargs, "checkpoint": checkpoint, "datamodule": datamodule, "engine": engine}


# ------------------------------------------------------------------------------------------------- 16-bit input
def test_predicting_a_folder_of_16_bit_pngs_scores_as_the_test_loader(
    depth_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    datamodule = depth_run["datamodule"]
    engine = Engine(default_root_dir=tmp_path / "test_loader", accelerator="cpu", devices=1, logger=False)
    expected = scores_by_path(
        engine.predict(
            model=HyperTrans(**depth_run["kwargs"]),
            dataloaders=datamodule.test_dataloader(),
            ckpt_path=depth_run["checkpoint"],
        )
    )
    engine = Engine(default_root_dir=tmp_path / "folder", accelerator="cpu", devices=1, logger=False)
    with caplog.at_level(logging.INFO, logger="anomalib_hypergraph"):
        actual = scores_by_path(
            engine.predict(
                model=HyperTrans(**depth_run["kwargs"]), data_path=depth_run["root"], ckpt_path=depth_run["checkpoint"]
            )
        )
    assert set(expected) < set(actual)  # the folder holds the test images and the training images
    for path, score in expected.items():
        assert actual[path] == pytest.approx(score, abs=1e-5), path
    normal = [score for path, score in expected.items() if "/good/" in path]
    abnormal = [score for path, score in expected.items() if "/bad/" in path]
    assert max(normal) < min(abnormal)  # the scores are not all the same saturated value
    assert "10 of 10 predict images" in caplog.text and "read at full range" in caplog.text


def test_a_truncated_png_in_a_predict_folder_is_named_before_anything_is_predicted(
    depth_run: dict, tmp_path: Path
) -> None:
    folder = tmp_path / "to_predict"
    folder.mkdir()
    for index, source in enumerate(sorted((depth_run["root"] / "bad").glob("*.png"))):
        (folder / f"{index:03d}.png").write_bytes(source.read_bytes())
    truncated = folder / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:400])
    engine = Engine(default_root_dir=tmp_path / "out", accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match=rf"Cannot read image '{truncated}'.*truncated"):
        engine.predict(model=HyperTrans(**depth_run["kwargs"]), data_path=folder, ckpt_path=depth_run["checkpoint"])


# ------------------------------------------------------------------------------------------- output folders
def test_predicting_into_a_training_run_is_refused_before_anything_is_written(depth_run: dict) -> None:
    """anomalib predicts into <root>/<model>/<data>/<category>/latest: with the training root, the training run."""
    run_folder = depth_run["checkpoint"].parents[2]
    before = sorted(path.relative_to(run_folder) for path in run_folder.rglob("*"))
    engine = Engine(
        default_root_dir=run_folder.parents[2], accelerator="cpu", devices=1, logger=False
    )  # the training root
    model = HyperTrans(**{**depth_run["kwargs"], "visualizer": True})
    with pytest.raises(RuntimeError, match=rf"predict would write into '{run_folder}', the folder of a training run"):
        engine.predict(model=model, datamodule=depth_datamodule(depth_run["root"]), ckpt_path=depth_run["checkpoint"])
    assert sorted(path.relative_to(run_folder) for path in run_folder.rglob("*")) == before  # no images/ written


def test_predicting_after_fitting_with_the_same_engine_still_writes_into_its_run(depth_run: dict) -> None:
    engine = depth_run["engine"]  # the engine that trained: its trainer wrote the run's checkpoint
    predictions = engine.predict(model=engine.model, datamodule=depth_run["datamodule"])
    assert scores_by_path(predictions)
