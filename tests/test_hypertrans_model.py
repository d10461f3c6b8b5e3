"""HyperTransModel (pure torch): adapters start as identity, banks, HDR, CDS and state-dict round trips."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import InferenceBatch

from anomalib_hypergraph.models.hypertrans.lightning_model import patch_keys, split_domains
from anomalib_hypergraph.models.hypertrans.torch_model import (
    SOURCE,
    TARGET,
    HyperTransModel,
    default_perturbed_stages,
    flatten_patches,
)
from tests.conftest import TINY_IMAGE_SIZE, TINY_VIT_KWARGS


def make_model(**overrides: object) -> HyperTransModel:
    arguments = {
        "backbone": "vit_tiny_patch16_224",
        "pretrained": False,
        "model_kwargs": dict(TINY_VIT_KWARGS),
        "num_neighbors": 4,
        "chunk_size": 64,
    }
    arguments.update(overrides)
    return HyperTransModel(**arguments)


def fill_banks(model: HyperTransModel, source_images: torch.Tensor, target_images: torch.Tensor) -> None:
    with torch.no_grad():
        model.memory_bank.set(SOURCE, model.embed(source_images))
        model.memory_bank.set(TARGET, model.embed(target_images))


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


def test_adapters_start_as_identity(images: torch.Tensor) -> None:
    model = make_model().eval()
    with torch.no_grad():
        adapted = model.extract(images)
        frozen = model.feature_extractor(images)
    torch.testing.assert_close(adapted, frozen)
    assert adapted.shape == (6, 32, 8, 8)


def test_default_perturbed_stages_follow_the_paper() -> None:
    model = make_model()
    # 4 blocks: the paper's rule (skip the first two and the last two of 12) leaves block index 2.
    assert default_perturbed_stages(model.feature_extractor) == [2]
    assert sorted(int(stage) for stage in model.perturbation.adapters) == [2]


def test_perturbation_loss_trains_only_the_adapters(images: torch.Tensor) -> None:
    model = make_model(perturbed_stages=[1, 2])
    loss = model.perturbation_loss(images)
    loss.backward()
    backbone_grads = [p.grad for p in model.feature_extractor.parameters() if p.grad is not None]
    adapter_grads = [p.grad for p in model.perturbation.parameters() if p.grad is not None]
    assert loss.item() > 0
    assert not backbone_grads
    assert adapter_grads
    assert any(g.abs().sum() > 0 for g in adapter_grads)


def test_unfitted_model_refuses_to_score(images: torch.Tensor) -> None:
    model = make_model().eval()
    with pytest.raises(RuntimeError, match="no memory bank yet"):
        model(images)


def test_an_image_of_the_target_bank_scores_zero_without_hdr(images: torch.Tensor) -> None:
    model = make_model(use_domain_perturbation=False, use_rectification=False, beta=0.0).eval()
    fill_banks(model, images[:4], images[4:])
    model.store_rectified_banks(None)
    with torch.no_grad():
        result = model(images[4:])
        others = model(images[:2])
    assert isinstance(result, InferenceBatch)
    torch.testing.assert_close(result.pred_score, torch.zeros(2))
    assert torch.all(others.pred_score > 0)
    assert result.anomaly_map.shape[-2:] == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def test_rectification_trains_and_inference_uses_rectified_banks(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = make_model(use_domain_perturbation=False)
    fill_banks(model, images[:4], images[4:])
    problem = model.prepare_rectification()
    num_vertices = model.memory_bank.get(SOURCE).shape[0] + model.memory_bank.get(TARGET).shape[0]
    assert problem.hypergraph.num_vertices == num_vertices
    assert problem.hypergraph.num_edges == num_vertices  # |E| = |F_s| + |F_t|
    num_target = model.memory_bank.get(TARGET).shape[0]
    assert bool(problem.domain[:num_target].eq(1).all())  # target rows first, then source rows
    # Eq. 10: every pseudo feature is the feature of a vertex of the other domain.
    distances = torch.cdist(problem.pseudo, problem.features, compute_mode="donot_use_mm_for_euclid_dist")
    other_domain = problem.domain[:, None] != problem.domain[None, :]
    nearest_other = distances.masked_fill(~other_domain, torch.inf).min(dim=1).values
    assert torch.all(nearest_other < 1e-4)

    optimizer = torch.optim.Adam(model.rectifier.parameters(), lr=1e-2)
    model.rectifier.eval()  # deterministic loss to compare before/after
    first = model.rectification_loss(problem).item()
    model.rectifier.train()
    for _ in range(30):
        optimizer.zero_grad()
        model.rectification_loss(problem).backward()
        optimizer.step()
    model.rectifier.eval()
    last = model.rectification_loss(problem).item()
    assert last < first

    model.store_rectified_banks(problem)
    model.eval()
    assert model.rectified_source.shape == model.memory_bank.get(SOURCE).shape
    assert not torch.allclose(model.rectified_source, model.memory_bank.get(SOURCE))
    with torch.no_grad():
        result = model(images[:3])
    assert result.pred_score.shape == (3,)
    assert torch.isfinite(result.anomaly_map).all()


def test_gaussian_incidence_needs_a_fixed_bandwidth(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        make_model(incidence_kernel="gaussian")
    torch.manual_seed(0)
    model = make_model(incidence_kernel="gaussian", incidence_bandwidth=1.0)
    fill_banks(model, images[:4], images[4:])
    model.store_rectified_banks(model.prepare_rectification())
    model.eval()
    with torch.no_grad():
        together = model(images[:3]).pred_score
        alone = torch.cat([model(images[index : index + 1]).pred_score for index in range(3)])
    torch.testing.assert_close(alone, together)  # one fixed width: a score does not depend on its batch


def test_state_dict_round_trip_reproduces_scores(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = make_model()
    fill_banks(model, images[:4], images[4:])
    problem = model.prepare_rectification()
    model.store_rectified_banks(problem)
    model.eval()
    with torch.no_grad():
        expected = model(images[:2])

    restored = make_model().eval()
    restored.load_state_dict(model.state_dict())
    with torch.no_grad():
        actual = restored(images[:2])
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-6)


def test_flatten_patches_is_row_major() -> None:
    grid = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    rows = flatten_patches(grid)
    assert rows.shape == (8, 3)
    torch.testing.assert_close(rows[1], grid[0, :, 0, 1])
    torch.testing.assert_close(rows[4], grid[1, :, 0, 0])


def test_patch_keys_are_stable_and_unique() -> None:
    keys = patch_keys(["a.png", "b.png"], 64, torch.device("cpu"))
    assert keys.shape == (128,)
    assert keys.unique().numel() == 128
    torch.testing.assert_close(patch_keys(["b.png"], 64, torch.device("cpu")), keys[64:])
    with pytest.raises(ValueError, match="patches per image"):
        patch_keys(["a.png"], 2**15, torch.device("cpu"))


def test_split_domains() -> None:
    source, target = split_domains({"source": "s", "target": "t"})
    assert (source, target) == ("s", "t")
    assert split_domains("t") == (None, "t")
    with pytest.raises(KeyError, match="'target' entry"):
        split_domains({"source": "s"})
