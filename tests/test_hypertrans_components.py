"""Tests of the pure-torch HyperTrans building blocks: DP (Eq. 3-7), HDR (Eq. 8-11) and CDS (Eq. 12-19)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anomalib_hypergraph.hypergraph import SoftHypergraph, chunked_knn, incidence_from_distance
from anomalib_hypergraph.models.hypertrans.perturbation import (
    DomainPerturbation,
    ResidualAdapter,
    adain_perturb,
    channel_statistics,
    perlin_channel_factors,
    perturbation_loss,
    simplified_perturb,
)
from anomalib_hypergraph.models.hypertrans.rectification import ResHGNN, pseudo_features, rectification_loss
from anomalib_hypergraph.models.hypertrans.scoring import CrossDomainScorer, patch_defect_scores


def lag_one_correlation(values: torch.Tensor) -> float:
    """Mean over rows of the correlation between neighbouring entries (channel c vs c+1)."""
    left = values[:, :-1] - values[:, :-1].mean(dim=1, keepdim=True)
    right = values[:, 1:] - values[:, 1:].mean(dim=1, keepdim=True)
    return float(((left * right).sum(1) / (left.norm(dim=1) * right.norm(dim=1))).mean())


class ToyTokenBackbone(nn.Module):
    """Three token-mixing stages (B, T, C) with a stage hook after each, like ``PatchFeatureExtractor``."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stages = nn.ModuleList(nn.Sequential(nn.Linear(channels, channels), nn.Tanh()) for _ in range(3))
        self.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, stage_hook=None) -> torch.Tensor:
        for index, stage in enumerate(self.stages):
            tokens = stage(tokens)
            if stage_hook is not None:
                tokens = stage_hook(index, tokens)
        return tokens


# --------------------------------------------------------------------------------------------- perturbation (DP)
@pytest.mark.parametrize(("shape", "num_prefix_tokens"), [((2, 6, 5, 4), 0), ((3, 10, 6), 1)])
def test_simplified_perturbation_equals_adain(shape: tuple[int, ...], num_prefix_tokens: int) -> None:
    torch.manual_seed(1)
    features = torch.randn(shape) * 3 + 1
    channels = shape[1] if len(shape) == 4 else shape[-1]
    p_avg, p_std = torch.randn(shape[0], channels), torch.randn(shape[0], channels)
    eq5 = adain_perturb(features, p_avg, p_std, num_prefix_tokens)
    eq6 = simplified_perturb(features, p_avg, p_std, num_prefix_tokens)
    assert torch.allclose(eq5, eq6, atol=1e-5)
    assert not torch.allclose(eq6, features, atol=1e-2)


def test_statistics_exclude_prefix_tokens_and_prefix_passes_through() -> None:
    torch.manual_seed(2)
    tokens = torch.randn(2, 5, 3)
    avg, std = channel_statistics(tokens, num_prefix_tokens=1)
    assert avg.shape == std.shape == (2, 1, 3)
    assert torch.allclose(avg[:, 0], tokens[:, 1:].mean(dim=1))
    assert torch.allclose(std[:, 0], tokens[:, 1:].std(dim=1, correction=0), atol=1e-5)

    changed = tokens.clone()
    changed[:, 0] += 100.0
    avg_changed, std_changed = channel_statistics(changed, num_prefix_tokens=1)
    assert torch.equal(avg, avg_changed)
    assert torch.equal(std, std_changed)

    p_avg, p_std = torch.randn(2, 3), torch.randn(2, 3)
    for perturb in (adain_perturb, simplified_perturb):
        out = perturb(changed, p_avg, p_std, num_prefix_tokens=1)
        assert torch.equal(out[:, 0], changed[:, 0])
        assert not torch.allclose(out[:, 1:], changed[:, 1:])
        assert torch.allclose(out[:, 1:], perturb(tokens, p_avg, p_std, num_prefix_tokens=1)[:, 1:])


def test_cnn_statistics_over_spatial_positions() -> None:
    maps = torch.randn(2, 4, 3, 5)
    avg, std = channel_statistics(maps)
    assert avg.shape == std.shape == (2, 4, 1, 1)
    assert torch.allclose(avg.flatten(), maps.mean(dim=(2, 3)).flatten())
    assert torch.allclose(std.flatten(), maps.flatten(2).std(dim=2, correction=0).flatten(), atol=1e-5)


