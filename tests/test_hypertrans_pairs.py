"""Paired shots (ours): the source-to-target translation, the calibrated union and the choice of shot views."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from anomalib_hypergraph.data.domains import SOURCE, TARGET
from anomalib_hypergraph.hypergraph import IncidenceKernel, chunked_knn
from anomalib_hypergraph.models.hypertrans.lightning_model import key_roots, patch_keys
from anomalib_hypergraph.models.hypertrans.scoring import CrossDomainScorer
from anomalib_hypergraph.models.hypertrans.sensor_map import Alignment, SensorTranslation, register_pairs
from anomalib_hypergraph.models.hypertrans.torch_model import (
    VIEW_HELD_OUT_IMAGES,
    VIEW_PROBE_IMAGES,
    HyperTransModel,
    PairedShots,
    image_key,
    image_root,
    view_probe_split,
)


def linear_pairs(rows: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(rows, 12, generator=generator)
    weight, bias = torch.randn(12, 6, generator=generator), torch.randn(6, generator=generator)
    target = source @ weight + bias + noise * torch.randn(rows, 6, generator=generator)
    return source, target, weight, bias


def test_translation_recovers_a_linear_sensor_and_prefers_weak_ridge_on_clean_pairs() -> None:
    source, target, weight, bias = linear_pairs(600, noise=0.01, seed=0)
    translation = SensorTranslation()
    report = translation.fit(source, target, torch.arange(600) % 4)
    assert report.ridge == min(report.candidates)
    assert report.validation_errors == tuple(sorted(report.validation_errors))  # error grows with the ridge here
    torch.testing.assert_close(translation.weight, weight, atol=5e-3, rtol=0)
    torch.testing.assert_close(translation.bias, bias, atol=5e-3, rtol=0)
    torch.testing.assert_close(translation(source[:5]), source[:5] @ weight + bias, atol=0.02, rtol=0)


def test_translation_chooses_a_stronger_ridge_when_few_noisy_pairs_overfit() -> None:
    source, target, _, _ = linear_pairs(40, noise=3.0, seed=1)
    report = SensorTranslation().fit(source, target, torch.arange(40) % 4)
    assert report.ridge > min(report.candidates)


def test_held_out_maps_are_the_fits_without_each_group() -> None:
    source, target, _, _ = linear_pairs(300, noise=0.5, seed=2)
    groups = torch.arange(300) % 3
    report = SensorTranslation().fit(source, target, groups)
    for label in range(3):
        alone = SensorTranslation(ridge_candidates=(report.ridge,))
        alone.fit(source[groups != label], target[groups != label], torch.zeros(int((groups != label).sum())))
        weight, bias = report.held_out_maps[label]
        torch.testing.assert_close(weight, alone.weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(bias, alone.bias, atol=1e-5, rtol=0)


def smooth_grids(generator: torch.Generator, count: int, channels: int, size: int) -> torch.Tensor:
    """Feature grids ``(count, channels, size, size)`` that vary smoothly, like a backbone's patch features."""
    coarse = torch.randn(count, channels, size // 3, size // 3, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def as_rows(grids: torch.Tensor) -> torch.Tensor:
    return grids.permute(0, 2, 3, 1).reshape(-1, grids.shape[1])


@pytest.mark.parametrize(
    "alignment",
    [
        Alignment(0.5, -0.5),
        Alignment(-1.0, 0.5),
        Alignment(0.0, 1.0),
        Alignment(0.0, 0.0, 1 + 0.5 / 9),
        Alignment(-0.5, 0.5, 1 - 1 / 9),
    ],
    ids=["offset", "another offset", "one axis", "zoom", "offset and zoom out"],
)
def test_registration_finds_the_offset_and_zoom_between_the_cameras(alignment: Alignment) -> None:
    generator = torch.Generator().manual_seed(21)
    source = smooth_grids(generator, 3, 6, 18)
    mixing = torch.randn(6, 5, generator=generator)
    seen = alignment.resample(source)  # the target camera looks `alignment` away (its corners: half a patch per step)
    target = as_rows(seen) @ mixing + 0.01 * torch.randn(3 * 18 * 18, 5, generator=generator)
    views = torch.zeros(3 * 18 * 18, dtype=torch.long)
    registered, found = register_pairs(as_rows(source), target, views, (18, 18), max_offset=1.0, ridge=0.1)
    assert found == {0: alignment}
    torch.testing.assert_close(registered, as_rows(seen))


def test_registration_leaves_aligned_pairs_untouched_and_refuses_broken_grids() -> None:
    generator = torch.Generator().manual_seed(22)
    source = as_rows(smooth_grids(generator, 2, 6, 12))
    noise = 0.01 * torch.randn(source.shape[0], 4, generator=generator)
    target = source @ torch.randn(6, 4, generator=generator) + noise
    views = torch.arange(2).repeat_interleave(144)  # two views, one grid each
    registered, found = register_pairs(source, target, views, (12, 12), max_offset=1.0, ridge=0.1)
    assert found == {0: Alignment(), 1: Alignment()}
    assert torch.equal(registered, source)
    _, none_tried = register_pairs(source, target, views, (12, 12), max_offset=0.0, ridge=0.1)
    assert none_tried == {0: Alignment(), 1: Alignment()}
    with pytest.raises(ValueError, match="not whole 12 x 12 grids"):
        register_pairs(source[:-1], target[:-1], views[:-1], (12, 12), max_offset=1.0, ridge=0.1)


def test_translation_refuses_bad_input_and_unfitted_use() -> None:
    with pytest.raises(ValueError, match="positive"):
        SensorTranslation(ridge_candidates=(0.1, 0.0))
    with pytest.raises(ValueError, match="same n"):
        SensorTranslation().fit(torch.zeros(10, 3), torch.zeros(9, 3), torch.zeros(10))
    with pytest.raises(ValueError, match="more paired rows than channels"):
        SensorTranslation().fit(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3))
    with pytest.raises(RuntimeError, match="fit it on paired shots"):
        SensorTranslation()(torch.zeros(2, 3))


