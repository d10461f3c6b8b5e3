"""Checkpoints meet the model they are loaded into: unreadable files, other models, other options.

The tests use only ``ValueError`` and message texts (not the new exception classes), so that on the code before the
checks existed each test fails on its own assertion rather than on an import.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning
import pytest
import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models import Patchcore

from anomalib_hypergraph.data import MVTec3DCrossDomain
from anomalib_hypergraph.models import H2VLR, HyperTrans
from tests.conftest import TINY_VIT_KWARGS
from tests.test_h2vlr_components import TINY_MODEL_KWARGS as TINY_H2VLR_KWARGS

LOGGER = "anomalib_hypergraph"


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
    synthetic_root: Path,
    synthetic_category: str,
    tiny_hypertrans_kwargs: dict,
) -> dict:
    """A HyperTrans checkpoint written by Engine.fit (tiny ViT, 2 HDR iterations) and the options that trained it."""
    torch.manual_seed(0)
    kwargs = {**tiny_hypertrans_kwargs, "epochs_rectification": 2}
    datamodule = MVTec3DCrossDomain(
        root=synthetic_root,
        category=synthetic_category,
        k_shot=1,
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        cache_dir=synthetic_root.parent / "cache",
    )
    engine = Engine(default_root_dir=tmp_path_factory.mktemp("checkpoints"), accelerator="cpu", devices=1, logger=False)
    engine.fit(model=HyperTrans(**kwargs), datamodule=datamodule)
    path = Path(
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    assert path.is_file()
    return {"path": path, "kwargs": kwargs, "folder": synthetic_root / synthetic_category / "test" / "good" / "rgb"}


def warnings_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)


# ------------------------------------------------------------------------------------------- options that differ
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"layers": ["blocks.2"]}, r"layers: checkpoint None, model \['blocks\.2'\]"),  # same shapes: loaded silently
        ({"use_rectification": False}, "use_rectification: checkpoint True, model False"),  # a module less
        ({"use_domain_perturbation": False}, "use_domain_perturbation: checkpoint True, model False"),
        ({"model_kwargs": {**TINY_VIT_KWARGS, "embed_dim": 48}}, r"model_kwargs: checkpoint .*'embed_dim': 32"),
    ],
)
def test_options_that_change_the_weights_are_refused_by_name(checkpoint: dict, override: dict, named: str) -> None:
    with pytest.raises(ValueError, match=rf"trained with other options.*do not fit: {named}"):
        HyperTrans.load_from_checkpoint(checkpoint["path"], **override)


def test_predict_with_another_backbone_names_the_option(checkpoint: dict, tmp_path: Path) -> None:
    kwargs = {**checkpoint["kwargs"], "backbone": "resnet18", "model_kwargs": None, "image_size": (64, 64)}
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match=r"backbone: checkpoint 'vit_tiny_patch16_224', model 'resnet18'") as error:
        engine.predict(model=HyperTrans(**kwargs), data_path=checkpoint["folder"], ckpt_path=checkpoint["path"])
    assert "model_kwargs: checkpoint {" in str(error.value)  # every difference is named, not only the first


def test_score_options_that_differ_are_warned_about_each(checkpoint: dict, caplog: pytest.LogCaptureFixture) -> None:
    override = {
        "beta": 0.3,
        "incidence_kernel": "gaussian",
        "image_score": "max",
        "use_cross_domain_scoring": False,
    }
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = HyperTrans.load_from_checkpoint(checkpoint["path"], **override)
    warned = warnings_of(caplog)
    assert "change the scores; the model's values are used" in warned
    for expected in (
        "beta: checkpoint 0.6, model 0.3",
        "image_score: checkpoint 'top_mean', model 'max'",
        "incidence_kernel: checkpoint 'reciprocal', model 'gaussian'",
        "use_cross_domain_scoring: checkpoint True, model False",
    ):
        assert expected in warned
    assert model.model.scorer.beta == 0.3  # the warning tells the truth: the model's value is the one used


def test_other_sigma_loads_with_a_warning_and_its_own_blur(checkpoint: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = HyperTrans.load_from_checkpoint(checkpoint["path"], sigma=2.0)
    assert "sigma: checkpoint 4.0, model 2.0" in warnings_of(caplog)
    fresh = HyperTrans(**{**checkpoint["kwargs"], "sigma": 2.0})
    assert torch.equal(model.model.scorer.blur.kernel, fresh.model.scorer.blur.kernel)  # sigma 2 really applies
    state = torch.load(checkpoint["path"], weights_only=False)["state_dict"]
    assert torch.equal(model.model.rectified_target, state["model.rectified_target"])  # everything else loaded


def test_checkpoint_holding_the_older_2d_blur_kernel_still_loads(checkpoint: dict, tmp_path: Path) -> None:
    saved = torch.load(checkpoint["path"], weights_only=False)
    saved["state_dict"]["model.scorer.blur.kernel"] = torch.rand(1, 1, 33, 33)  # what 2-D blur checkpoints held
    older = tmp_path / "older.ckpt"
    torch.save(saved, older)
    model = HyperTrans.load_from_checkpoint(older)
    assert torch.equal(model.model.rectified_target, saved["state_dict"]["model.rectified_target"])


def test_checkpoint_saved_without_a_post_processor_loads_without_one(checkpoint: dict, tmp_path: Path) -> None:
    """A model built with post_processor=False saves no post-processor state, and anomalib does not store the flag."""
    saved = torch.load(checkpoint["path"], map_location="cpu", weights_only=False)
    saved["state_dict"] = {k: v for k, v in saved["state_dict"].items() if not k.startswith("post_processor.")}
    path = tmp_path / "raw_scores.ckpt"
    torch.save(saved, path)
    raw = HyperTrans.load_from_checkpoint(path)
    assert raw.post_processor is None
    post_processed = HyperTrans.load_from_checkpoint(checkpoint["path"])
    assert post_processed.post_processor is not None  # a checkpoint with its post-processor state keeps it
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(raw.eval().model(images).pred_score, post_processed.eval().model(images).pred_score)
    with pytest.raises(ValueError, match=r"post_processor\._image_threshold"):  # asked for one: nothing to load it from
        HyperTrans.load_from_checkpoint(path, post_processor=True)


def test_inert_options_are_not_warned_about(checkpoint: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        HyperTrans.load_from_checkpoint(checkpoint["path"], epochs_rectification=50, chunk_size=64, seed=3)
    assert "differ" not in warnings_of(caplog)
    assert "chunk_size: checkpoint 256, model 64" in caplog.text  # still named, at info level


def test_image_size_difference_says_the_checkpoint_pre_processing_applies(
    checkpoint: dict, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = HyperTrans.load_from_checkpoint(checkpoint["path"], image_size=(32, 32))
    warned = warnings_of(caplog)
    assert "checkpoint's values apply: image_size: checkpoint [64, 64], model [32, 32]" in warned
    assert tuple(model.input_size) == (64, 64)


def test_strict_false_loads_what_fits_with_a_warning(checkpoint: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = HyperTrans.load_from_checkpoint(checkpoint["path"], strict=False, use_rectification=False)
    assert "use_rectification: checkpoint True, model False" in warnings_of(caplog)
    assert "strict=False" in warnings_of(caplog)
    assert model.model.rectifier is None and model.model.is_fitted


def test_matching_options_load_without_warnings(checkpoint: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        HyperTrans.load_from_checkpoint(checkpoint["path"])
    assert "differ" not in caplog.text


# ------------------------------------------------------------------------------------------------ another model
def test_patchcore_checkpoint_message_says_what_is_missing_and_what_is_there(checkpoint: dict) -> None:
    patchcore = Patchcore(backbone="resnet18", pre_trained=False, layers=("layer1",))
    foreign = {"state_dict": patchcore.state_dict(), "hyper_parameters": dict(patchcore.hparams)}
    model = HyperTrans(**checkpoint["kwargs"])
    with pytest.raises(ValueError, match="not written by HyperTrans") as error:
        model.on_load_checkpoint(foreign)
    message = str(error.value)
    assert "lacks HyperTrans's entries ['model.memory_bank.target_bank', 'model.rectified_target']" in message
    assert "'model.memory_bank'" in message  # Patchcore's bank is one tensor: named as such, not as a group
    assert "'pre_trained'" in message  # and its hyper-parameters are listed


def save_as_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """What a Lightning checkpoint holds for loading: its version, the state dict and the constructor's options."""
    checkpoint = {
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
    }
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("writer", ["Patchcore", "H2VLR"])
def test_another_models_checkpoint_file_is_refused_before_anything_is_built(
    checkpoint: dict, tmp_path: Path, writer: str
) -> None:
    """load_from_checkpoint (and so anomalib export) built HyperTrans from the foreign options first.

    Patchcore's options made it download ResNet-18 weights; H2VLR's made it look for an unknown backbone.
    """
    if writer == "Patchcore":
        foreign = Patchcore(backbone="resnet18", pre_trained=False, layers=("layer1",))
    else:
        foreign = H2VLR(k_shot=1, visualizer=False, **TINY_H2VLR_KWARGS)
    path = save_as_checkpoint(foreign, tmp_path / f"{writer}.ckpt")
    refused = r"This checkpoint was not written by HyperTrans: its state dict lacks HyperTrans's entries"
    with pytest.raises(ValueError, match=refused):
        HyperTrans.load_from_checkpoint(path)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match=refused):
        engine.export(
            model=HyperTrans(**checkpoint["kwargs"]), export_type=ExportType.TORCH, export_root=tmp_path, ckpt_path=path
        )


