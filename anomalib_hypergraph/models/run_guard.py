"""What a run of our models reads and writes: images as training read them, nothing of the user's overwritten.

:class:`RunGuard` is a mixin for ``AnomalibModule`` subclasses (put it before ``AnomalibModule`` in the bases). It
makes three promises for every ``Engine`` / ``anomalib`` command run:

1. **Every image is read as training read it.** Our datamodules read 16-bit grayscale images (depth sensors' PNGs) at
   full range and name broken files at setup (:mod:`anomalib_hypergraph.data.image_files`). anomalib's own datasets
   do neither: ``anomalib predict --data <folder>`` / ``Engine.predict(data_path=...)`` builds a ``PredictDataset``
   whose reader clips 16-bit values at 255, so a depth model would score saturated images. At ``setup`` (after the
   datamodule's setup, before any loader is iterated) every dataset of the run that was not checked yet (the
   predict folder, dataloaders given directly, plain anomalib datamodules) goes through the same
   :func:`~anomalib_hypergraph.data.image_files.check_images`: every file decoded once (a truncated one named before
   anything runs), 16-bit images read at full range, with the same log line.
2. **predict never writes into a training run.** anomalib writes predictions into
   ``<default_root_dir>/<model>/<data>/<category>/latest`` (and the CLI its ``config.yaml``). When that folder is a
   training run (it holds ``weights/**/*.ckpt``) that this trainer did not write, the run's ``config.yaml`` and
   visualisations would be replaced: the predict run stops with a :class:`RunOutputError` before anything is
   written (in ``prepare_data``, which Lightning calls before any callback's ``setup``). Predicting after fitting
   with the same ``Engine`` stays allowed (the predictions then belong to that run, as its test results do).
3. **An export never replaces an earlier one.** ``to_torch``/``to_onnx``/``to_openvino`` (what ``anomalib export``
   calls) stop with a :class:`RunOutputError` when the file they would write exists. ONNX is requested at
   :data:`EXPORT_ONNX_OPSET`, the opset torch's exporter builds graphs in, so a successful export does not log the
   version converter's failed down-conversion (anomalib asks for opset 14), and the info lines of the ONNX graph
   optimiser (:data:`ONNX_OPTIMISER_LOGGERS`, some 400 records per export under the ``anomalib`` command) are held
   back during the export: its warnings and errors still show.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from anomalib.deploy import ExportType
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from anomalib_hypergraph.data.image_files import check_images, needs_image_check

logger = logging.getLogger(__name__)

# The ONNX opset of torch's (dynamo) exporter's operator library: graphs are built in it, and any other request is
# converted afterwards (a lower one fails for some of our ops, leaving 18 and a long traceback in the log).
EXPORT_ONNX_OPSET = 18
# Loggers of torch's ONNX graph optimiser (onnxscript) and its IR passes: one info line per folded constant, removed
# node and deduplicated initialiser.
ONNX_OPTIMISER_LOGGERS = ("onnxscript", "onnx_ir")

# The loops whose data a Lightning stage reads, and the dataset attributes of an anomalib datamodule that each
# loader hook returns (anomalib's ``predict_dataloader`` is its test loader).
_STAGE_LOOPS = {
    "fit": ("fit_loop", "fit_loop.epoch_loop.val_loop"),
    "validate": ("validate_loop",),
    "test": ("test_loop",),
    "predict": ("predict_loop",),
}
_DATAMODULE_DATASETS = {
    "train_dataloader": "train_data",
    "val_dataloader": "val_data",
    "test_dataloader": "test_data",
    "predict_dataloader": "test_data",
}
_EXPORT_SUFFIXES = {ExportType.TORCH: (".pt",), ExportType.ONNX: (".onnx",), ExportType.OPENVINO: (".xml", ".bin")}


class RunOutputError(RuntimeError):
    """A run would overwrite what a user has: a training run's folder, or an earlier export."""


def _nested_attribute(root: object, dotted: str) -> object:
    for name in dotted.split("."):
        root = getattr(root, name, None)
    return root


def _datasets_of(source: object, hook: str) -> Iterator[tuple[str, object]]:
    """(role, dataset) of a loop's data source: its DataLoaders' datasets, or its datamodule's dataset for ``hook``."""
    role = hook.removesuffix("_dataloader")
    if isinstance(source, DataLoader):
        yield role, source.dataset
    elif isinstance(source, LightningDataModule):
        dataset = getattr(source, _DATAMODULE_DATASETS.get(hook, ""), None)
        if dataset is not None:
            yield role, dataset
    elif isinstance(source, dict):
        for item in source.values():
            yield from _datasets_of(item, hook)
    elif isinstance(source, list | tuple):
        for item in source:
            yield from _datasets_of(item, hook)


def run_datasets(trainer: Any, stage: str) -> dict[str, object]:
    """Return the datasets a trainer's ``stage`` will read that no image check has seen yet, by role.

    Read from the loops' data sources (set by ``trainer.fit/validate/test/predict`` before the ``setup`` hooks, read
    by the loops after them); Lightning keeps them in ``_data_source``, which has no public accessor.
    """
    datasets: dict[str, object] = {}
    for loop_path in _STAGE_LOOPS.get(stage, ()):
        source = getattr(_nested_attribute(trainer, loop_path), "_data_source", None)
        if source is None or source.instance is None:
            continue
        for role, dataset in _datasets_of(source.instance, source.name):
            if needs_image_check(dataset) and all(dataset is not seen for seen in datasets.values()):
                datasets[role if role not in datasets else f"{role} {len(datasets)}"] = dataset
    return datasets