def test_calibrated_union_takes_the_best_explaining_sub_hypergraph_in_its_own_unit() -> None:
    kernel = IncidenceKernel("reciprocal")
    kernel.fit(torch.full((4,), 2.0))
    scorer = CrossDomainScorer(sigma=1.0, image_score="max")
    assert scorer.fit(0.0, translated_source=True, units=(1.0, 4.0)) == "union"
    target = torch.tensor([[[1.0, 3.0], [2.0, 8.0]]])
    source = torch.tensor([[[8.0, 4.0], [4.0, 8.0]]])
    _, patch_map = scorer.patch_maps(target, source, kernel)
    relative = torch.minimum(target / 1.0, source / 4.0)  # 1 - max(H^t, H^s), distances in held-out units
    torch.testing.assert_close(patch_map[:, 0], relative / (1 + relative))
    # The same distances fused by Eq. 18-19 (untranslated source) give another map.
    assert scorer.fit(0.0, translated_source=False, units=None) == "weighted"
    _, weighted = scorer.patch_maps(target, source, kernel)
    torch.testing.assert_close(weighted[:, 0], kernel.defect(target))  # evidence 0: the source has no weight


def test_union_needs_units_and_forced_fusions_apply() -> None:
    with pytest.raises(ValueError, match="needs their units"):
        CrossDomainScorer(source_fusion="union").fit(0.5, translated_source=False, units=None)
    assert CrossDomainScorer(source_fusion="weighted").fit(0.5, translated_source=True, units=(1.0, 1.0)) == "weighted"
    assert CrossDomainScorer().fit(None, translated_source=True, units=(1.0, 1.0)) == "target only"
    with pytest.raises(ValueError, match="source_fusion"):
        CrossDomainScorer(source_fusion="maximum")


