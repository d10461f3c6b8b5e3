"""Offline-capable backbones: weight loading, packaged EfficientNet-Lite weights, patch-feature and CLIP encoders."""

from anomalib_hypergraph.backbones.clip import ClipBackbone, ClipVisualFeatures, register_open_clip_config
from anomalib_hypergraph.backbones.efficientnet_lite import EFFICIENTNET_LITE_VARIANTS, efficientnet_lite_state_dict
from anomalib_hypergraph.backbones.factory import (
    BackboneDataConfig,
    backbone_data_config,
    backbone_input_size,
    backbone_normalization,
    create_open_clip_model,
    create_timm_backbone,
)
from anomalib_hypergraph.backbones.feature_extractor import PatchFeatureExtractor, StageHook
from anomalib_hypergraph.backbones.weights import BackboneWeightsError, load_state_dict_file, load_weights_into

__all__ = [
    "EFFICIENTNET_LITE_VARIANTS",
    "BackboneDataConfig",
    "BackboneWeightsError",
    "ClipBackbone",
    "ClipVisualFeatures",
    "PatchFeatureExtractor",
    "StageHook",
    "backbone_data_config",
    "backbone_input_size",
    "backbone_normalization",
    "create_open_clip_model",
    "create_timm_backbone",
    "efficientnet_lite_state_dict",
    "load_state_dict_file",
    "load_weights_into",
    "register_open_clip_config",
]
