"""H2VLR under anomalib's Engine and the stock CLI: k seeded shots, real training, checkpoints, predict, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models import Patchcore, get_model
from lightning.pytorch import Callback
from PIL import Image

from anomalib_hypergraph.data import CrossDomainDataModule, FewShot, select_shots
from anomalib_hypergraph.models import H2VLR
from anomalib_hypergraph.models.h2vlr.vocabulary import GENERIC_DEFECT_STATES
from tests.test_h2vlr_components import TINY_CLIP, TINY_CLIP_CONFIG, TINY_IMAGE_SIZE, TINY_MODEL_KWARGS

ANOMALIB = Path(sys.executable).parent / "anomalib"
NUM_TRAIN = 5


class CollectScores(Callback):
    """Records the post-processed image scores of test and predict batches by image path."""

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}

    def _collect(self, outputs: object) -> None:
        for path, score in zip(outputs.image_path, outputs.pred_score, strict=True):
            self.scores[str(Path(path).resolve())] = float(score)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)


def write_mvtec_layout(root: Path, category: str = "bottle") -> Path:
    """A tiny MVTec AD-style category: textured normal images, bright square defects with masks."""
    rng = np.random.default_rng(0)

    def image(defect: bool) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.full((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), 110, np.uint8)
        pixels += rng.integers(0, 30, pixels.shape, dtype=np.uint8)
        mask = np.zeros(pixels.shape[:2], np.uint8)
        if defect:
            top, left = rng.integers(8, TINY_IMAGE_SIZE - 18, 2)
            pixels[top : top + 12, left : left + 12] = (250, 40, 40)
            mask[top : top + 12, left : left + 12] = 255
        return pixels, mask

    for split, label, count in (("train", "good", NUM_TRAIN), ("test", "good", 3), ("test", "broken_large", 3)):
        folder = root / category / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels, mask = image(defect=label != "good")
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
            if label != "good":
                mask_folder = root / category / "ground_truth" / label
                mask_folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(mask_folder / f"{index:03d}_mask.png")
    return root


def mvtec(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="bottle", train_batch_size=8, eval_batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mvtec_layout(tmp_path_factory.mktemp("h2vlr_mvtec"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mvtec_root: Path) -> dict:
    """H2VLR (k_shot=2, 3 epochs) trained by Engine.fit on the tiny MVTec layout, then tested."""
    torch.manual_seed(0)
    model = H2VLR(k_shot=2, epochs=3, visualizer=False, **TINY_MODEL_KWARGS)
    initial = {name: value.detach().clone() for name, value in model.named_parameters() if value.requires_grad}
    scores = CollectScores()
    workdir = tmp_path_factory.mktemp("h2vlr_engine")
    engine = Engine(
        default_root_dir=workdir, accelerator="cpu", devices=1, max_epochs=6, callbacks=[scores], logger=False
    )
    datamodule = mvtec(mvtec_root)
    engine.fit(model=model, datamodule=datamodule)
    fit_metrics = dict(engine.trainer.callback_metrics)
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    return {
        "model": model,
        "engine": engine,
        "datamodule": datamodule,
        "initial": initial,
        "fit_metrics": fit_metrics,
        "metrics": metrics,
        "test_scores": dict(scores.scores),
    }


def checkpoint_of(engine: Engine) -> str:
    callback = engine.trainer.checkpoint_callback
    path = callback.best_model_path or callback.last_model_path
    assert path and Path(path).is_file()
    return path


def test_fit_trains_on_exactly_the_k_seeded_shots(trained: dict, mvtec_root: Path) -> None:
    model: H2VLR = trained["model"]
    train_paths = sorted(str(path) for path in (mvtec_root / "bottle" / "train" / "good").glob("*.png"))
    expected = [train_paths[index] for index in select_shots(train_paths, 2, strategy="random", seed=0)]
    assert model.shots == expected
    assert len(trained["datamodule"].train_data) == 2
    assert model.model.support_gallery.shape == (2, 2 * 64, 48)  # 2 gallery blocks, 2 shots x 8 x 8 patches, W=48
    assert model.model.class_name == "bottle"
    assert trained["engine"].trainer.current_epoch == 3  # the model stopped itself after `epochs`
    assert trained["engine"].trainer.global_step == 3  # one step per epoch: the whole support set
    changed = [name for name, value in model.named_parameters() if name in trained["initial"]]
    assert any(not torch.equal(dict(model.named_parameters())[name], trained["initial"][name]) for name in changed)
    assert "train/loss" in trained["fit_metrics"]
    assert "train/loss_structural" in trained["fit_metrics"]


def test_test_metrics_are_reported(trained: dict) -> None:
    metrics = trained["metrics"]
    assert 0.0 <= metrics["image_AUROC"] <= 1.0
    assert 0.0 <= metrics["pixel_AUROC"] <= 1.0
    assert 0.0 <= metrics["pixel_AUPRO"] <= 1.0  # the papers' protocol metric, beside anomalib's default four
    assert len(trained["test_scores"]) == 6


def test_predict_on_a_folder_reproduces_test_scores(trained: dict, mvtec_root: Path, tmp_path: Path) -> None:
    checkpoint = checkpoint_of(trained["engine"])
    fresh = H2VLR(visualizer=False, **TINY_MODEL_KWARGS)  # default class name: the checkpoint restores 'bottle'
    collect = CollectScores()
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, callbacks=[collect], logger=False)
    engine.predict(model=fresh, data_path=mvtec_root / "bottle" / "test" / "broken_large", ckpt_path=checkpoint)
    assert len(collect.scores) == 3
    for path, score in collect.scores.items():
        assert score == pytest.approx(trained["test_scores"][path], abs=1e-5)
    assert fresh.model.class_name == "bottle"


def test_checkpoint_round_trip_gives_identical_scores(trained: dict) -> None:
    restored = H2VLR.load_from_checkpoint(checkpoint_of(trained["engine"]), visualizer=False)
    original: H2VLR = trained["model"]
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    original.eval()
    restored.eval()
    with torch.no_grad():
        expected, actual = original.model(images), restored.model(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=1e-7)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-7)
    torch.testing.assert_close(restored.model.prompt_embeddings, original.model.prompt_embeddings, rtol=0, atol=0)
    assert restored.shots == original.shots


def test_checkpoint_leaves_out_clip_weights_that_come_from_a_file(mvtec_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = H2VLR(visualizer=False, **TINY_MODEL_KWARGS)
    weights_file = tmp_path / "clip.pt"
    torch.save(reference.model.backbone.clip.state_dict(), weights_file)
    model = H2VLR(k_shot=1, epochs=1, visualizer=False, **{**TINY_MODEL_KWARGS, "pretrained_weights": weights_file})
    engine = Engine(default_root_dir=tmp_path / "run", accelerator="cpu", devices=1, max_epochs=1, logger=False)
    engine.fit(model=model, datamodule=mvtec(mvtec_root))
    checkpoint_path = checkpoint_of(engine)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if key.startswith("model.backbone.clip.")]
    assert checkpoint["h2vlr"]["backbone_source"] == str(weights_file)

    restored = H2VLR.load_from_checkpoint(checkpoint_path, visualizer=False)  # rebuilt from the same file
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(4))
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.model(images).pred_score, model.model(images).pred_score, rtol=0, atol=0)
    torch.save(H2VLR(visualizer=False, seed=1, **TINY_MODEL_KWARGS).model.backbone.clip.state_dict(), weights_file)
    with pytest.raises(ValueError, match="built with other weights"):
        H2VLR.load_from_checkpoint(checkpoint_path, visualizer=False)


@pytest.mark.parametrize("k_shot", [1, 2, 4])
def test_training_is_reproducible_from_the_seeds(k_shot: int, mvtec_root: Path, tmp_path: Path) -> None:
    """Torch's global seed and the loader's shuffling and batch size do not matter: only `seed` does."""
    results = []
    for run, train_batch_size in enumerate((8, 3)):
        torch.manual_seed(run)  # the global generator (and with it the loader's shuffling) differs between runs
        model = H2VLR(k_shot=k_shot, epochs=2, visualizer=False, **TINY_MODEL_KWARGS)
        engine = Engine(default_root_dir=tmp_path / str(run), accelerator="cpu", devices=1, logger=False, max_epochs=2)
        datamodule = MVTecAD(
            root=mvtec_root, category="bottle", train_batch_size=train_batch_size, eval_batch_size=4, num_workers=0
        )
        engine.fit(model=model, datamodule=datamodule)
        assert engine.trainer.global_step == 2  # one step per epoch: the support set fits batch_size
        trained = {
            name: value.detach().clone() for name, value in model.model.named_parameters() if value.requires_grad
        }
        results.append((model.model.prompt_embeddings.clone(), trained))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, rtol=0, atol=0, msg=name)


def test_checkpoint_of_another_model_is_refused() -> None:
    patchcore = Patchcore(backbone="resnet18", pre_trained=False, layers=("layer1",))
    model = H2VLR(visualizer=False, **TINY_MODEL_KWARGS)
    with pytest.raises(ValueError, match="not written by H2VLR"):
        model.on_load_checkpoint({"state_dict": patchcore.state_dict(), "hyper_parameters": {}})


def test_an_input_size_too_small_for_the_blur_is_refused_at_construction() -> None:
    """A 16 px CLIP gives 16 px maps; sigma 4 blurs with a 33-pixel kernel whose reflected border needs 17 px."""
    vision = {**TINY_CLIP_CONFIG["vision_cfg"], "image_size": 16, "patch_size": 4}  # 4 x 4 patches
    small_clip = {**TINY_CLIP_CONFIG, "vision_cfg": vision}
    kwargs = {**TINY_MODEL_KWARGS, "backbone": f"{TINY_CLIP}-16px", "backbone_config": small_clip}
    with pytest.raises(ValueError, match=r"image_size \(16, 16\) is too small .* sigma=4.0 .* 33-pixel kernel"):
        H2VLR(visualizer=False, **kwargs)
    model = H2VLR(visualizer=False, sigma=1.0, **kwargs)  # a 9-pixel kernel fits
    assert model.model.blur(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_get_model_resolves_the_short_name() -> None:
    assert isinstance(get_model("H2VLR", **TINY_MODEL_KWARGS), H2VLR)


def test_validate_and_export_match_the_torch_model(trained: dict, tmp_path: Path) -> None:
    engine: Engine = trained["engine"]
    model: H2VLR = trained["model"]
    model.post_processor.image_min.fill_(float("nan"))
    engine.validate(model=model, datamodule=trained["datamodule"])
    assert torch.isfinite(model.post_processor.image_min), "validation did not feed the normalisation statistics"
    model.eval()
    images = torch.rand(3, 3, 80, 96, generator=torch.Generator().manual_seed(2))  # resized by the pre-processor
    with torch.no_grad():
        expected = model(images)

    # as `anomalib export --ckpt_path` does: the model is rebuilt from the checkpoint alone
    torch_file = engine.export(
        model=model, export_type=ExportType.TORCH, export_root=tmp_path, ckpt_path=checkpoint_of(engine)
    )
    exported = torch.load(torch_file, weights_only=False)["model"]
    with torch.no_grad():
        reloaded = exported(images)
    torch.testing.assert_close(reloaded.pred_score, expected.pred_score, rtol=0, atol=1e-6)

    onnxruntime = pytest.importorskip("onnxruntime")
    onnx_file = engine.export(model=model, export_type=ExportType.ONNX, export_root=tmp_path)
    session = onnxruntime.InferenceSession(str(onnx_file))
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    torch.testing.assert_close(torch.from_numpy(outputs["pred_score"]), expected.pred_score, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(outputs["anomaly_map"]), expected.anomaly_map, atol=1e-4, rtol=0)

    openvino = pytest.importorskip("openvino")  # the OpenVINO export converts this ONNX graph
    compiled = openvino.Core().compile_model(openvino.convert_model(str(onnx_file)), "CPU")
    result = compiled(images.numpy())
    scores = next(result[port] for port in compiled.outputs if "pred_score" in port.get_names())
    torch.testing.assert_close(torch.from_numpy(np.asarray(scores)), expected.pred_score, atol=1e-4, rtol=0)


def test_few_shot_folder_trains_with_generic_prompts(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    for split, count in (("good", 4), ("bad", 2)):
        (tmp_path / split).mkdir()
        for index in range(count):
            pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / split / f"{index:03d}.png")
    folder = Folder(name="toy", root=tmp_path, normal_dir="good", abnormal_dir="bad", num_workers=0, eval_batch_size=2)
    datamodule = FewShot(datamodule=folder, k_shot=2, seed=0)
    model = H2VLR(epochs=1, visualizer=False, **TINY_MODEL_KWARGS)
    engine = Engine(default_root_dir=tmp_path / "run", accelerator="cpu", devices=1, max_epochs=1, logger=False)
    (metrics,) = engine.train(model=model, datamodule=datamodule)
    assert "image_AUROC" in metrics
    assert model.shots == datamodule.shots
    assert model.model.class_name == "object"
    generic = {state.format("object") for state in GENERIC_DEFECT_STATES}
    assert generic <= {
        text.removeprefix("a photo of a ").removesuffix(".") for text in model.model.prompts.prompt_texts
    }

    conflicting = H2VLR(k_shot=1, epochs=1, visualizer=False, **TINY_MODEL_KWARGS)
    with pytest.raises(ValueError, match="already selects k_shot=2"):
        Engine(default_root_dir=tmp_path / "conflict", accelerator="cpu", devices=1, logger=False).fit(
            model=conflicting, datamodule=FewShot(datamodule=folder, k_shot=2, seed=0)
        )


def test_cross_domain_datamodule_trains_on_the_target_shots_only(tmp_path: Path, mvtec_root: Path) -> None:
    source = write_mvtec_layout(tmp_path / "source")  # other files: its images are never used
    datamodule = CrossDomainDataModule(
        source=mvtec(source), target=mvtec(mvtec_root), k_shot=1, train_batch_size=2, eval_batch_size=4
    )
    model = H2VLR(epochs=2, visualizer=False, **TINY_MODEL_KWARGS)
    engine = Engine(default_root_dir=tmp_path / "run", accelerator="cpu", devices=1, max_epochs=4, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    assert model.shots == datamodule.shots
    assert all(str(mvtec_root) in path for path in model.shots)
    assert len(datamodule.source_train_data) == NUM_TRAIN  # 3 source batches per epoch, all skipped
    assert engine.trainer.global_step == 2  # one step per epoch: one pass over the single target batch


@pytest.mark.skipif(not ANOMALIB.exists(), reason="the anomalib console script is not installed")
def test_stock_cli_trains_on_the_logged_shots(mvtec_root: Path, tmp_path: Path) -> None:
    # One run (the CLI pays ~12 s of imports); predict from a checkpoint is covered through Engine.predict above.
    model_arguments = [
        "--model",
        "H2VLR",
        "--model.backbone",
        TINY_CLIP,
        "--model.backbone_config",
        json.dumps(TINY_CLIP_CONFIG),
        "--model.pretrained",
        "false",
        "--model.gallery_layers",
        "[0, 1]",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

    def run(arguments: list[str]) -> subprocess.CompletedProcess:
        command = [str(ANOMALIB), *arguments]
        return subprocess.run(
            command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600, check=False
        )

    train = run(
        [
            "train",
            *model_arguments,
            "--model.k_shot",
            "1",
            "--model.epochs",
            "2",
            "--data",
            "MVTecAD",
            "--data.root",
            str(mvtec_root),
            "--data.category",
            "bottle",
            "--data.num_workers",
            "0",
            "--trainer.logger",
            "false",
            "--default_root_dir",
            str(tmp_path / "results"),
        ]
    )
    assert train.returncode == 0, train.stderr[-4000:]
    output = train.stdout + train.stderr
    assert "image_AUROC" in output
    assert f"training on 1 of the {NUM_TRAIN} training images" in output
    checkpoints = sorted((tmp_path / "results").rglob("*.ckpt"))
    assert checkpoints, f"no checkpoint written; stderr:\n{train.stderr[-3000:]}"