def views_model(augmentation: str, min_share: float = 0.25, **options: object) -> HyperTransModel:
    return HyperTransModel(
        backbone="vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 16, "num_heads": 2},
        shot_augmentation=augmentation,
        view_min_share=min_share,
        chunk_size=64,
        **options,
    )


def test_views_that_explain_held_out_images_are_kept_and_the_others_dropped() -> None:
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 16, generator=generator)  # what held-out normal patches look like
    probe_views = [normal + 0.01 * torch.randn(64, 16, generator=generator) for _ in range(3)]
    probe_views += [normal + 10.0 + torch.randn(64, 16, generator=generator) for _ in range(5)]  # never seen
    held_out = normal + 0.05 * torch.randn(64, 16, generator=generator)
    model = views_model("auto")
    report = model.choose_shot_views(probe_views, held_out)
    assert report.kept == [0, 1, 2]
    assert sum(report.shares[3:]) == 0
    assert model.shot_view_indices.tolist() == [0, 1, 2]
    images = torch.rand(1, 3, 32, 32)
    assert len(model.shot_views(images)) == 3
    assert torch.equal(model.shot_views(images)[0], images)
    assert views_model("dihedral").choose_shot_views(probe_views, held_out).kept == list(range(8))
    assert views_model("none").choose_shot_views(probe_views, held_out).kept == [0]
    assert views_model("auto", min_share=0.0).choose_shot_views(probe_views, held_out).kept == list(range(8))


def test_test_views_are_read_only_when_turned_normal_images_stay_as_close() -> None:
    generator = torch.Generator().manual_seed(1)
    held_out = torch.randn(64, 16, generator=generator)
    plain = held_out + 0.1 * torch.randn(64, 16, generator=generator)
    alike = [plain, *(held_out + 0.1 * torch.randn(64, 16, generator=generator) for _ in range(7))]
    farther = [plain, *(held_out + 0.3 * torch.randn(64, 16, generator=generator) for _ in range(7))]
    model = views_model("dihedral")
    report = model.choose_shot_views(alike, held_out)
    assert abs(report.view_distance_ratio - 1.0) < 0.1
    assert report.test_views and model.reads_test_views
    assert torch.equal(model.test_view_indices, model.shot_view_indices)
    report = model.choose_shot_views(farther, held_out)
    assert report.view_distance_ratio > 2.0  # three times the noise: about three times as far
    assert not report.test_views and not model.reads_test_views
    assert model.test_view_indices.numel() == 0
    lenient = views_model("dihedral", test_view_tolerance=report.view_distance_ratio)
    assert lenient.choose_shot_views(farther, held_out).test_views
    shots_only = views_model("dihedral")
    report = shots_only.choose_shot_views(alike, held_out, from_source=False)
    assert report.view_distance_ratio is None and not shots_only.reads_test_views  # shots alone are too few to judge
    forced = views_model("dihedral", test_views=True)
    forced.choose_shot_views(farther, held_out)
    assert forced.reads_test_views  # the option overrides the evidence
    single = views_model("none")
    report = single.choose_shot_views(alike, held_out)
    assert report.view_distance_ratio is None and not single.reads_test_views  # nothing to read but the image
    with pytest.raises(ValueError, match="test_views"):
        views_model("auto", test_views="always")


def test_view_probe_split_orders_by_key_and_holds_images_out() -> None:
    keys = [(index * 37) % 101 for index in range(1, 2 * (VIEW_PROBE_IMAGES + VIEW_HELD_OUT_IMAGES))]
    probes, held_out = view_probe_split(keys)
    ordered = sorted(keys)
    assert [keys[p] for p in probes] == ordered[:VIEW_PROBE_IMAGES]
    assert [keys[p] for p in held_out] == ordered[VIEW_PROBE_IMAGES : VIEW_PROBE_IMAGES + VIEW_HELD_OUT_IMAGES]
    assert view_probe_split([30, 10, 20]) == ([1, 2], [0])  # few images: all but one probe, one held out
    assert view_probe_split([5]) == ([], [])