def training_checkpoints(folder: Path) -> list[Path]:
    """List the checkpoints a training run keeps in ``folder`` (anomalib: ``weights/lightning/model.ckpt``)."""
    weights = folder / "weights"
    return sorted(weights.rglob("*.ckpt")) if weights.is_dir() else []


def checkpoints_written_by(trainer: Any) -> set[Path]:
    """Return the checkpoint files the trainer's checkpoint callbacks wrote in this process (after a fit)."""
    written: set[Path] = set()
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        paths = [getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")]
        paths += list(getattr(callback, "best_k_models", {}))
        written.update(Path(path).resolve() for path in paths if path)
    return written


def check_predict_output(trainer: Any) -> None:
    """Refuse to predict into a folder that holds a training run this trainer did not write.

    Raises:
        RunOutputError: ``trainer.default_root_dir`` holds a training checkpoint written by another run.

    """
    folder = Path(trainer.default_root_dir).resolve()
    found = training_checkpoints(folder)
    foreign = [path for path in found if path.resolve() not in checkpoints_written_by(trainer)]
    if not foreign:
        return
    msg = (
        f"predict would write into '{folder}', the folder of a training run (it holds {foreign[0]}): its "
        "config.yaml and the visualisations of its test images would be replaced. anomalib predicts into "
        "<default_root_dir>/<model>/<data>/<category>/latest, so predicting with the training datamodule and root "
        "lands there. Give predictions their own root: --default_root_dir results/predict "
        "(Engine(default_root_dir=...)), or predict a folder of images (--data <folder>)."
    )
    raise RunOutputError(msg)


def export_targets(export_root: str | Path, export_type: ExportType, model_file_name: str) -> list[Path]:
    """List the files anomalib's ``to_torch``/``to_onnx``/``to_openvino`` write (``<root>/weights/<type>/``)."""
    folder = Path(export_root) / "weights" / export_type.value
    return [folder / f"{model_file_name}{suffix}" for suffix in _EXPORT_SUFFIXES[export_type]]


def check_export_target(export_root: str | Path, export_type: ExportType, model_file_name: str) -> None:
    """Refuse an export that would replace an earlier one.

    Raises:
        RunOutputError: one of the files the export writes exists.

    """
    existing = [path for path in export_targets(export_root, export_type, model_file_name) if path.exists()]
    if existing:
        msg = (
            f"The {export_type.value} export would overwrite '{existing[0].resolve()}', an earlier export. Export "
            "into another folder (--export_root / export_root) or under another name (--model_file_name / "
            "model_file_name), or remove the earlier export first."
        )
        raise RunOutputError(msg)


@contextmanager
def quiet_onnx_optimiser() -> Iterator[None]:
    """Within the block, the ONNX optimiser's loggers pass warnings and errors only."""
    loggers = [logging.getLogger(name) for name in ONNX_OPTIMISER_LOGGERS]
    levels = [optimiser_logger.level for optimiser_logger in loggers]
    for optimiser_logger in loggers:
        optimiser_logger.setLevel(max(optimiser_logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for optimiser_logger, level in zip(loggers, levels, strict=True):
            optimiser_logger.setLevel(level)


class RunGuard:
    """Mixin for ``AnomalibModule`` subclasses: full-range, checked images in every run; no output overwritten.

    See the module docstring. It provides ``prepare_data``, ``setup``, ``to_torch``, ``to_onnx`` and
    ``to_openvino``; a subclass overriding them must call ``super()``.
    """

    def prepare_data(self) -> None:
        """Before any callback writes (the CLI's config.yaml, visualisations): refuse to predict into a training run."""
        super().prepare_data()
        if self.trainer.state.fn == "predict":
            check_predict_output(self.trainer)

    def setup(self, stage: str) -> None:
        """Check the files of every dataset this stage reads (not checked yet); read 16-bit images at full range."""
        super().setup(stage)
        datasets = run_datasets(self.trainer, stage)
        if datasets:
            check_images(datasets)

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Export like anomalib (torch), refusing to overwrite an earlier export."""
        check_export_target(export_root, ExportType.TORCH, model_file_name)
        return super().to_torch(export_root, model_file_name)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export like anomalib (ONNX) at :data:`EXPORT_ONNX_OPSET` unless asked otherwise; short log, no overwrite."""
        check_export_target(export_root, ExportType.ONNX, model_file_name)
        kwargs.setdefault("opset_version", EXPORT_ONNX_OPSET)
        with quiet_onnx_optimiser():
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def to_openvino(self, export_root: Path | str, model_file_name: str = "model", *args: Any, **kwargs: Any) -> Path:
        """Export like anomalib (OpenVINO, through :meth:`to_onnx`), refusing to overwrite an earlier export."""
        check_export_target(export_root, ExportType.OPENVINO, model_file_name)
        return super().to_openvino(export_root, model_file_name, *args, **kwargs)
