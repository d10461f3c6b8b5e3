"""Shared fixtures: tiny random-weight backbones and a small generated cross-domain dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a model hub; a code path that tries must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MVTEC_AD_ROOT = SHARED_DATA / "mvtec_ad"

TINY_IMAGE_SIZE = 64
TINY_VIT_KWARGS = {"img_size": TINY_IMAGE_SIZE, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="session")
def tiny_hypertrans_kwargs() -> dict:
    """HyperTrans arguments for a 4-block, 32-channel random ViT on 64 px inputs (8 x 8 patch grid)."""
    return {
        "backbone": "vit_tiny_patch16_224",
        "pretrained": False,
        "model_kwargs": dict(TINY_VIT_KWARGS),
        "image_size": (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
        "epochs_perturbation": 1,
        "epochs_rectification": 5,
        "coreset_sampling_ratio": 0.5,
        "num_neighbors": 4,
        "chunk_size": 256,
        "visualizer": False,
    }


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MVTec 3D-AD-style dataset (one category, 64 px), generated once per test session."""
    from anomalib_hypergraph.data import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec3d

    root = tmp_path_factory.mktemp("synthetic") / "data"
    return generate_synthetic_mvtec3d(
        root,
        categories=[SYNTHETIC_CATEGORIES[0]],
        num_train=6,
        num_validation=1,
        num_test_good=3,
        num_test_defect=4,
        image_size=TINY_IMAGE_SIZE,
        seed=0,
    )


@pytest.fixture(scope="session")
def synthetic_category() -> str:
    """The category that ``synthetic_root`` holds."""
    from anomalib_hypergraph.data import SYNTHETIC_CATEGORIES

    return SYNTHETIC_CATEGORIES[0]