def test_the_view_probes_do_not_depend_on_where_the_data_set_lies(tmp_path: Path) -> None:
    names = [f"train/good/{index:03d}.png" for index in range(60)]
    here = [str(tmp_path / "a" / "bottle" / name) for name in names]
    moved = [f"../elsewhere/bottle/{name}" for name in names]
    keys_here = [image_key(path, image_root(here)) for path in here]
    keys_moved = [image_key(path, image_root(moved)) for path in moved]
    assert keys_here == keys_moved
    assert view_probe_split(keys_here) == view_probe_split(keys_moved)
    assert len(set(keys_here)) == len(names)  # still one key per image
    assert image_key(here[0]) != image_key(moved[0])  # without a root the whole path counts
    torch.testing.assert_close(
        patch_keys(here[:2], 4, torch.device("cpu"), root=image_root(here)),
        patch_keys(moved[:2], 4, torch.device("cpu"), root=image_root(moved)),
    )


def test_key_roots_read_each_domains_folder_from_its_dataset(tmp_path: Path) -> None:
    def loader(folder: str) -> SimpleNamespace:
        paths = [str(tmp_path / folder / "train" / "good" / f"{index}.png") for index in range(3)]
        return SimpleNamespace(dataset=SimpleNamespace(samples=pd.DataFrame({"image_path": paths})))

    roots = key_roots({SOURCE: loader("rgb_set"), TARGET: loader("depth_set")})
    assert roots == {
        SOURCE: str(tmp_path / "rgb_set" / "train" / "good"),
        TARGET: str(tmp_path / "depth_set" / "train" / "good"),
    }
    assert key_roots(loader("only"))[TARGET] == str(tmp_path / "only" / "train" / "good")
    assert key_roots({TARGET: SimpleNamespace(dataset=[1, 2])}) == {SOURCE: None, TARGET: None}


def test_paired_shots_translate_the_source_bank_and_set_the_union_units() -> None:
    generator = torch.Generator().manual_seed(3)
    model = views_model("dihedral", translation_direction="bank")
    channels = model.feature_extractor.feature_dim
    sensor = torch.randn(channels, channels, generator=generator) / channels**0.5
    shots_source = torch.randn(2 * 4 * 16, channels, generator=generator)
    # As in a sensor upgrade, the paired captures are source images too.
    source_rows = torch.cat([torch.randn(400, channels, generator=generator), shots_source])
    pairs = PairedShots(
        source=shots_source,
        target=shots_source @ sensor + 0.01 * torch.randn(shots_source.shape, generator=generator),
        shot=torch.arange(2).repeat_interleave(64),
        view=torch.arange(4).repeat_interleave(16).repeat(2),
    )
    model.memory_bank.set("source", source_rows)
    model.memory_bank.set("target", pairs.target)
    model.rectifier = None  # the translation alone
    report = model.fit_banks(iterations=0, lr=1e-3, pairs=pairs)
    assert report.translation is not None
    assert report.fusion == "union"
    assert report.units is not None and all(unit > 0 for unit in report.units)
    torch.testing.assert_close(model.memory_bank.get("source"), source_rows @ sensor, atol=0.05, rtol=0)
    assert bool(model.source_bank_translated)
    # The translated bank now meets the target shots: each finds its own pair, unlike before.
    before = chunked_knn(pairs.target, source_rows, 1)[0].mean()
    after = chunked_knn(pairs.target, model.memory_bank.get("source"), 1)[0].mean()
    assert after < 0.1 * before
    with pytest.raises(RuntimeError, match="already translated"):
        model.translate_source_bank(pairs)


