"""HyperTransModel (pure torch): adapters start as identity, banks, HDR, CDS and state-dict round trips."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import InferenceBatch

from anomalib_hypergraph.models import HyperTrans
from anomalib_hypergraph.models.hypertrans.lightning_model import patch_keys, split_domains
from anomalib_hypergraph.models.hypertrans.torch_model import (
    SOURCE,
    TARGET,
    HyperTransModel,
    default_perturbed_stages,
    dihedral_views,
    flatten_patches,
    undo_dihedral_view,
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
    model.fit_banks(iterations=0, lr=1e-3)
    with torch.no_grad():
        result = model(images[4:])
        others = model(images[:2])
    assert isinstance(result, InferenceBatch)
    torch.testing.assert_close(result.pred_score, torch.zeros(2))
    assert torch.all(others.pred_score > 0)
    assert result.anomaly_map.shape[-2:] == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def test_rectification_trains_and_a_resubmitted_shot_lands_on_its_stored_feature(images: torch.Tensor) -> None:
    model = make_model(use_domain_perturbation=False, beta=0.0)
    fill_banks(model, images[:4], images[4:])
    report = model.fit_banks(iterations=30, lr=1e-2)
    assert len(report.losses) == 30
    assert report.target_rows == 2 * 64
    assert report.source_rows == 4 * 64
    assert 0.0 <= report.fallback_share <= 1.0
    model.eval()
    assert model.rectified_source.shape == model.memory_bank.get(SOURCE).shape
    assert not torch.allclose(model.rectified_source, model.memory_bank.get(SOURCE))
    with torch.no_grad():
        shots = model(images[4:])
        unseen = model(images[:3])
    # The same operator rectifies bank vertices and queries: a target shot re-submitted as a query finds its own
    # stored features at distance 0 (the old transductive-bank / inductive-query split scored it like a new image).
    torch.testing.assert_close(shots.pred_score, torch.zeros(2), rtol=0, atol=1e-5)
    assert torch.all(unseen.pred_score > 0.05)
    assert torch.isfinite(unseen.anomaly_map).all()


def test_kernel_is_fitted_on_the_bank_and_scores_do_not_depend_on_the_batch(images: torch.Tensor) -> None:
    for kernel in ("reciprocal", "gaussian"):
        model = make_model(incidence_kernel=kernel)
        fill_banks(model, images[:4], images[4:])
        model.fit_banks(iterations=3, lr=1e-3)
        model.eval()
        bank = torch.cat([model.memory_bank.get(TARGET), model.memory_bank.get(SOURCE)])
        distances = torch.cdist(bank, bank).topk(4, largest=False).values[:, 1:]
        assert float(model.kernel.scale) == pytest.approx(float(distances.mean()), rel=1e-4)
        with torch.no_grad():
            together = model(images[:3]).pred_score
            alone = torch.cat([model(images[index : index + 1]).pred_score for index in range(3)])
        torch.testing.assert_close(alone, together)


def test_scale_free_kernel_makes_scores_invariant_to_the_feature_scale(images: torch.Tensor) -> None:
    model = make_model(use_domain_perturbation=False, use_rectification=False)
    with torch.no_grad():
        source, target, query = model.embed(images[:4]), model.embed(images[4:]), model.extract(images[:2])
    scores = []
    for factor in (1.0, 50.0):
        model.memory_bank.set(SOURCE, source * factor)
        model.memory_bank.set(TARGET, target * factor)
        model.fit_banks(iterations=0, lr=1e-3)
        with torch.no_grad():
            scores.append(model.score_features(query * factor, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).pred_score)
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-5)


def test_same_seed_gives_identical_training_whatever_the_global_random_state(images: torch.Tensor) -> None:
    initial = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = make_model(seed=7)
        initial.append({**model.perturbation.state_dict(), **model.rectifier.state_dict()})
    assert all(torch.equal(initial[0][key], initial[1][key]) for key in initial[0])  # adapter and HGNN init

    results = []
    for global_seed in (1, 2):
        torch.manual_seed(0)  # the random test backbone itself follows the global state
        model = make_model(seed=7)
        torch.manual_seed(global_seed)
        model.train_perturbation(lambda: [images[:3], images[3:]], epochs=2, lr=1e-2)
        model.eval()
        fill_banks(model, images[:4], images[4:])
        model.fit_banks(iterations=5, lr=1e-2)
        with torch.no_grad():
            results.append((model.state_dict(), model(images[:2]).pred_score))
    (first_state, first_scores), (second_state, second_scores) = results
    assert first_state.keys() == second_state.keys()
    for key in first_state:
        assert torch.equal(first_state[key], second_state[key]), key
    assert torch.equal(first_scores, second_scores)
    other = make_model(seed=8)
    assert not torch.equal(
        other.perturbation.state_dict()["adapters.2.down.weight"], first_state["perturbation.adapters.2.down.weight"]
    )


def test_evidence_weight_gives_no_weight_to_a_source_domain_far_from_the_target(images: torch.Tensor) -> None:
    model = make_model(use_domain_perturbation=False, use_rectification=False)
    with torch.no_grad():
        source, target = model.embed(images[:4]), model.embed(images[4:])
    model.memory_bank.set(SOURCE, source + 100.0)  # the domains never meet
    model.memory_bank.set(TARGET, target)
    report = model.fit_banks(iterations=0, lr=1e-3)
    assert report.source_weight == 0.0
    model.memory_bank.set(SOURCE, torch.cat([source, target + 1e-3]))  # every target vertex has source neighbours
    report = model.fit_banks(iterations=0, lr=1e-3)
    assert report.source_weight == pytest.approx(0.6)
    fixed = make_model(use_domain_perturbation=False, use_rectification=False, domain_weighting="fixed")
    fixed.memory_bank.set(SOURCE, source + 100.0)
    fixed.memory_bank.set(TARGET, target)
    assert fixed.fit_banks(iterations=0, lr=1e-3).source_weight == pytest.approx(0.6)


def test_state_dict_round_trip_reproduces_scores(images: torch.Tensor) -> None:
    model = make_model()
    fill_banks(model, images[:4], images[4:])
    model.fit_banks(iterations=3, lr=1e-3)
    model.eval()
    with torch.no_grad():
        expected = model(images[:2])

    restored = make_model().eval()
    restored.load_state_dict(model.state_dict())
    with torch.no_grad():
        actual = restored(images[:2])
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(6, 6), (4, 6)], ids=["square: 8 views", "non-square: 4 views"])
def test_undo_dihedral_view_maps_every_view_back(size: tuple[int, int]) -> None:
    grid = torch.arange(size[0] * size[1], dtype=torch.float32).reshape(1, *size)
    views = dihedral_views(grid)
    assert len({tuple(view.flatten().tolist()) for view in views}) == len(views)
    for index, view in enumerate(views):
        assert torch.equal(undo_dihedral_view(view, index, square=size[0] == size[1]), grid)


def test_test_views_score_every_view_of_an_image_alike(images: torch.Tensor) -> None:
    """Averaged over all eight views, an image and its rotated or mirrored copy get the same score and map."""
    model = make_model(shot_augmentation="dihedral")
    fill_banks(model, images[:4], images[4:])
    model.fit_banks(iterations=2, lr=1e-3)
    model.eval()
    for test_views in (False, True):
        model.test_views = test_views
        with torch.no_grad():
            outputs = [model(view) for view in dihedral_views(images[:2])]
        maps_back = [undo_dihedral_view(out.anomaly_map, index) for index, out in enumerate(outputs)]
        same = all(
            torch.allclose(out.pred_score, outputs[0].pred_score, atol=1e-5)
            and torch.allclose(back, maps_back[0], atol=1e-5)
            for out, back in zip(outputs, maps_back, strict=True)
        )
        assert same == test_views  # a single reading depends on the orientation (the backbone is not invariant)


def test_test_views_with_only_the_shot_as_it_is_score_as_without(images: torch.Tensor) -> None:
    model = make_model()
    fill_banks(model, images[:4], images[4:])
    model.fit_banks(iterations=2, lr=1e-3)
    model.shot_view_indices = torch.tensor([0])
    model.eval()
    outputs = []
    for test_views in (False, True):
        model.test_views = test_views
        with torch.no_grad():
            outputs.append(model(images[:2]))
    torch.testing.assert_close(outputs[1].pred_score, outputs[0].pred_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs[1].anomaly_map, outputs[0].anomaly_map, rtol=0, atol=1e-6)


def test_auto_test_views_follow_the_fit_time_choice_and_old_checkpoints_read_images_as_they_are(
    images: torch.Tensor,
) -> None:
    model = make_model(shot_augmentation="dihedral")
    fill_banks(model, images[:4], images[4:])
    model.fit_banks(iterations=2, lr=1e-3)
    model.shot_view_indices = torch.tensor([0, 2, 5])
    model.eval()
    outputs = {}
    for option in (False, True):
        model.test_views = option
        with torch.no_grad():
            outputs[option] = model(images[:2])
    model.test_views = "auto"
    for chosen, expected in (
        (model.shot_view_indices.clone(), outputs[True]),
        (torch.empty(0, dtype=torch.long), outputs[False]),
    ):
        model.test_view_indices = chosen
        with torch.no_grad():
            actual = model(images[:2])
        torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=1e-6)
        torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-6)
    with torch.no_grad():  # what "auto" reads, when asked to read at all, are the shot views, as with True
        auto_read = model.view_averaged_distances(images[:2])
        model.test_views = True
        forced_read = model.view_averaged_distances(images[:2])
    for domain, grid in forced_read.items():
        torch.testing.assert_close(auto_read[domain], grid, rtol=0, atol=1e-6)
    model.test_view_indices = model.shot_view_indices.clone()
    state = {key: value for key, value in model.state_dict().items() if key != "test_view_indices"}
    restored = make_model(shot_augmentation="dihedral")
    restored.load_state_dict(state)  # a checkpoint from before the choice
    assert restored.test_view_indices.numel() == 0 and not restored.reads_test_views


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


def test_an_image_size_too_small_for_the_blur_is_refused_at_construction(tiny_hypertrans_kwargs: dict) -> None:
    """sigma 4 blurs with a 33-pixel kernel; at 16 px torch failed in the first forward with a padding error."""
    with pytest.raises(
        ValueError, match=r"image_size \(16, 16\) is too small .* sigma=4.0 .* 33-pixel kernel"
    ) as error:
        HyperTrans(**{**tiny_hypertrans_kwargs, "image_size": (16, 16)})
    assert "at least [17, 17]" in str(error.value) and "sigma below 3.875" in str(error.value)
    model = HyperTrans(**{**tiny_hypertrans_kwargs, "image_size": (16, 16), "sigma": 3.8})  # what the message offers
    assert model.model.scorer.blur(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)