def test_statistics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="num_prefix_tokens must be 0 for CNN"):
        channel_statistics(torch.randn(1, 2, 3, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or ViT tokens"):
        channel_statistics(torch.randn(4, 4))
    with pytest.raises(ValueError, match="do not match features"):
        simplified_perturb(torch.randn(2, 3, 4, 4), torch.zeros(2, 5), torch.zeros(2, 5))


@pytest.mark.parametrize(("mean", "std"), [(0.0, 0.75), (1.5, 0.2)])
def test_perlin_factors_have_requested_moments(mean: float, std: float) -> None:
    factors = perlin_channel_factors(4, 96, mean=mean, std=std)
    assert factors.shape == (4, 96)
    assert torch.allclose(factors.mean(dim=1), torch.full((4,), mean), atol=1e-4)
    assert torch.allclose(factors.std(dim=1, correction=0), torch.full((4,), std), atol=1e-4)


def test_perlin_factors_are_smooth_across_channels_and_fresh() -> None:
    torch.manual_seed(3)
    factors = perlin_channel_factors(32, 256)
    assert lag_one_correlation(factors) > 0.6
    assert lag_one_correlation(torch.randn(32, 256)) < 0.2
    assert not torch.allclose(factors[:8], perlin_channel_factors(8, 256))
    assert torch.equal(perlin_channel_factors(2, 40, seed=7), perlin_channel_factors(2, 40, seed=7))
    with pytest.raises(ValueError, match="scale must be a power of two"):
        perlin_channel_factors(1, 64, scale=3)


def test_residual_adapter_starts_as_identity_for_tokens_and_maps() -> None:
    tokens, maps = torch.randn(2, 5, 8), torch.randn(2, 8, 3, 3)
    assert torch.equal(ResidualAdapter(8, "vit")(tokens), tokens)
    assert torch.equal(ResidualAdapter(8, "cnn")(maps), maps)
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\) with C=8"):
        ResidualAdapter(8, "cnn")(tokens)
    with pytest.raises(ValueError, match="kind must be 'vit' or 'cnn'"):
        ResidualAdapter(8, "rnn")  # type: ignore[arg-type]


def test_domain_perturbation_rejects_bad_stages() -> None:
    with pytest.raises(ValueError, match="perturbed_stages must be distinct stage indices"):
        DomainPerturbation([8, 8, 8], [1, 3], kind="vit")
    with pytest.raises(ValueError, match="at least one"):
        DomainPerturbation([8, 8, 8], [], kind="vit")


def test_hook_modes_identity_perturbation_and_training_step() -> None:
    backbone = ToyTokenBackbone()
    perturbation = DomainPerturbation([8, 8, 8], [0, 1], kind="vit", num_prefix_tokens=1)
    tokens = torch.randn(4, 7, 8)
    clean = backbone(tokens, perturbation.stage_hook(perturb=False, adapt=False))
    assert torch.equal(backbone(tokens), clean)
    assert torch.equal(backbone(tokens, perturbation.stage_hook(perturb=False, adapt=True)), clean)
    perturbed = backbone(tokens, perturbation.stage_hook(perturb=True, adapt=True))
    assert (perturbed - clean).abs().mean() > 1e-2

    optimiser = torch.optim.SGD(perturbation.parameters(), lr=0.1)
    perturbation_loss(clean, perturbed).backward()
    optimiser.step()
    assert not torch.allclose(backbone(tokens, perturbation.stage_hook(perturb=False, adapt=True)), clean)


def test_perturbation_loss_is_zero_for_equal_input_and_decreases_with_training() -> None:
    features = torch.randn(2, 3, 4)
    assert perturbation_loss(features, features.clone()) == 0
    with pytest.raises(ValueError, match="equal shapes"):
        perturbation_loss(features, features[:1])

    backbone = ToyTokenBackbone()
    perturbation = DomainPerturbation([8, 8, 8], [0, 1], kind="vit", num_prefix_tokens=1, adapter_reduction=2)
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randn(8, 9, 8, generator=generator)
    clean = backbone(tokens)

    def evaluation_loss() -> float:
        """L_dp with the same noise draws every time (seeded), so before/after differ only by the adapters."""
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            return float(perturbation_loss(clean, backbone(tokens, perturbation.stage_hook(True, True))))

    before = evaluation_loss()
    optimiser = torch.optim.Adam(perturbation.parameters(), lr=1e-2)
    for _ in range(40):
        optimiser.zero_grad()
        perturbation_loss(clean, backbone(tokens, perturbation.stage_hook(True, True))).backward()
        optimiser.step()
    after = evaluation_loss()
    assert after < 0.8 * before


# ---------------------------------------------------------------------------------------------- rectification (HDR)
def bank_hypergraph(num_vertices: int = 14, channels: int = 4, k: int = 3, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_vertices, channels, generator=generator)
    return features, SoftHypergraph.from_knn(features, k, kernel="reciprocal")


def test_res_hgnn_alpha_zero_is_identity_and_shapes() -> None:
    features, hypergraph = bank_hypergraph()
    identity = ResHGNN(4, alpha=0.0).train()
    assert torch.equal(identity(features, hypergraph), features)
    rectifier = ResHGNN(4, alpha=0.3)
    out = rectifier(features, hypergraph)
    assert out.shape == features.shape
    assert not torch.allclose(out, features)
    with pytest.raises(ValueError, match="alpha must be in"):
        ResHGNN(4, alpha=1.5)


def test_res_hgnn_dropout_only_in_training() -> None:
    features, hypergraph = bank_hypergraph()
    rectifier = ResHGNN(4, alpha=0.5, dropout=0.5)
    torch.manual_seed(6)
    rectifier.train()
    assert not torch.allclose(rectifier(features, hypergraph), rectifier(features, hypergraph))
    rectifier.eval()
    assert torch.equal(rectifier(features, hypergraph), rectifier(features, hypergraph))


def dense_query_conv(conv, query_x, bank_x, *, bank_degree, neighbours, incidence) -> torch.Tensor:
    """Eq. 8 rows for query vertices written out densely: D_v^-1/2 H W D_e^-1 H^T D_v^-1/2 X Theta + b.

    The query vertex lies in its own hyperedge only (degree 1, incidence 1); the hyperedge holds the query and its K
    bank neighbours with the given incidence; bank degrees are the bank hypergraph's. Theta and b are read off the
    layer through a hypergraph whose operator is the identity (every vertex alone in its hyperedge).
    """
    channels = query_x.shape[1]
    eye = SoftHypergraph(
        num_vertices=channels,
        vertex_index=torch.arange(channels),
        edge_index=torch.arange(channels),
        incidence=torch.ones(channels),
        edge_weight=torch.ones(channels),
    )
    bias = conv(torch.zeros(channels, channels), eye)[0]
    theta = conv(torch.eye(channels), eye) - bias
    rows = []
    for q in range(query_x.shape[0]):
        members = torch.cat([query_x[q : q + 1], bank_x[neighbours[q]]]) @ theta
        h = torch.cat([torch.ones(1), incidence[q]])
        degree = torch.cat([torch.ones(1), bank_degree[neighbours[q]]])
        edge_degree = h.sum()
        rows.append((h[:, None] * degree[:, None].rsqrt() * members).sum(0) / edge_degree + bias)
    return torch.stack(rows)


def test_forward_queries_matches_dense_reference() -> None:
    bank, hypergraph = bank_hypergraph(num_vertices=20, k=4)
    rectifier = ResHGNN(4, alpha=0.3).eval()
    generator = torch.Generator().manual_seed(7)
    query = torch.cat([bank[5:6], torch.randn(3, 4, generator=generator)])  # first query equals bank vertex 5
    distances, neighbours = chunked_knn(query, bank, 4)
    incidence = incidence_from_distance(distances, kernel="reciprocal")
    assert neighbours[0, 0] == 5
    assert incidence[0, 0] == pytest.approx(1.0)
    degree = hypergraph.vertex_degree()
    with torch.no_grad():
        bank_hidden = rectifier.bank_hidden(bank, hypergraph)
        result = rectifier.forward_queries(query, bank, bank_hidden, degree, neighbours, incidence)
        hidden = torch.sigmoid(
            dense_query_conv(rectifier.c2, query, bank, bank_degree=degree, neighbours=neighbours, incidence=incidence)
        )
        smoothed = dense_query_conv(
            rectifier.c1, hidden, bank_hidden, bank_degree=degree, neighbours=neighbours, incidence=incidence
        )
        expected = 0.3 * smoothed + 0.7 * query
    assert torch.allclose(result, expected, atol=1e-5)
    assert torch.allclose(bank_hidden, torch.sigmoid(rectifier.c2(bank, hypergraph)))


def dense_incidence(hypergraph: SoftHypergraph) -> torch.Tensor:
    dense = torch.zeros(hypergraph.num_vertices, hypergraph.num_edges)
    dense[hypergraph.vertex_index.long(), hypergraph.edge_index.long()] = hypergraph.incidence.float()
    return dense


@pytest.mark.parametrize("correlation", ["max", "sum"])
def test_pseudo_features_come_from_other_domain_and_match_dense_argmax(correlation: str) -> None:
    features, hypergraph = bank_hypergraph(num_vertices=16, k=3, seed=8)
    domain = torch.tensor([0, 1] * 8)
    result = pseudo_features(features, domain, hypergraph, chunk_size=5, correlation=correlation)
    assert (domain[result.index] != domain).all()
    assert torch.equal(result.features, features[result.index])

    h = dense_incidence(hypergraph)
    pair = h[:, None, :] * h[None, :, :]  # (i, j, e)
    scores = pair.amax(dim=2) if correlation == "max" else pair.sum(dim=2)
    scores[domain[:, None] == domain[None, :]] = 0
    has_partner = scores.amax(dim=1) > 0
    assert torch.equal(result.used_fallback, ~has_partner)
    assert torch.equal(result.index[has_partner], scores.argmax(dim=1)[has_partner])


def test_pseudo_features_fallback_to_nearest_other_domain_vertex() -> None:
    # Vertices 0-2 source, 3-5 target. Vertex 0 only in {0, 1}; vertices 4 and 5 only share hyperedges with target
    # vertices: these three must use the nearest vertex of the other domain.
    edges = [[0, 1], [1, 2, 3], [2, 3], [3, 4], [4, 5], [5, 3]]
    vertex_index = torch.tensor([v for edge in edges for v in edge])
    edge_index = torch.tensor([e for e, edge in enumerate(edges) for _ in edge])
    hypergraph = SoftHypergraph(
        num_vertices=6,
        vertex_index=vertex_index,
        edge_index=edge_index,
        incidence=torch.full((len(vertex_index),), 0.5),
        edge_weight=torch.ones(len(edges)),
    )
    features = torch.tensor([[0.0], [1.0], [2.0], [10.0], [0.4], [1.9]])
    domain = torch.tensor([0, 0, 0, 1, 1, 1])
    result = pseudo_features(features, domain, hypergraph)
    assert result.used_fallback.tolist() == [True, False, False, False, True, True]
    assert (domain[result.index] != domain).all()
    assert result.index[0] == 4  # nearest target vertex of vertex 0 (0.4)
    assert result.index[4] == 0  # nearest source vertex of 0.4 is 0.0
    assert result.index[5] == 2  # nearest source vertex of 1.9 is 2.0
    assert result.index[1] == 3
    assert result.index[3] in (1, 2)


def test_pseudo_features_rejects_single_domain() -> None:
    features, hypergraph = bank_hypergraph(num_vertices=6)
    with pytest.raises(ValueError, match="needs vertices of both domains, got 6 source and 0 target"):
        pseudo_features(features, torch.zeros(6, dtype=torch.bool), hypergraph)
    with pytest.raises(ValueError, match="domain of shape"):
        pseudo_features(features, torch.zeros(5), hypergraph)


def test_rectification_loss_formula() -> None:
    generator = torch.Generator().manual_seed(9)
    rectified, pseudo, features = (torch.randn(5, 3, generator=generator) for _ in range(3))
    expected = ((rectified - pseudo) ** 2).mean() + ((rectified - features) ** 2).mean()
    assert torch.allclose(rectification_loss(rectified, pseudo, features), expected)
    assert rectification_loss(features, features, features) == 0
    with pytest.raises(ValueError, match="equal shapes"):
        rectification_loss(rectified, pseudo[:2], features)


# ----------------------------------------------------------------------------------------------------- scoring (CDS)
def scoring_setup(seed: int = 10):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 3, 4, 4, generator=generator)
    source = torch.randn(30, 3, generator=generator)
    target = torch.randn(12, 3, generator=generator) + 1.0
    return query, source, target


