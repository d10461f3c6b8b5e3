"""Checkpoints that fit the model they are loaded into: a readable file, the same model, the same options.

Loading a checkpoint (``anomalib predict --ckpt_path``, ``Engine.predict/test/export(ckpt_path=...)``,
``Model.load_from_checkpoint``) goes wrong in three ways that torch and Lightning report poorly:

1. the file is empty or truncated: torch raises a bare ``EOFError`` or "failed finding central directory", without
   the file name;
2. the file was written by another model (e.g. Patchcore): a wall of missing and unexpected state-dict keys;
3. the file was written by this model with other options. Where the weights cannot fit (another backbone, other
   layers, an ablation switch that adds or removes a module) Lightning gives a raw state-dict error; where they fit
   (``beta``, ``sigma``, the incidence kernel, ...) nothing is said, although the scores change.

:class:`CheckpointGuard` is a mixin for ``AnomalibModule`` subclasses that handles all three, driven by a
:class:`CheckpointSpec` per model. The checkpoint's stored hyper-parameters (Lightning keeps the constructor
arguments under ``checkpoint["hyper_parameters"]``; ``AnomalibModule.__init__`` calls ``save_hyperparameters``) are
compared with the model's, and every difference is named:

- an option in ``architecture_hparams`` (decides which weights and banks exist, or what the banks mean) differs, or
  the state dict does not fit the model: :class:`CheckpointMismatchError`;
- an option in ``restored_hparams`` (anomalib restores its effect from the checkpoint, e.g. the pre-processor's
  resize) differs: a warning saying that the checkpoint's value applies;
- an option in ``inert_hparams`` (acts only while training, or only on memory and speed) differs: an info line,
  since the loaded model scores the same either way;
- any other option differs (score-time options such as ``beta``; also options this spec does not know, so a new
  option is never silently ignored): a warning saying that the model's value is used. State entries computed from
  such options at construction (``derived_state_keys``, e.g. a Gaussian blur kernel) are taken from the model, so
  its value really applies.

A caller who loads with ``strict=False`` (``load_from_checkpoint(..., strict=False)`` or the module's
``strict_loading``) asked for whatever fits: the errors are then warnings.

``Model.load_from_checkpoint`` builds the model from the checkpoint's own options, so a checkpoint of another model
would build the wrong thing (download another backbone, fail on an unknown one) before any state is compared: the
file's state-dict keys are checked against :attr:`CheckpointSpec.required_state_keys` first, with the same
:class:`CheckpointMismatchError`. ``anomalib export`` (``Engine.export(ckpt_path=...)``) loads that way and drops
the model built from the ``--model.*`` options; :func:`options_given` lets the caller hand those options over, and
every one that differs from the checkpoint's is named (the export has the checkpoint's values).

Where the file is read: ``Model.load_from_checkpoint`` (overridden here) and, for ``ckpt_path`` runs, the trainer
strategy's checkpoint IO. The model's ``setup`` hook runs before the trainer restores a checkpoint, but the path is
not visible there, so :meth:`CheckpointGuard.setup` swaps Lightning's/anomalib's default checkpoint IO for
:class:`FileNamingCheckpointIO`, which loads exactly the same way and only turns an unreadable file into a
:class:`CheckpointFileError` naming it. A checkpoint IO the user configured is left alone.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from anomalib.engine.plugins import AnomalibCheckpointIO
from anomalib.models.components.base import DynamicBufferMixin
from anomalib.utils.serialization import anomalib_safe_globals
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

logger = logging.getLogger(__name__)

# Differences shown in one message before the rest is summarised as a count.
_MAX_LISTED = 8
_ABSENT = "<absent>"


@dataclass(frozen=True)
class _LoadRequest:
    """What ``load_from_checkpoint`` knows and ``on_load_checkpoint`` does not.

    The checkpoint's own options (Lightning merges the caller's overrides into ``checkpoint["hyper_parameters"]``
    first, which would hide every difference) and the caller's ``strict``.
    """

    stored_hparams: Mapping[str, Any] | None
    strict: bool | None


_LOAD_REQUEST: ContextVar[_LoadRequest | None] = ContextVar("load_request", default=None)
# Options of a model that a caller built and then replaced by ``load_from_checkpoint`` (anomalib's export).
_GIVEN_OPTIONS: ContextVar[Mapping[str, Any] | None] = ContextVar("given_options", default=None)


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read (empty, truncated, not a torch checkpoint)."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not fit the model it is loaded into."""


