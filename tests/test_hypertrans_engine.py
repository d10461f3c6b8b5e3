"""HyperTrans under anomalib's Engine: both stages really train, checkpoints round-trip, predict == test."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models import Patchcore, get_model
from lightning.pytorch import Callback
from PIL import Image

from anomalib_hypergraph.data import CrossDomainDataModule, FewShot, MVTec3DCrossDomain
from anomalib_hypergraph.models import HyperTrans
from anomalib_hypergraph.models.hypertrans.denoising import NoiseStatistics, choose_blur, gaussian_kernel
from tests.test_cross_domain import folder_camera


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


def make_datamodule(root: Path, category: str, **kwargs: object) -> MVTec3DCrossDomain:
    return MVTec3DCrossDomain(
        root=root,
        category=category,
        **{"k_shot": 1, **kwargs},
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        cache_dir=root.parent / "cache",
    )


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    synthetic_root: Path,
    synthetic_category: str,
    tiny_hypertrans_kwargs: dict,
):
    """A HyperTrans trained by Engine.fit on the synthetic RGB -> depth data, plus its initial adapter weights.

    The datamodule pairs the shot with its RGB capture, and the source bank is translated (the direction forced, so
    that HDR can join the banks); HDR is asked for on the translated bank (off by default) so that both stages train
    under the Engine. The other direction has its own test below.
    """
    torch.manual_seed(0)
    workdir = tmp_path_factory.mktemp("engine")
    kwargs = {**tiny_hypertrans_kwargs, "rectify_translated_source": True, "translation_direction": "bank"}
    model = HyperTrans(**kwargs)
    initial_adapters = {k: v.clone() for k, v in model.model.perturbation.state_dict().items()}
    initial_rectifier = {k: v.clone() for k, v in model.model.rectifier.state_dict().items()}
    datamodule = make_datamodule(synthetic_root, synthetic_category)
    scores = CollectScores()
    engine = Engine(
        default_root_dir=workdir, accelerator="cpu", devices=1, max_epochs=5, callbacks=[scores], logger=False
    )
    engine.fit(model=model, datamodule=datamodule)
    fit_metrics = dict(engine.trainer.callback_metrics)  # engine.test replaces them
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    return {
        "fit_metrics": fit_metrics,
        "model": model,
        "engine": engine,
        "datamodule": datamodule,
        "metrics": metrics,
        "test_scores": dict(scores.scores),
        "initial_adapters": initial_adapters,
        "initial_rectifier": initial_rectifier,
        "workdir": workdir,
        "kwargs": kwargs,
    }


def test_both_stages_train(trained: dict) -> None:
    model: HyperTrans = trained["model"]
    assert model.model.is_fitted
    adapters = model.model.perturbation.state_dict()
    assert any(not torch.equal(adapters[k], v) for k, v in trained["initial_adapters"].items()), "stage 1 did not train"
    rectifier = model.model.rectifier.state_dict()
    assert any(not torch.equal(rectifier[k], v) for k, v in trained["initial_rectifier"].items()), (
        "stage 2 did not train"
    )
    # 1 perturbation epoch + the bank epoch, although max_epochs allowed 5: the model stops itself.
    assert trained["engine"].trainer.current_epoch == 2
    callback_metrics = trained["fit_metrics"]
    assert "train/loss_dp_epoch" in callback_metrics or "train/loss_dp" in callback_metrics
    assert float(callback_metrics["train/loss_dr"]) < float(callback_metrics["train/loss_dr_first"])


def test_banks_hold_all_source_patches_and_the_shot(trained: dict) -> None:
    model: HyperTrans = trained["model"]
    datamodule = trained["datamodule"]
    patches = 8 * 8
    views = 8  # the default dihedral shot augmentation: 4 rotations x 2 mirror states
    assert model.model.memory_bank.get("target").shape[0] == views * patches  # the cycled shot is stored once per view
    target = model.model.memory_bank.get("target").reshape(views, patches, -1)
    assert all(not torch.equal(target[0], target[view]) for view in range(1, views))
    num_source = len(datamodule.source_train_data)
    assert model.model.memory_bank.get("source").shape[0] == round(num_source * patches * 0.5)
    assert model.model.rectified_target.shape == model.model.memory_bank.get("target").shape


def test_test_metrics_are_reported(trained: dict) -> None:
    metrics = trained["metrics"]
    assert 0.0 <= metrics["image_AUROC"] <= 1.0
    assert 0.0 <= metrics["pixel_AUROC"] <= 1.0
    assert 0.0 <= metrics["pixel_AUPRO"] <= 1.0  # the papers' protocol metric, beside anomalib's default four
    assert len(trained["test_scores"]) == len(trained["datamodule"].test_data)


def test_predict_on_a_folder_reproduces_test_scores(trained: dict, tmp_path: Path) -> None:
    engine: Engine = trained["engine"]
    model: HyperTrans = trained["model"]
    checkpoint = (
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    assert checkpoint and Path(checkpoint).is_file()
    test_paths = sorted(trained["test_scores"])
    folder = Path(test_paths[-1]).parent
    fresh = HyperTrans(**trained["kwargs"])
    collect = CollectScores()
    predict_engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, callbacks=[collect], logger=False)
    predict_engine.predict(model=fresh, data_path=folder, ckpt_path=checkpoint)
    assert collect.scores, "predict produced no scores"
    for path, score in collect.scores.items():
        assert score == pytest.approx(trained["test_scores"][path], abs=1e-5)
    del model


def test_checkpoint_round_trip(trained: dict) -> None:
    engine: Engine = trained["engine"]
    checkpoint = (
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    restored = HyperTrans.load_from_checkpoint(checkpoint, **{"visualizer": False})
    original: HyperTrans = trained["model"]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    original.eval()
    restored.eval()
    with torch.no_grad():
        expected = original.model(images)
        actual = restored.model(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(restored.model.rectified_source, original.model.rectified_source)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path, trained: dict) -> None:
    patchcore = Patchcore(backbone="resnet18", pre_trained=False, layers=("layer1",))
    checkpoint = {"state_dict": patchcore.state_dict(), "hyper_parameters": {}}
    model = HyperTrans(**trained["kwargs"])
    with pytest.raises(ValueError, match="not written by HyperTrans"):
        model.on_load_checkpoint(checkpoint)


def test_get_model_resolves_the_short_name() -> None:
    model = get_model(
        "HyperTrans", backbone="vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 64, "depth": 2}
    )
    assert isinstance(model, HyperTrans)


def test_short_epoch_budget_still_builds_the_banks(
    tmp_path: Path,
    synthetic_root: Path,
    synthetic_category: str,
    tiny_hypertrans_kwargs: dict,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = HyperTrans(**{**tiny_hypertrans_kwargs, "epochs_perturbation": 3})
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1, logger=False)
    with caplog.at_level(logging.WARNING):
        engine.fit(model=model, datamodule=make_datamodule(synthetic_root, synthetic_category))
    assert model.model.is_fitted
    assert "leaves room for 0 of the 3 domain-perturbation epochs" in caplog.text


def test_single_domain_datamodule_uses_the_shots_as_target(tmp_path: Path, tiny_hypertrans_kwargs: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    for split, count in (("good", 4), ("bad", 2)):
        (tmp_path / split).mkdir()
        for index in range(count):
            pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / split / f"{index:03d}.png")
    folder = Folder(
        name="toy",
        root=tmp_path,
        normal_dir="good",
        abnormal_dir="bad",
        train_batch_size=2,
        eval_batch_size=2,
        num_workers=0,
    )
    datamodule = FewShot(datamodule=folder, k_shot=2, seed=0)
    model = HyperTrans(**{**tiny_hypertrans_kwargs, "shot_augmentation": "dihedral"})
    engine = Engine(default_root_dir=tmp_path / "run", accelerator="cpu", devices=1, max_epochs=3, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    assert model.model.is_fitted
    assert not model.model.memory_bank.has("source")
    assert model.model.memory_bank.get("target").shape[0] == 2 * 8 * 64  # 2 shots x 8 dihedral views
    assert model.model.rectified_source.numel() == 0


def test_paired_shots_translate_the_source_bank_and_fuse_by_union(trained: dict) -> None:
    model: HyperTrans = trained["model"]
    assert bool(model.model.source_bank_translated)  # MVTec3DCrossDomain pairs each shot with its RGB image
    assert model.model.translation.is_fitted
    assert float(model.model.scorer.union_fusion) == 1.0
    assert all(unit > 0 for unit in model.model.scorer.units.tolist())
    assert model.model.shot_view_indices.numel() >= 1
    assert model.model.shot_view_indices[0] == 0  # the shot as it is always stays


def test_queries_mapped_into_the_source_space_survive_checkpoint_and_onnx_export(
    tmp_path: Path, synthetic_root: Path, synthetic_category: str, tiny_hypertrans_kwargs: dict
) -> None:
    """The "query" direction: the map is state, so a checkpoint and an ONNX graph score as the trained model does."""
    torch.manual_seed(0)
    model = HyperTrans(**{**tiny_hypertrans_kwargs, "translation_direction": "query"})
    engine = Engine(default_root_dir=tmp_path / "run", accelerator="cpu", devices=1, max_epochs=2, logger=False)
    engine.fit(model=model, datamodule=make_datamodule(synthetic_root, synthetic_category, k_shot=2))
    assert model.model.query_translation.is_fitted
    assert not model.model.translation.is_fitted
    assert not bool(model.model.source_bank_translated)
    assert float(model.model.scorer.union_fusion) == 1.0
    callback = engine.trainer.checkpoint_callback
    checkpoint = callback.best_model_path or callback.last_model_path
    restored = HyperTrans.load_from_checkpoint(checkpoint, **{"visualizer": False})
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.model(images).pred_score, model.model(images).pred_score, rtol=0, atol=1e-6)
    onnxruntime = pytest.importorskip("onnxruntime")
    exported = engine.export(model=model, export_type=ExportType.ONNX, export_root=tmp_path / "onnx")
    check_onnx_session(model, onnxruntime.InferenceSession(str(exported)))


def test_without_pairs_the_model_ignores_them(
    tmp_path: Path, synthetic_root: Path, synthetic_category: str, tiny_hypertrans_kwargs: dict
) -> None:
    """Unpaired data, or paired data with use_paired_shots=False, train exactly the model of before the pairs."""
    runs = []
    for pair_shots, use_paired_shots in ((False, True), (True, False)):
        torch.manual_seed(0)
        model = HyperTrans(**{**tiny_hypertrans_kwargs, "use_paired_shots": use_paired_shots})
        engine = Engine(
            default_root_dir=tmp_path / str(pair_shots), accelerator="cpu", devices=1, max_epochs=2, logger=False
        )
        datamodule = make_datamodule(synthetic_root, synthetic_category, pair_shots=pair_shots)
        engine.fit(model=model, datamodule=datamodule)
        assert not bool(model.model.source_bank_translated)
        assert float(model.model.scorer.union_fusion) == 0.0
        scores = CollectScores()
        engine.trainer.callbacks.append(scores)
        engine.test(model=model, datamodule=datamodule)
        runs.append((model.model.memory_bank.get("source"), scores.scores))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def write_cameras_apart(root: Path, shift: int) -> tuple[Folder, Folder]:
    """An RGB camera and a grey, inverted new camera that sees every scene ``shift`` pixels further down and right."""
    generator = torch.Generator().manual_seed(0)
    for subfolder, count in (("good", 6), ("good_test", 2), ("bad", 2)):
        for index in range(count):
            coarse = torch.rand(1, 3, 11, 11, generator=generator)
            scene = torch.nn.functional.interpolate(coarse, size=(80, 80), mode="bicubic", align_corners=False)[0]
            scene = (scene.clamp(0, 1).permute(1, 2, 0) * 255).to(torch.uint8).numpy()
            seen = scene[shift : shift + 64, shift : shift + 64].mean(axis=-1, keepdims=True).repeat(3, axis=-1)
            for camera, image in (("old", scene[:64, :64]), ("new", 255 - seen.astype(np.uint8))):
                (root / camera / subfolder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(root / camera / subfolder / f"{index:03d}.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    for camera in ("old", "new"):
        (root / camera / "masks").mkdir(parents=True, exist_ok=True)
        for index in range(2):
            Image.fromarray(mask).save(root / camera / "masks" / f"{index:03d}.png")
    return folder_camera(root / "old", "old"), folder_camera(root / "new", "new")


def test_engine_reads_the_pairs_of_cameras_mounted_apart_at_their_offset(
    tmp_path: Path, tiny_hypertrans_kwargs: dict
) -> None:
    """Engine.fit registers folder pairs one patch apart (8 px, the tiny ViT's patch) in every view, turning with it."""
    old, new = write_cameras_apart(tmp_path / "data", shift=8)
    datamodule = CrossDomainDataModule(old, new, k_shot=3, pair_shots=True, train_batch_size=4)
    model = HyperTrans(**{**tiny_hypertrans_kwargs, "shot_augmentation": "dihedral", "translation_direction": "bank"})
    engine = Engine(default_root_dir=tmp_path / "run", accelerator="cpu", devices=1, max_epochs=2, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    alignment = [tuple(read) for read in model.model.pair_alignment.tolist()]
    assert len(alignment) == 8  # every dihedral view of the shots and their captures
    assert alignment[0] == (1.0, 1.0, 1.0)  # the new camera looks one patch further down and right, at the same zoom
    # A turned or mirrored view turns the offset: each of the four diagonal offsets, from two views each.
    assert sorted(alignment) == sorted([(-1.0, -1.0, 1.0), (-1.0, 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, 1.0, 1.0)] * 2)


@pytest.mark.parametrize(
    ("test_views", "target_blur"),
    [(False, None), (True, None), (False, 1.5)],
    ids=["as trained", "test-time views", "target filter"],
)
def test_onnx_export_scores_like_the_torch_model(
    trained: dict, tmp_path: Path, test_views: bool, target_blur: float | None
) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    model: HyperTrans = trained["model"]
    denoiser = model.model.denoiser
    chosen = (denoiser.kernel.clone(), denoiser.sigma.clone())
    model.model.test_views = test_views
    if target_blur is not None:
        denoiser.kernel, denoiser.sigma = gaussian_kernel(target_blur), torch.tensor(target_blur)
    try:
        exported = trained["engine"].export(model=model, export_type=ExportType.ONNX, export_root=tmp_path)
        session = onnxruntime.InferenceSession(str(exported))
        check_onnx_session(model, session)
    finally:
        model.model.test_views = False
        denoiser.kernel, denoiser.sigma = chosen


def check_onnx_session(model: HyperTrans, session: Any) -> None:
    model.eval()
    for batch_size in (1, 3):  # the batch axis stays dynamic
        images = torch.rand(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(batch_size))
        with torch.no_grad():
            expected = model(images)
        outputs = dict(
            zip(
                (output.name for output in session.get_outputs()),
                session.run(None, {session.get_inputs()[0].name: images.numpy()}),
                strict=True,
            )
        )
        torch.testing.assert_close(torch.from_numpy(outputs["pred_score"]), expected.pred_score, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.from_numpy(outputs["anomaly_map"]), expected.anomaly_map, atol=1e-4, rtol=0)


def test_same_arguments_and_seed_train_bit_identical_models_whatever_the_global_state(
    tmp_path: Path, synthetic_root: Path, synthetic_category: str, tiny_hypertrans_kwargs: dict
) -> None:
    """The `anomalib` command never seeds the global random state: two runs must still agree exactly."""
    runs = []
    for global_seed in (11, 12):
        torch.manual_seed(0)  # the random test backbone is built from the global state; real weights are loaded
        model = HyperTrans(**tiny_hypertrans_kwargs)
        torch.manual_seed(global_seed)  # what differs between two command-line runs
        engine = Engine(
            default_root_dir=tmp_path / str(global_seed), accelerator="cpu", devices=1, max_epochs=2, logger=False
        )
        datamodule = make_datamodule(synthetic_root, synthetic_category)
        engine.fit(model=model, datamodule=datamodule)
        scores = CollectScores()
        engine.trainer.callbacks.append(scores)
        engine.test(model=model, datamodule=datamodule)
        runs.append((model.model.state_dict(), scores.scores))
    (first_state, first_scores), (second_state, second_scores) = runs
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key
    assert first_scores == second_scores


def test_engine_chooses_the_target_filter_from_every_shot_once(
    tmp_path: Path, synthetic_root: Path, synthetic_category: str, tiny_hypertrans_kwargs: dict
) -> None:
    """target_denoising=auto under the Engine: the blur SURE picks on the shots as the model sees them, stored."""
    kwargs = {**tiny_hypertrans_kwargs, "epochs_perturbation": 0, "target_denoising": "auto"}
    model = HyperTrans(**kwargs, target_denoising_min_gain=0.0)  # always the risk minimiser, so a choice to check
    datamodule = make_datamodule(synthetic_root, synthetic_category, k_shot=3)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    shots = torch.cat(list(model._target_shot_images()))  # each shot once, through the pre-processor
    candidates = model.model.denoiser.candidates
    expected = choose_blur(NoiseStatistics.of(shots, candidates), candidates, min_gain=0.0)
    assert float(model.model.denoiser.sigma) == expected.sigma
    assert (model.model.denoiser.kernel.numel() > 0) == (expected.sigma > 0)
    assert float(engine.trainer.callback_metrics["train/target_blur_sigma"]) == expected.sigma
    assert len(shots) == 3