def test_a_hypertrans_checkpoint_is_refused_by_h2vlr(checkpoint: dict) -> None:
    with pytest.raises(ValueError, match=r"This checkpoint was not written by H2VLR"):
        H2VLR.load_from_checkpoint(checkpoint["path"])


# ------------------------------------------------------------------------------------------------------ export
def test_export_from_a_checkpoint_names_the_options_given_that_it_does_not_use(
    checkpoint: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """anomalib export builds the model from the checkpoint; the --model.* flags that differ are named."""
    given = HyperTrans(
        **{
            **checkpoint["kwargs"],
            "model_kwargs": {**TINY_VIT_KWARGS, "embed_dim": 48},  # another architecture
            "beta": 0.3,  # another score
            "chunk_size": 64,  # memory only
        }
    )
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        exported = engine.export(
            model=given, export_type=ExportType.TORCH, export_root=tmp_path, ckpt_path=checkpoint["path"]
        )
    warned = warnings_of(caplog)
    assert "differ and are NOT used" in warned
    assert "beta: checkpoint 0.6, given 0.3" in warned
    assert "model_kwargs: checkpoint {" in warned and "'embed_dim': 48" in warned
    assert "chunk_size" not in warned and "chunk_size: checkpoint 256, given 64" in caplog.text  # info only
    module = torch.load(exported, weights_only=False)["model"]
    assert module.model.scorer.beta == 0.6  # the message tells the truth: the export has the checkpoint's values


# ------------------------------------------------------------------------------------------------- the file
@pytest.fixture
def broken_files(tmp_path: Path, checkpoint: dict) -> dict[str, Path]:
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    data = checkpoint["path"].read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    return {"is empty": empty, "is truncated": truncated, "not a torch checkpoint": text}


def test_unreadable_checkpoint_files_are_named_by_every_loader(
    broken_files: dict[str, Path], checkpoint: dict, tmp_path: Path
) -> None:
    for reason, path in broken_files.items():
        pattern = rf"Checkpoint file {path.resolve()} .*{reason}"
        with pytest.raises(ValueError, match=pattern):
            HyperTrans.load_from_checkpoint(path)
        engine = Engine(default_root_dir=tmp_path / path.stem, accelerator="cpu", devices=1, logger=False)
        with pytest.raises(ValueError, match=pattern):
            engine.predict(model=HyperTrans(**checkpoint["kwargs"]), data_path=checkpoint["folder"], ckpt_path=path)
        with pytest.raises(ValueError, match=pattern):
            engine.export(model=HyperTrans(**checkpoint["kwargs"]), export_type=ExportType.TORCH, ckpt_path=path)