@dataclass(frozen=True)
class CheckpointSpec:
    """What a model's checkpoints look like and how each of its options relates to the stored state.

    Args:
        model_name: Name used in messages (the class name).
        required_state_keys: State-dict entries every checkpoint of this model holds; their absence means that another
            model wrote the file.
        architecture_hparams: Options that decide which weights and banks exist or what they mean; a difference is an
            error.
        restored_hparams: Options whose effect anomalib restores from the checkpoint (the pre-processor); a
            difference is a warning that the checkpoint's value applies.
        inert_hparams: Options that do not change a trained model's scores (training-only, or memory/speed); a
            difference is logged at info level.
        derived_state_keys: State entries computed from options at construction, not learned (e.g. a blur kernel);
            the model's own values replace the checkpoint's, so the model's options apply.

    """

    model_name: str
    required_state_keys: tuple[str, ...]
    architecture_hparams: frozenset[str] = field(default_factory=frozenset)
    restored_hparams: frozenset[str] = field(default_factory=frozenset)
    inert_hparams: frozenset[str] = field(default_factory=frozenset)
    derived_state_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class HparamDifference:
    """One option whose value in the checkpoint differs from the model's (``<absent>`` when one side lacks it)."""

    name: str
    checkpoint: Any
    model: Any

    def __str__(self) -> str:
        return self.describe()

    def describe(self, other: str = "model") -> str:
        """``name: checkpoint <value>, <other> <value>``."""
        return f"{self.name}: checkpoint {self.checkpoint!r}, {other} {self.model!r}"


# ------------------------------------------------------------------------------------------------------ the file
def describe_unreadable_checkpoint(path: str | Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint, or ``None`` when it looks like one (a complete zip archive).

    Cheap: reads only the archive's central directory. ``torch.save`` has written zip archives since torch 1.6 (and
    Lightning always uses it), so a file without a readable central directory is empty, truncated or of another
    format. Used to explain a failed load, never to refuse a file torch can read. Remote URLs (fsspec) are not
    examined.
    """
    if "://" in str(path):
        return None
    file = Path(path)
    if not file.is_file():
        return "is not a file" if file.exists() else "does not exist"
    size = file.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return f"is truncated or not a torch checkpoint ({size} bytes, not the complete zip archive torch.save writes)"
    if not any(name.endswith("data.pkl") for name in names):
        return f"is a zip archive but not a torch checkpoint ({size} bytes, no data.pkl entry)"
    return None


@contextmanager
def naming_unreadable_file(path: str | Path) -> Iterator[None]:
    """Turn an error raised while reading checkpoint ``path`` into a :class:`CheckpointFileError` naming the file.

    Only when :func:`describe_unreadable_checkpoint` confirms that the file is broken; any other error (a missing
    file, whose message names it already; a refused pickle in a valid archive) passes unchanged.
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as error:
        reason = describe_unreadable_checkpoint(path)
        if reason is None:
            raise
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        msg = (
            f"Checkpoint file {Path(path).resolve()} {reason}; it cannot be loaded ({detail}). Point ckpt_path at "
            "the complete .ckpt file written by training (e.g. <root>/weights/lightning/model.ckpt)."
        )
        raise CheckpointFileError(msg) from error


