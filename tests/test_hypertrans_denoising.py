"""The target sensor's filter (``target_denoising``): noise estimate, SURE choice, state, and scoring through it."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from anomalib_hypergraph.models.hypertrans.denoising import (
    DEFAULT_BLUR_CANDIDATES,
    NoiseStatistics,
    TargetDenoiser,
    choose_blur,
    gaussian_kernel,
)
from anomalib_hypergraph.models.hypertrans.torch_model import SOURCE, TARGET
from anomalib_hypergraph.models.smoothing import blur_separably
from tests.conftest import TINY_IMAGE_SIZE
from tests.test_hypertrans_model import make_model


def coarse_scene(count: int = 4, size: int = 128, seed: int = 0) -> torch.Tensor:
    """Images with no detail finer than 8 pixels (a coarse sensor): a random 16 x 16 field upsampled smoothly."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    return functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)


def sharp_scene(count: int = 4, size: int = 128, seed: int = 0) -> torch.Tensor:
    """Noise-free piecewise-constant images with sharp edges (random rectangles on a grey ground)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.full((count, 3, size, size), 0.5)
    for image in images:
        for _ in range(12):
            top, left = torch.randint(0, size - 8, (2,), generator=generator).tolist()
            height, width = torch.randint(3, 40, (2,), generator=generator).tolist()
            image[:, top : top + height, left : left + width] = torch.rand(3, 1, 1, generator=generator)
    return images


def noisy(images: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    return images + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


def test_the_noise_estimate_reads_white_noise_on_a_coarse_image() -> None:
    for std in (0.02, 0.05):
        report = choose_blur(
            NoiseStatistics.of(noisy(coarse_scene(), std), DEFAULT_BLUR_CANDIDATES), DEFAULT_BLUR_CANDIDATES
        )
        assert all(abs(value / std - 1) < 0.1 for value in report.noise), (std, report.noise)


def test_a_noisy_coarse_sensor_is_filtered_and_sure_predicts_the_error_against_the_clean_image() -> None:
    clean = coarse_scene()
    observed = noisy(clean, 0.05)
    report = choose_blur(NoiseStatistics.of(observed, DEFAULT_BLUR_CANDIDATES), DEFAULT_BLUR_CANDIDATES)
    assert report.sigma >= 1.0
    # SURE is an estimate of the mean squared error against the clean image, which the test knows.
    for sigma, risk in zip(report.candidates, report.risks, strict=True):
        filtered = blur_separably(observed, gaussian_kernel(sigma)) if sigma else observed
        true_error = float((filtered - clean).square().mean())
        assert abs(risk / true_error - 1) < 0.1, (sigma, risk, true_error)
    # The chosen blur removes most of the noise energy (the unfiltered error is the noise variance).
    assert report.risks[report.candidates.index(report.sigma)] < 0.3 * report.risks[0]


def test_a_sharp_noise_free_sensor_is_left_as_it_is() -> None:
    report = choose_blur(NoiseStatistics.of(sharp_scene(), DEFAULT_BLUR_CANDIDATES), DEFAULT_BLUR_CANDIDATES)
    assert report.sigma == 0.0


def test_statistics_of_batches_combine_as_those_of_all_images_at_once_and_a_repeated_shot_counts_once() -> None:
    images = noisy(coarse_scene(count=5), 0.03)
    candidates = DEFAULT_BLUR_CANDIDATES
    whole = choose_blur(NoiseStatistics.of(images, candidates), candidates)
    first, second = (
        NoiseStatistics.of(images[:2], candidates),
        NoiseStatistics.of(images[2:], candidates, torch.arange(2, 5)),
    )
    repeated = NoiseStatistics.of(images[1:3], candidates, torch.arange(1, 3))  # a cycled loader's second pass
    for parts in ([first, second], [first, repeated, second]):
        combined = choose_blur(NoiseStatistics.combined(parts), candidates)
        assert combined.sigma == whole.sigma
        assert combined.risks == pytest.approx(whole.risks, rel=1e-9)
        assert combined.noise == pytest.approx(whole.noise, rel=1e-9)
    # Without its key the repeat would count twice and move the statistics.
    doubled = NoiseStatistics.of(images[1:3], candidates, torch.arange(10, 12))
    assert choose_blur(NoiseStatistics.combined([first, doubled, second]), candidates).risks != pytest.approx(
        whole.risks, rel=1e-9
    )


def test_the_filter_keeps_a_constant_image_and_its_size_at_the_borders() -> None:
    flat = torch.full((2, 3, 20, 24), 0.7)
    torch.testing.assert_close(blur_separably(flat, gaussian_kernel(2.0)), flat)


def test_the_filter_round_trips_through_the_state_dict_and_old_states_mean_no_filter() -> None:
    fitted = TargetDenoiser("auto")
    fitted.fit(NoiseStatistics.of(noisy(coarse_scene(), 0.05), fitted.candidates))
    assert float(fitted.sigma) > 0
    images = noisy(coarse_scene(count=2, seed=3), 0.05)
    restored = TargetDenoiser("auto")
    restored.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(restored(images), fitted(images))
    assert float(restored.sigma) == float(fitted.sigma)
    old = TargetDenoiser("auto")
    old.load_state_dict({})  # a checkpoint from before the filter
    assert old.kernel.numel() == 0
    torch.testing.assert_close(old(images), images)


@pytest.mark.parametrize("option", [-1.0, "sharpen", True])
def test_a_bad_option_is_refused_naming_it(option: object) -> None:
    with pytest.raises(ValueError, match="target_denoising"):
        TargetDenoiser(option)  # type: ignore[arg-type]


def test_a_min_gain_outside_0_1_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="target_denoising_min_gain"):
        TargetDenoiser("auto", min_gain=1.0)


def test_auto_without_statistics_is_refused() -> None:
    with pytest.raises(ValueError, match="statistics of the target shots"):
        TargetDenoiser("auto").fit(None)


def test_the_model_scores_a_test_image_through_the_filter_it_banked_the_shots_with() -> None:
    """Filtering is part of the model: raw images into a filtering model == filtered images into a plain one."""
    generator = torch.Generator().manual_seed(0)
    source, shots, tests = (
        torch.rand(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator) for count in (3, 2, 3)
    )
    filtering = make_model(use_rectification=False, target_denoising=1.0).eval()
    plain = make_model(use_rectification=False, target_denoising=0.0).eval()
    plain.load_state_dict(filtering.state_dict(), strict=False)  # the same (random) backbone
    for model in (filtering, plain):
        model.fit_target_denoising(None)
        with torch.no_grad():
            model.memory_bank.set(SOURCE, model.embed(source))
            model.memory_bank.set(TARGET, model.embed(filtering.denoiser(shots)))
        model.fit_banks(iterations=0, lr=1e-3)
    assert float(filtering.denoiser.sigma) == 1.0 and plain.denoiser.kernel.numel() == 0
    with torch.no_grad():
        through_model = filtering(tests)
        prefiltered = plain(filtering.denoiser(tests))
        unfiltered = plain(tests)
    torch.testing.assert_close(through_model.pred_score, prefiltered.pred_score)
    torch.testing.assert_close(through_model.anomaly_map, prefiltered.anomaly_map)
    assert not torch.allclose(through_model.pred_score, unfiltered.pred_score)


def test_a_blur_that_removes_less_than_min_gain_of_the_noise_is_not_taken() -> None:
    statistics = NoiseStatistics.of(noisy(coarse_scene(), 0.05), DEFAULT_BLUR_CANDIDATES)
    taken = choose_blur(statistics, DEFAULT_BLUR_CANDIDATES, min_gain=0.0)
    assert taken.sigma == taken.best > 0
    assert 0.7 < taken.gain < 1
    refused = choose_blur(statistics, DEFAULT_BLUR_CANDIDATES, min_gain=0.99)
    assert refused.sigma == 0.0 and refused.best == taken.best and refused.gain == taken.gain
    assert "no filter" in str(refused) and f"{taken.best:g} px" in str(refused)