def rows_of(query: torch.Tensor) -> torch.Tensor:
    return query.permute(0, 2, 3, 1).reshape(-1, query.shape[1])


def test_patch_score_is_monotone_in_nearest_neighbour_distance_and_zero_on_match() -> None:
    query, bank, _ = scoring_setup()
    rows = torch.cat([rows_of(query), bank[3:4]])
    scores = patch_defect_scores(rows, bank)
    nn_distance = torch.cdist(rows, bank).amin(dim=1)
    order = torch.argsort(nn_distance)
    assert (scores[order].diff() >= 0).all()
    assert torch.allclose(scores, nn_distance / (1 + nn_distance), atol=1e-5)
    assert scores[-1] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="non-empty bank"):
        patch_defect_scores(rows, bank[:0])
    with pytest.raises(ValueError, match="kernel='gaussian' needs an explicit bandwidth"):
        CrossDomainScorer(kernel="gaussian")
    gaussian = patch_defect_scores(rows, bank, kernel="gaussian", bandwidth=0.5)
    assert (gaussian[order].diff() >= 0).all()
    assert torch.allclose(gaussian, 1 - torch.exp(-(nn_distance**2) / 0.5), atol=1e-5)


def test_scorer_beta_one_and_zero_reduce_to_single_domain() -> None:
    query, source, target = scoring_setup()
    source_scores = patch_defect_scores(rows_of(query), source).reshape(2, 1, 4, 4)
    target_scores = patch_defect_scores(rows_of(query), target).reshape(2, 1, 4, 4)
    for beta, expected in ((1.0, source_scores), (0.0, target_scores)):
        score, patch_map = CrossDomainScorer(beta=beta).patch_maps(query, source, target)
        assert torch.allclose(patch_map, expected)
        assert torch.allclose(score, expected.amax(dim=(1, 2, 3)))
    score, patch_map = CrossDomainScorer(beta=0.6).patch_maps(query, None, target)
    assert torch.allclose(patch_map, target_scores)
    with pytest.raises(ValueError, match="beta=1 scores on the source bank only"):
        CrossDomainScorer(beta=1.0).patch_maps(query, None, target)

    score, patch_map = CrossDomainScorer(beta=0.6).patch_maps(query, source, target)
    assert torch.allclose(patch_map, 0.6 * source_scores + 0.4 * target_scores)
    # Eq. 18 mixes the per-domain maxima, not the maximum of the mixed map.
    expected_score = 0.6 * source_scores.amax(dim=(1, 2, 3)) + 0.4 * target_scores.amax(dim=(1, 2, 3))
    assert torch.allclose(score, expected_score)