def test_misaligned_pairs_are_registered_before_the_map_is_fitted() -> None:
    generator = torch.Generator().manual_seed(23)
    model = views_model("none", translation_direction="bank")
    channels = model.feature_extractor.feature_dim
    source = smooth_grids(generator, 2, channels, 15)
    target = as_rows(Alignment(0.5, 0.5).resample(source)).flip(1)  # a channel permutation, half a patch away
    shots = torch.arange(2).repeat_interleave(225)
    pairs = PairedShots(
        source=as_rows(source), target=target, shot=shots, view=torch.zeros(450, dtype=torch.long), grid=(15, 15)
    )
    model.memory_bank.set("source", torch.cat([torch.randn(100, channels, generator=generator), as_rows(source)]))
    model.memory_bank.set("target", target)
    report = model.fit_banks(iterations=0, lr=1e-3, pairs=pairs)
    assert report.pair_alignment == {0: (0.5, 0.5, 1.0)}
    assert model.pair_alignment.tolist() == [[0.5, 0.5, 1.0]]  # the checkpoint records how the pairs were read
    registered_error = min(report.translation.validation_errors)
    unregistered = views_model("none", translation_direction="bank", pair_registration=0.0)
    other_source = torch.randn(100, channels, generator=generator)
    unregistered.memory_bank.set("source", torch.cat([other_source, as_rows(source)]))
    unregistered.memory_bank.set("target", target)
    plain = unregistered.fit_banks(iterations=0, lr=1e-3, pairs=pairs)
    assert plain.pair_alignment == {}
    assert unregistered.pair_alignment.shape == (0, 3)
    assert registered_error < 0.5 * min(plain.translation.validation_errors)
    with pytest.raises(ValueError, match="pair_registration"):
        views_model("none", pair_registration=-1.0)


@pytest.mark.parametrize(
    ("paired", "rectify_translated_source", "rectified"),
    [(True, False, False), (True, True, True), (False, False, True)],
    ids=["pairs: translation, no HDR", "pairs: HDR on request", "no pairs: HDR as in the paper"],
)
def test_hdr_runs_on_a_translated_source_bank_only_on_request(
    paired: bool, rectify_translated_source: bool, rectified: bool
) -> None:
    generator = torch.Generator().manual_seed(5)
    model = views_model("none", rectify_translated_source=rectify_translated_source, translation_direction="bank")
    channels = model.feature_extractor.feature_dim
    shots_source = torch.randn(2 * 16, channels, generator=generator)
    pairs = PairedShots(
        source=shots_source,
        target=shots_source.flip(1) + 0.01 * torch.randn(shots_source.shape, generator=generator),
        shot=torch.arange(2).repeat_interleave(16),
        view=torch.zeros(32, dtype=torch.long),
    )
    model.memory_bank.set("source", torch.cat([torch.randn(200, channels, generator=generator), shots_source]))
    model.memory_bank.set("target", pairs.target)
    report = model.fit_banks(iterations=3, lr=1e-3, pairs=pairs if paired else None)
    assert (report.translation is not None) == paired
    assert (len(report.losses) == 3) == rectified
    assert (report.fallback_share == report.fallback_share) == rectified  # NaN without HDR
    assert (model.hidden_target.shape[-1] > 0) == rectified  # what inference rectifies queries with
    if not rectified:  # the stored banks are the (translated) banks themselves, and queries are matched on them
        torch.testing.assert_close(model.rectified_source, model.memory_bank.get("source"))
        queries = torch.randn(10, channels, generator=generator)
        nearest = model.nearest_distances(queries)
        torch.testing.assert_close(nearest["source"], chunked_knn(queries, model.memory_bank.get("source"), 1)[0][:, 0])


