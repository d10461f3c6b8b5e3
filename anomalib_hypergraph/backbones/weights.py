"""Reading weight files and loading them strictly into modules, with errors that name the file.

Backbone weights on machines without internet come from local files (``pretrained_weights: /path/to/weights.pth``).
These helpers read the common container formats, unwrap the usual nesting of training checkpoints, and refuse
silently partial loads: a file that does not fit the model raises :class:`BackboneWeightsError` listing what differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

# Keys under which training scripts commonly nest the actual parameter mapping.
_NESTING_KEYS = ("state_dict", "model", "module")
# Prefix that (Distributed)DataParallel adds to every parameter name.
_DATA_PARALLEL_PREFIX = "module."
# How many offending keys an error message lists before summarising the rest.
_KEYS_SHOWN = 5
# BatchNorm counters: not needed for inference, often absent from converted checkpoints.
_BATCHNORM_COUNTER_SUFFIX = "num_batches_tracked"


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be obtained or do not fit the backbone (message says which file and why)."""


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a weights file.

    ``.safetensors`` files are read with the ``safetensors`` package (if installed); every other suffix
    (``.pt``, ``.pth``, ``.bin``, ``.ckpt``...) with ``torch.load(weights_only=True)``, so no arbitrary code from
    the file runs. Nesting under ``"state_dict"``/``"model"``/``"module"`` keys and the ``"module."`` prefix of
    DataParallel checkpoints are removed.

    Args:
        path: Weights file.

    Returns:
        Mapping from parameter/buffer name to tensor.

    Raises:
        BackboneWeightsError: The file is missing, unreadable, or holds no mapping of names to tensors.

    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Backbone weights file not found: {path}"
        raise BackboneWeightsError(msg)
    if path.suffix == ".safetensors":
        content = _read_safetensors(path)
    else:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a corrupt file can make torch.load raise almost any exception type
            msg = (
                f"Could not read backbone weights file {path} with torch.load(weights_only=True): {error}. "
                "Expected a PyTorch state dict saved with torch.save(model.state_dict(), path)."
            )
            raise BackboneWeightsError(msg) from error
    return _unwrap_state_dict(content, path)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` file, explaining how to get the reader if it is not installed."""
    try:
        from safetensors.torch import load_file  # noqa: PLC0415 - optional dependency, only needed for this format
    except ImportError as error:
        msg = f"Reading {path} needs the 'safetensors' package: pip install safetensors"
        raise BackboneWeightsError(msg) from error
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError (not exported in all versions)
        msg = f"Could not read backbone weights file {path} as safetensors: {error}"
        raise BackboneWeightsError(msg) from error


def _unwrap_state_dict(content: object, path: Path) -> dict[str, Tensor]:
    """Strip checkpoint nesting and DataParallel prefixes; check that what is left maps names to tensors."""
    while isinstance(content, Mapping) and not _is_tensor_mapping(content):
        nested = next((content[key] for key in _NESTING_KEYS if isinstance(content.get(key), Mapping)), None)
        if nested is None:
            break
        content = nested
    if not isinstance(content, Mapping) or not content or not _is_tensor_mapping(content):
        found = (
            f"a mapping with keys {list(content)[:_KEYS_SHOWN]}"
            if isinstance(content, Mapping)
            else type(content).__name__
        )
        msg = (
            f"Backbone weights file {path} does not hold a state dict: expected a mapping of parameter names to "
            f"tensors (optionally under 'state_dict' or 'model'), found {found}."
        )
        raise BackboneWeightsError(msg)
    state_dict = dict(content)
    if all(key.startswith(_DATA_PARALLEL_PREFIX) for key in state_dict):
        state_dict = {key.removeprefix(_DATA_PARALLEL_PREFIX): value for key, value in state_dict.items()}
    return state_dict


def _is_tensor_mapping(content: Mapping) -> bool:
    """Whether every key is a string and every value a tensor (what ``nn.Module.state_dict`` returns)."""
    return all(isinstance(key, str) and isinstance(value, Tensor) for key, value in content.items())


def load_weights_into(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module`` strictly: every key and shape must match.

    The only tolerated gap is BatchNorm's ``num_batches_tracked`` counter, which inference never reads and
    checkpoints converted from other frameworks omit; the module keeps its own value for it.

    Args:
        module: Module to fill.
        state_dict: Parameters and buffers, named as in ``module.state_dict()``.
        source: Where the weights come from (a file path or package name), quoted in error messages.

    Raises:
        BackboneWeightsError: Keys are missing or unexpected, or shapes differ; the message lists the first few.

    """
    expected = module.state_dict()
    completed = dict(state_dict)
    for key, value in expected.items():
        if key.endswith(_BATCHNORM_COUNTER_SUFFIX) and key not in completed:
            completed[key] = value
    missing = [key for key in expected if key not in completed]
    unexpected = [key for key in completed if key not in expected]
    mismatched = [
        f"{key}: file {tuple(completed[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in completed and completed[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            _summarise(f"{len(missing)} missing keys", missing),
            _summarise(f"{len(unexpected)} unexpected keys", unexpected),
            _summarise(f"{len(mismatched)} shape mismatches", mismatched),
        ]
        msg = (
            f"Weights from {source} do not fit {type(module).__name__}: "
            + "; ".join(problem for problem in problems if problem)
            + ". Check that the file was saved from the same architecture and configuration."
        )
        raise BackboneWeightsError(msg)
    module.load_state_dict(completed, strict=True)


def _summarise(label: str, items: list[str]) -> str:
    """``label (first few items, ...)`` or an empty string when there are no items."""
    if not items:
        return ""
    shown = ", ".join(items[:_KEYS_SHOWN])
    more = ", ..." if len(items) > _KEYS_SHOWN else ""
    return f"{label} ({shown}{more})"