def test_scorer_forward_map_shape_and_unblurred_image_score() -> None:
    query, source, target = scoring_setup()
    query[1, :, 2, 3] = target[4]
    scorer = CrossDomainScorer(beta=0.0, sigma=1.0)
    patch_score, patch_map = scorer.patch_maps(query, source, target)
    assert patch_map[1, 0, 2, 3] == pytest.approx(0.0, abs=1e-6)
    score, anomaly_map = scorer(query, source, target, (32, 32))
    assert anomaly_map.shape == (2, 1, 32, 32)
    assert torch.equal(score, patch_score)
    assert float(anomaly_map.min()) > 0  # blurred map: the zero patch is smoothed by its neighbours


def test_scorer_without_cross_domain_uses_union_bank() -> None:
    query, source, target = scoring_setup()
    union_scores = patch_defect_scores(rows_of(query), torch.cat([source, target])).reshape(2, 1, 4, 4)
    score, patch_map = CrossDomainScorer(enabled_cross_domain=False).patch_maps(query, source, target)
    assert torch.allclose(patch_map, union_scores)
    assert torch.allclose(score, union_scores.amax(dim=(1, 2, 3)))
    _, cross_map = CrossDomainScorer().patch_maps(query, source, target)
    assert not torch.allclose(cross_map, patch_map)