def sensor_pairs(
    generator: torch.Generator, channels: int, *, target_keeps_detail: bool
) -> tuple[PairedShots, torch.Tensor]:
    """Paired shots (2 shots x 64 rows) and a source bank holding the shots' captures among other source rows.

    A target sensor that keeps detail sees every source channel (an orthogonal mix, spread wider than its noise), so
    its queries map back onto their source captures; one that loses detail sees half of them, compressed, so the
    source bank translated into its space explains its patches more tightly than its patches explain the source.
    """
    shots_source = torch.randn(2 * 64, channels, generator=generator)
    mixing = torch.linalg.qr(torch.randn(channels, channels, generator=generator))[0]
    if target_keeps_detail:
        gain, noise = 2.0, 0.3
    else:
        mixing[:, channels // 2 :] = 0
        gain, noise = 0.3, 0.05
    target = gain * shots_source @ mixing + noise * torch.randn(shots_source.shape, generator=generator)
    pairs = PairedShots(
        source=shots_source, target=target, shot=torch.arange(2).repeat_interleave(64), view=torch.zeros(128).long()
    )
    return pairs, torch.cat([torch.randn(300, channels, generator=generator), shots_source])


@pytest.mark.parametrize(("target_keeps_detail", "expected"), [(True, "query"), (False, "bank")])
def test_auto_direction_follows_the_held_out_pairs(target_keeps_detail: bool, expected: str) -> None:
    generator = torch.Generator().manual_seed(11)
    model = views_model("none", translation_direction="auto")
    pairs, source_rows = sensor_pairs(
        generator, model.feature_extractor.feature_dim, target_keeps_detail=target_keeps_detail
    )
    model.memory_bank.set("source", source_rows)
    model.memory_bank.set("target", pairs.target)
    report = model.fit_banks(iterations=0, lr=1e-3, pairs=pairs)
    assert set(report.direction_evidence) == {"bank", "query"}
    assert report.direction == expected
    assert report.direction_evidence[expected] < report.direction_evidence[{"bank": "query", "query": "bank"}[expected]]
    assert report.units is not None and report.units[1] == report.direction_evidence[expected]
    # Only the map of the chosen direction is kept; the bank is translated only in the "bank" direction.
    assert model.query_translation.is_fitted == (expected == "query")
    assert model.translation.is_fitted == (expected == "bank")
    assert bool(model.source_bank_translated) == (expected == "bank")


def test_query_direction_maps_queries_and_keeps_the_source_bank_as_captured(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(13)
    model = views_model("none", translation_direction="query")
    channels = model.feature_extractor.feature_dim
    pairs, source_rows = sensor_pairs(generator, channels, target_keeps_detail=True)
    model.memory_bank.set("source", source_rows)
    model.memory_bank.set("target", pairs.target[:64])
    report = model.fit_banks(iterations=3, lr=1e-3, pairs=pairs)
    assert report.direction == "query" and report.direction_evidence  # forced, yet measured for the units
    assert report.losses == []  # HDR never joins banks of two feature spaces
    torch.testing.assert_close(model.memory_bank.get("source"), source_rows)
    # Unseen target rows of the second shot: mapped into the source space they find their own captures.
    queries = pairs.target[64:]
    nearest = model.nearest_distances(queries)
    mapped = model.query_translation(queries)
    torch.testing.assert_close(nearest["source"], chunked_knn(mapped, source_rows, 1)[0][:, 0])
    assert nearest["source"].mean() < 0.5 * chunked_knn(queries, source_rows, 1)[0][:, 0].mean()
    # The map is state: a reloaded model scores the same, and a later fit without pairs stops mapping queries.
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    reloaded = views_model("none", translation_direction="query")
    reloaded.load_state_dict(torch.load(path))
    torch.testing.assert_close(reloaded.nearest_distances(queries)["source"], nearest["source"])
    model.memory_bank.set("source", source_rows)
    model.fit_banks(iterations=0, lr=1e-3, pairs=None)
    assert not model.query_translation.is_fitted


def test_an_unknown_translation_direction_is_named() -> None:
    with pytest.raises(ValueError, match="translation_direction must be one of"):
        views_model("none", translation_direction="sideways")