class FileNamingCheckpointIO(AnomalibCheckpointIO):
    """anomalib's checkpoint IO (torch loading with anomalib's safe globals) whose load errors name the file."""

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Any = None,
        weights_only: bool = True,
    ) -> dict[str, Any]:
        """Load like anomalib; an empty, truncated or foreign file raises :class:`CheckpointFileError`."""
        with naming_unreadable_file(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def read_checkpoint(path: str | Path, safe_globals: Sequence[Any] = ()) -> Any:
    """Load checkpoint file ``path`` without reading its tensors (``None`` for a remote URL).

    Files in torch's zip format are memory-mapped (``mmap=True``): only their pickled structure is read, so the
    state-dict keys and the hyper-parameters cost almost nothing.

    Raises:
        CheckpointFileError: the file is empty, truncated or not a torch checkpoint.

    """
    if not isinstance(path, str | Path) or "://" in str(path):
        return None
    mmap = Path(path).is_file() and zipfile.is_zipfile(path)  # torch can map only its zip format
    with naming_unreadable_file(path), anomalib_safe_globals(extra=safe_globals):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


def stored_hparams_of(checkpoint: Any) -> dict[str, Any] | None:
    """Return the hyper-parameters a loaded checkpoint stores (``None``: none)."""
    stored = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    return dict(stored) if isinstance(stored, Mapping) else None


# ------------------------------------------------------------------------------------------------ the contents
def _comparable(value: Any) -> Any:
    """Plain-data form for comparing options: tuples become lists, paths strings (CLI/YAML give lists and strings)."""
    if isinstance(value, Mapping):
        return {str(key): _comparable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_comparable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def hparam_differences(
    checkpoint_hparams: Mapping[str, Any], model_hparams: Mapping[str, Any]
) -> list[HparamDifference]:
    """Options whose values differ between checkpoint and model, in sorted order; a missing side is ``<absent>``.

    Keys starting with ``_`` are Lightning's bookkeeping (``_instantiator``, ``_class_path``), not options.
    """
    differences = []
    for name in sorted(key for key in set(checkpoint_hparams) | set(model_hparams) if not str(key).startswith("_")):
        stored = _comparable(checkpoint_hparams.get(name, _ABSENT))
        current = _comparable(model_hparams.get(name, _ABSENT))
        if stored != current:
            differences.append(HparamDifference(name, stored, current))
    return differences


def _listing(items: list[Any]) -> str:
    shown = "; ".join(str(item) for item in items[:_MAX_LISTED])
    return shown + (f"; ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _state_key_groups(keys: list[str], depth: int = 2) -> list[str]:
    """Distinct key prefixes of ``depth`` components, with ``.*`` where the prefix has sub-entries."""
    groups: dict[str, bool] = {}
    for key in keys:
        parts = key.split(".")
        prefix = ".".join(parts[:depth])
        groups[prefix] = groups.get(prefix, False) or len(parts) > depth
    return [prefix + (".*" if nested else "") for prefix, nested in sorted(groups.items())]


def _dynamic_buffer_keys(model: nn.Module) -> set[str]:
    """State keys of buffers that ``DynamicBufferMixin`` resizes on load (memory banks): their shape may differ."""
    keys = set()
    for module_name, module in model.named_modules():
        if isinstance(module, DynamicBufferMixin):
            prefix = f"{module_name}." if module_name else ""
            keys.update(f"{prefix}{name}" for name, buffer in module.named_buffers(recurse=False) if buffer is not None)
    return keys


def _recomputed_keys(model: nn.Module) -> set[str]:
    """State-dict keys that modules rebuild at load when a checkpoint lacks them (``recomputed_state_keys()``).

    E.g. the squared row norms a memory bank caches next to each bank: checkpoints written before the cache existed
    still load.
    """
    keys: set[str] = set()
    for module_name, module in model.named_modules():
        recomputed = getattr(module, "recomputed_state_keys", None)
        if callable(recomputed):
            prefix = f"{module_name}." if module_name else ""
            keys.update(f"{prefix}{name}" for name in recomputed())
    return keys


def _state_dict_misfit(state_dict: Mapping[str, Any], model: nn.Module) -> list[str]:
    """Why ``state_dict`` cannot be loaded strictly into ``model``: missing, unexpected and other-shape entries."""
    own = model.state_dict()
    resizable = _dynamic_buffer_keys(model)
    missing = sorted(set(own) - set(state_dict) - _recomputed_keys(model))
    unexpected = sorted(set(state_dict) - set(own))
    reshaped = sorted(
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}"
        for key in set(own) & set(state_dict)
        if key not in resizable and hasattr(state_dict[key], "shape") and state_dict[key].shape != own[key].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} entries missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected entries ({_listing(unexpected)})")
    if reshaped:
        problems.append(f"{len(reshaped)} entries of another shape, checkpoint vs model ({_listing(reshaped)})")
    return problems


def check_written_by(checkpoint: Any, spec: CheckpointSpec) -> Mapping[str, Any]:
    """Return the checkpoint's state dict, or refuse a checkpoint that ``spec``'s model did not write.

    Raises:
        CheckpointMismatchError: the checkpoint has no Lightning ``state_dict``, or its state dict lacks one of
            ``spec.required_state_keys`` (another model wrote it; the message lists what it holds).

    """
    name = spec.model_name
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        entries = sorted(checkpoint)[:_MAX_LISTED] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        msg = (
            f"This checkpoint has no Lightning 'state_dict' (top-level entries: {entries}): it is not a {name} "
            "checkpoint written by anomalib/Lightning training."
        )
        raise CheckpointMismatchError(msg)
    absent = [key for key in spec.required_state_keys if key not in state_dict]
    if absent:
        stored_hparams = sorted(checkpoint.get("hyper_parameters") or {})
        msg = (
            f"This checkpoint was not written by {name}: its state dict lacks {name}'s entries {absent}. It holds "
            f"{_state_key_groups(list(state_dict))} and the hyper-parameters {stored_hparams}. "
            "Load it with the model class that trained it."
        )
        raise CheckpointMismatchError(msg)
    return state_dict


def name_options_not_used(stored: Mapping[str, Any], given: Mapping[str, Any], spec: CheckpointSpec) -> None:
    """Name every option of a model built by the caller that differs from the checkpoint that replaces it.

    ``load_from_checkpoint`` builds the model from the checkpoint's options, so the given ones are not used: a
    warning lists them (an info line for ``inert_hparams``, which do not change a loaded model's scores).
    """
    differences = hparam_differences(stored, given)
    inert = [difference for difference in differences if difference.name in spec.inert_hparams]
    used = [difference for difference in differences if difference.name not in spec.inert_hparams]
    name = spec.model_name
    if used:
        logger.warning(
            "%s is built from the checkpoint, with the checkpoint's options: these options of the model given "
            "(the --model.* flags) differ and are NOT used: %s. To get a model with them, train it with them.",
            name,
            _listing([difference.describe("given") for difference in used]),
        )
    if inert:
        logger.info(
            "%s is built from the checkpoint: options given that differ but do not change its scores: %s.",
            name,
            _listing([difference.describe("given") for difference in inert]),
        )


@contextmanager
def options_given(options: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, ``load_from_checkpoint`` names the ``options`` that differ from the checkpoint's.

    For callers that build a model and then load a checkpoint in its place (anomalib's ``Engine.export``), so that
    options given for the model are not dropped without a word.
    """
    token = _GIVEN_OPTIONS.set(dict(options))
    try:
        yield
    finally:
        _GIVEN_OPTIONS.reset(token)


def check_checkpoint(
    checkpoint: dict[str, Any],
    model: nn.Module,
    model_hparams: Mapping[str, Any],
    spec: CheckpointSpec,
    *,
    stored_hparams: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> None:
    """Refuse a checkpoint that does not fit ``model``; name every option that differs; keep derived state.

    Args:
        checkpoint: The loaded checkpoint (``on_load_checkpoint``'s argument). ``derived_state_keys`` entries of its
            state dict are replaced in place by the model's own values (removed where the model has none).
        model: The module the state dict is about to be loaded into.
        model_hparams: The model's options (``model.hparams``).
        spec: What the model's checkpoints hold and how its options relate to them.
        stored_hparams: The checkpoint's hyper-parameters as written, when ``checkpoint["hyper_parameters"]`` may
            have been merged with overrides (``load_from_checkpoint``); ``None``: take them from the checkpoint.
        strict: ``False`` (the caller asked to load what fits): architecture differences and a state dict that does
            not fit are warnings instead of errors.

    Raises:
        CheckpointMismatchError: another model wrote the checkpoint, or (``strict``) an architecture option differs or
            the state dict does not fit the model.

    """
    name = spec.model_name
    state_dict = check_written_by(checkpoint, spec)
    stored = checkpoint.get("hyper_parameters") if stored_hparams is None else stored_hparams
    if stored is None:
        logger.warning("This %s checkpoint stores no hyper-parameters; the model's options cannot be checked.", name)
        differences = []
    else:
        differences = hparam_differences(stored, model_hparams)
    architecture = [difference for difference in differences if difference.name in spec.architecture_hparams]
    if architecture:
        msg = (
            f"This {name} checkpoint was trained with other options than this model, and its weights and banks do not "
            f"fit: {_listing(architecture)}. Build the model with the checkpoint's values (the CLI: the same "
            f"--model.* flags as for training), or load it with {name}.load_from_checkpoint(path), which takes them "
            "from the checkpoint."
        )
        _refuse_or_warn(msg, strict)

    own_state = model.state_dict()
    for key in spec.derived_state_keys:
        if key in own_state:
            state_dict[key] = own_state[key]
        else:
            state_dict.pop(key, None)
    misfit = _state_dict_misfit(state_dict, model)
    if misfit:
        msg = f"This {name} checkpoint's state dict does not fit the model: " + "; ".join(misfit) + "."
        _refuse_or_warn(msg, strict)

    restored = [difference for difference in differences if difference.name in spec.restored_hparams]
    inert = [difference for difference in differences if difference.name in spec.inert_hparams]
    scoring = [difference for difference in differences if difference not in restored and difference not in inert]
    if scoring:
        logger.warning(
            "%s: options differ from the checkpoint's and change the scores; the model's values are used: %s. "
            "Pass the checkpoint's values to score as trained.",
            name,
            _listing(scoring),
        )
    if restored:
        logger.warning(
            "%s: options differ from the checkpoint's; anomalib restores the checkpoint's pre-processing, so the "
            "checkpoint's values apply: %s.",
            name,
            _listing(restored),
        )
    if inert:
        logger.info(
            "%s: options differ from the checkpoint's that do not change the loaded model's scores: %s.",
            name,
            _listing(inert),
        )


def _refuse_or_warn(message: str, strict: bool) -> None:
    """Raise :class:`CheckpointMismatchError`, or under ``strict=False`` log the message as a warning."""
    if strict:
        raise CheckpointMismatchError(message)
    logger.warning("%s Loading what fits (strict=False).", message)


class CheckpointGuard:
    """Mixin for ``AnomalibModule`` subclasses: readable checkpoint files, and checkpoints that fit the model.

    Put it before ``AnomalibModule`` in the bases and set :attr:`checkpoint_spec`. It provides ``on_load_checkpoint``
    (runs :func:`check_checkpoint`, then the parent's hook), ``setup`` (installs :class:`FileNamingCheckpointIO` on
    the trainer's strategy for ``ckpt_path`` runs) and ``load_from_checkpoint`` (names an unreadable file). A subclass
    overriding these must call ``super()``.
    """

    checkpoint_spec: ClassVar[CheckpointSpec]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that does not fit this model and name every option that differs (module docstring)."""
        request = _LOAD_REQUEST.get()
        strict = request.strict if request is not None and request.strict is not None else self.strict_loading
        check_checkpoint(
            checkpoint,
            self,
            dict(self.hparams),
            self.checkpoint_spec,
            stored_hparams=request.stored_hparams if request is not None else None,
            strict=strict,
        )
        super().on_load_checkpoint(checkpoint)

    def setup(self, stage: str) -> None:
        """Before the trainer restores a ``ckpt_path``: make its default checkpoint IO name unreadable files."""
        super().setup(stage)
        strategy = self.trainer.strategy
        current = strategy.checkpoint_io
        if type(current) in {TorchCheckpointIO, AnomalibCheckpointIO}:
            extras = getattr(current, "extra_safe_globals", None) or list(self.checkpoint_safe_globals())
            strategy.checkpoint_io = FileNamingCheckpointIO(extra_safe_globals=extras)

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Load like ``AnomalibModule.load_from_checkpoint``, comparing the file's options with the overrides given.

        The file is first read without its tensors: another model's checkpoint is refused before the model is built
        from its options (which could try to download or build another backbone).

        A checkpoint without post-processor state was saved with ``post_processor=False`` (an argument anomalib does
        not store) and is loaded that way, raw scores as they were saved, unless ``post_processor`` is given.

        Raises:
            CheckpointFileError: the file is empty, truncated or not a torch checkpoint.
            CheckpointMismatchError: see :func:`check_checkpoint`.

        """
        contents = read_checkpoint(checkpoint_path, cls.checkpoint_safe_globals())
        stored = None
        if contents is not None:
            state_dict = check_written_by(contents, cls.checkpoint_spec)
            stored = stored_hparams_of(contents) if hparams_file is None else None
            if "post_processor" not in kwargs and not any(key.startswith("post_processor.") for key in state_dict):
                # Saved with post_processor=False: anomalib does not store that argument, and the default
                # post-processor's thresholds and normalisation bounds would be missing from the state dict.
                kwargs["post_processor"] = False
        del contents
        given = _GIVEN_OPTIONS.get()
        if given is not None and stored is not None:
            name_options_not_used(stored, given, cls.checkpoint_spec)
        token = _LOAD_REQUEST.set(_LoadRequest(stored_hparams=stored, strict=strict))
        try:
            return super().load_from_checkpoint(
                checkpoint_path,
                map_location=map_location,
                hparams_file=hparams_file,
                strict=strict,
                weights_only=weights_only,
                **kwargs,
            )
        finally:
            _LOAD_REQUEST.reset(token)
