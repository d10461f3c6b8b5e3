"""Shared fixtures: tiny random-weight backbones, a small generated cross-domain dataset, an allocation counter."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


class _FreshAllocations(TorchDispatchMode):
    """Record every tensor operation's output that holds new memory (shares no storage with the op's arguments).

    Outputs written through ``out=``, views and in-place results share an argument's storage and are not recorded.
    """

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.allocations: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> object:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        given = {
            arg.untyped_storage().data_ptr() for arg in tree_leaves((args, kwargs)) if isinstance(arg, torch.Tensor)
        }
        for output in tree_leaves(result):
            fresh = isinstance(output, torch.Tensor) and output.untyped_storage().data_ptr() not in given
            if fresh and output.numel() >= self.min_numel:
                self.allocations.append((str(func), tuple(output.shape)))
        return result


@pytest.fixture
def fresh_allocations() -> Callable[[Callable[[], object], int], list[tuple[str, tuple[int, ...]]]]:
    """``fresh_allocations(run, min_numel)``: (op, shape) of each new tensor of >= min_numel elements run() makes."""

    def record(run: Callable[[], object], min_numel: int) -> list[tuple[str, tuple[int, ...]]]:
        with _FreshAllocations(min_numel) as mode:
            run()
        return mode.allocations

    return record
