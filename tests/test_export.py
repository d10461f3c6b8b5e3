"""anomalib's export types from a trained HyperTrans checkpoint: torch and OpenVINO score like the torch model.

ONNX is tested in ``test_hypertrans_engine.py``; together the three ``--export_type`` values of ``anomalib export``.
Exports are made as ``anomalib export --ckpt_path`` makes them: ``Engine.export(ckpt_path=...)``, which rebuilds the
model from the checkpoint alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine

from anomalib_hypergraph.data import MVTec3DCrossDomain
from anomalib_hypergraph.models import HyperTrans

# Export tolerance, as for ONNX: float32 graphs, other kernels and summation orders.
ATOL = 1e-4


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    synthetic_root: Path,
    synthetic_category: str,
    tiny_hypertrans_kwargs: dict,
) -> dict:
    """A HyperTrans trained by Engine.fit (tiny ViT, 2 HDR iterations): the model and its checkpoint file."""
    torch.manual_seed(0)
    model = HyperTrans(**{**tiny_hypertrans_kwargs, "epochs_rectification": 2})
    datamodule = MVTec3DCrossDomain(
        root=synthetic_root,
        category=synthetic_category,
        k_shot=1,
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        cache_dir=synthetic_root.parent / "cache",
    )
    engine = Engine(default_root_dir=tmp_path_factory.mktemp("export"), accelerator="cpu", devices=1, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    engine.validate(model=model, datamodule=datamodule)  # normalisation statistics and thresholds, as after training
    checkpoint = tmp_path_factory.mktemp("export_checkpoint") / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    model.eval()
    return {"model": model, "checkpoint": checkpoint, "engine": engine}


def torch_outputs(model: HyperTrans, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        predictions = model(images)
    return {"pred_score": predictions.pred_score, "anomaly_map": predictions.anomaly_map}


def test_torch_export_from_the_checkpoint_scores_like_the_model(trained: dict, tmp_path: Path) -> None:
    exported = trained["engine"].export(
        model=trained["model"], export_type=ExportType.TORCH, export_root=tmp_path, ckpt_path=trained["checkpoint"]
    )
    loaded = torch.load(exported, weights_only=False)["model"].eval()  # anomalib's torch export pickles the module
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = torch_outputs(trained["model"], images)
    actual = torch_outputs(loaded, images)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-6, rtol=0)


def test_openvino_export_from_the_checkpoint_scores_like_the_model(trained: dict, tmp_path: Path) -> None:
    openvino = pytest.importorskip("openvino")
    exported = trained["engine"].export(
        model=trained["model"], export_type=ExportType.OPENVINO, export_root=tmp_path, ckpt_path=trained["checkpoint"]
    )
    assert exported.suffix == ".xml" and exported.with_suffix(".bin").is_file()
    # f32 inference: CPUs with bf16 units would otherwise run in bf16 by default (a runtime choice, not the export's).
    compiled = openvino.Core().compile_model(str(exported), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    output_names = [output.get_any_name() for output in compiled.outputs]
    assert {"pred_score", "anomaly_map"} <= set(output_names)
    for batch_size in (1, 3):  # the batch axis stays dynamic through ONNX -> OpenVINO
        images = torch.rand(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(batch_size))
        expected = torch_outputs(trained["model"], images)
        results = compiled(images.numpy())
        actual = {name: torch.from_numpy(results[index]) for index, name in enumerate(output_names)}
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, atol=ATOL, rtol=0)


def test_a_second_export_into_one_folder_is_refused_and_the_first_kept(trained: dict, tmp_path: Path) -> None:
    engine, model = trained["engine"], trained["model"]
    first = engine.export(model=model, export_type=ExportType.TORCH, export_root=tmp_path)
    content = first.read_bytes()
    with pytest.raises(RuntimeError, match=rf"would overwrite '{first.resolve()}', an earlier export"):
        engine.export(model=model, export_type=ExportType.TORCH, export_root=tmp_path, ckpt_path=trained["checkpoint"])
    assert first.read_bytes() == content
    other_name = engine.export(model=model, export_type=ExportType.TORCH, export_root=tmp_path, model_file_name="v2")
    assert other_name.parent == first.parent and other_name.name == "v2.pt"  # another name in the folder is fine


def test_a_successful_onnx_export_keeps_its_log_short(
    trained: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """anomalib asks for opset 14: torch builds 18, and the failed down-conversion logged a long traceback.

    The ``anomalib`` command logs at info level, where the ONNX optimiser adds some 400 lines of its own.
    """
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    with caplog.at_level(logging.INFO):
        exported = trained["engine"].export(
            model=trained["model"], export_type=ExportType.ONNX, export_root=tmp_path, ckpt_path=trained["checkpoint"]
        )
    with_traceback = [record.getMessage() for record in caplog.records if record.exc_info]
    assert not with_traceback, with_traceback[0][:300]
    optimiser_lines = [record for record in caplog.records if record.name.startswith(("onnxscript", "onnx_ir"))]
    assert not optimiser_lines, f"{len(optimiser_lines)} lines, e.g. {optimiser_lines[0].getMessage()[:200]}"
    opsets = {entry.domain: entry.version for entry in onnx.load(str(exported)).opset_import}
    assert opsets[""] == 18
