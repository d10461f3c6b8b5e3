"""Tests of the pure-torch HyperTrans building blocks: DP (Eq. 3-7), HDR (Eq. 8-11) and CDS (Eq. 12-19)."""

from __future__ import annotations

import pytest
import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn

from anomalib_hypergraph.hypergraph import (
    AttachedHyperedges,
    IncidenceKernel,
    SoftHypergraph,
    bank_hypergraph,
    chunked_knn,
)
from anomalib_hypergraph.models.hypertrans.perturbation import (
    DomainPerturbation,
    ResidualAdapter,
    adain_perturb,
    channel_statistics,
    perlin_channel_factors,
    perturbation_loss,
    simplified_perturb,
)
from anomalib_hypergraph.models.hypertrans.rectification import (
    ResHGNN,
    pseudo_features,
    rectification_loss,
    train_rectifier,
)
from anomalib_hypergraph.models.hypertrans.scoring import CrossDomainScorer
from anomalib_hypergraph.models.smoothing import SeparableGaussianBlur


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
def bank_setup(num_vertices: int = 14, channels: int = 4, k: int = 3, seed: int = 5):
    """Bank features, their bank hypergraph (K nearest, self included) and attached hyperedges of the bank vertices."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_vertices, channels, generator=generator)
    distances, neighbours = chunked_knn(features, features, k)
    hypergraph = bank_hypergraph(neighbours, 1 / (1 + distances))
    hyperedges = AttachedHyperedges.from_neighbours([neighbours], [1 / (1 + distances)], [hypergraph.vertex_degree()])
    return features, hypergraph, hyperedges


def test_res_hgnn_alpha_zero_is_identity_and_shapes() -> None:
    features, _, hyperedges = bank_setup()
    identity = ResHGNN(4, alpha=0.0).train()
    assert torch.equal(identity.rectify_bank([features], hyperedges)[0], features)
    rectifier = ResHGNN(4, alpha=0.3)
    out, hidden = rectifier.rectify_bank([features], hyperedges)
    assert out.shape == hidden.shape == features.shape
    assert not torch.allclose(out, features)
    with pytest.raises(ValueError, match="alpha must be in"):
        ResHGNN(4, alpha=1.5)


def test_res_hgnn_dropout_only_in_training() -> None:
    features, _, hyperedges = bank_setup()
    rectifier = ResHGNN(4, alpha=0.5, dropout=0.5)
    torch.manual_seed(6)
    rectifier.train()
    assert not torch.allclose(
        rectifier.rectify_bank([features], hyperedges)[0], rectifier.rectify_bank([features], hyperedges)[0]
    )
    rectifier.eval()
    assert torch.equal(
        rectifier.rectify_bank([features], hyperedges)[0], rectifier.rectify_bank([features], hyperedges)[0]
    )


def layer_matrices(conv) -> tuple[torch.Tensor, torch.Tensor]:
    """Theta and b of a HypergraphConv, read off through attached vertices without neighbours (operator = identity)."""
    channels = conv.theta.in_features
    lonely = AttachedHyperedges(
        index=[torch.zeros(channels, 0, dtype=torch.long)],
        weight=[torch.zeros(channels, 0)],
        edge_degree=torch.ones(channels, 1),
    )
    bias = conv.forward_attached(torch.zeros(channels, channels), lonely, [torch.zeros(1, channels)])[0]
    theta = conv.forward_attached(torch.eye(channels), lonely, [torch.zeros(1, channels)]) - bias
    return theta, bias


def dense_attached_conv(conv, x, bank_x, *, bank_degree, neighbours, incidence) -> torch.Tensor:
    """Eq. 8 rows of attached vertices written out: (x + sum_j H_j D_v(j)^-1/2 x_j) / (1 + sum_j H_j) Theta + b."""
    theta, bias = layer_matrices(conv)
    rows = []
    for q in range(x.shape[0]):
        members = torch.cat([x[q : q + 1], bank_x[neighbours[q]]]) @ theta
        h = torch.cat([torch.ones(1), incidence[q]])
        degree = torch.cat([torch.ones(1), bank_degree[neighbours[q]]])
        rows.append((h[:, None] * degree[:, None].rsqrt() * members).sum(0) / h.sum() + bias)
    return torch.stack(rows)


def test_one_operator_for_bank_and_queries_matches_dense_reference() -> None:
    bank, hypergraph, bank_edges = bank_setup(num_vertices=20, k=4)
    rectifier = ResHGNN(4, alpha=0.3).eval()
    generator = torch.Generator().manual_seed(7)
    query = torch.cat([bank[5:6], torch.randn(3, 4, generator=generator)])  # first query equals bank vertex 5
    distances, neighbours = chunked_knn(query, bank, 4)
    incidence = 1 / (1 + distances)
    degree = hypergraph.vertex_degree()
    hyperedges = AttachedHyperedges.from_neighbours([neighbours], [incidence], [degree])
    with torch.no_grad():
        stored, bank_hidden = rectifier.rectify_bank([bank], bank_edges)
        result = rectifier(query, hyperedges, [bank], [bank_hidden])
        hidden = torch.sigmoid(
            dense_attached_conv(
                rectifier.c2, query, bank, bank_degree=degree, neighbours=neighbours, incidence=incidence
            )
        )
        smoothed = dense_attached_conv(
            rectifier.c1, hidden, bank_hidden, bank_degree=degree, neighbours=neighbours, incidence=incidence
        )
    assert torch.allclose(result, 0.3 * smoothed + 0.7 * query, atol=1e-5)
    # The query equal to bank vertex 5 is mapped exactly onto vertex 5's stored rectified feature.
    assert torch.equal(result[0], stored[5])
    assert not torch.allclose(result[1:], stored[5].expand(3, -1))


def test_pseudo_features_come_from_other_domain_and_match_dense_row_argmax() -> None:
    features, hypergraph, _ = bank_setup(num_vertices=16, k=3, seed=8)
    domain = torch.tensor([0, 1] * 8)
    result = pseudo_features(features, domain, hypergraph, chunk_size=5)
    assert (domain[result.index] != domain).all()
    assert torch.equal(result.features, features[result.index])

    h_cross = hypergraph.incidence_dense().clone()  # H[i, e_j]; hyperedge j is centred on vertex j
    h_cross[domain[:, None] == domain[None, :]] = 0  # H^c: same-domain connections zeroed
    has_partner = h_cross.amax(dim=1) > 0
    assert has_partner.any()
    assert torch.equal(result.used_fallback, ~has_partner)
    assert torch.equal(result.index[has_partner], h_cross.argmax(dim=1)[has_partner])  # Eq. 10


def test_pseudo_features_fallback_to_nearest_other_domain_vertex() -> None:
    # Vertices 0-2 source, 3-5 target; hyperedge j is centred on vertex j. Vertex 0 lies only in source hyperedges,
    # vertices 4 and 5 only in target ones: these three use the nearest vertex of the other domain.
    edges = [[0, 1], [1, 2], [2, 1], [3, 2], [4, 5], [5, 3]]
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
    assert result.used_fallback.tolist() == [True, True, False, True, True, True]
    assert (domain[result.index] != domain).all()
    assert result.index.tolist() == [4, 4, 3, 2, 0, 2]  # 2 from H^c (it lies in target hyperedge 3); others nearest


def test_pseudo_features_rejects_single_domain() -> None:
    features, hypergraph, _ = bank_setup(num_vertices=6)
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


def test_train_rectifier_decreases_the_loss_and_is_seeded() -> None:
    features, hypergraph, hyperedges = bank_setup(num_vertices=24, k=4, seed=11)
    domain = torch.tensor([0, 1] * 12)
    pseudo = pseudo_features(features, domain, hypergraph).features
    torch.manual_seed(0)
    first, second = ResHGNN(4), ResHGNN(4)
    second.load_state_dict(first.state_dict())
    losses = []
    for rectifier in (first, second):
        torch.manual_seed(len(losses) + 100)  # another global state per run: the dropout draws must not follow it
        losses.append(train_rectifier(rectifier, [features], hyperedges, pseudo, iterations=10, lr=1e-2, seed=3))
    assert losses[0] == losses[1]
    plain = ResHGNN(4, dropout=0.0)
    plain_losses = train_rectifier(plain, [features], hyperedges, pseudo, iterations=30, lr=1e-2, seed=3)
    assert plain_losses[-1] < plain_losses[0] - 0.01  # the floor is MSE(S, F) / 2, reached at R = (S + F) / 2
    assert not first.training


# ----------------------------------------------------------------------------------------------------- scoring (CDS)
def test_scorer_defect_is_monotone_and_eq18_mixes_per_domain_maxima() -> None:
    generator = torch.Generator().manual_seed(10)
    target = torch.rand(2, 4, 4, generator=generator) * 3
    source = torch.rand(2, 4, 4, generator=generator) * 3
    kernel = IncidenceKernel()
    kernel.fit(torch.tensor([1.5]))
    scorer = CrossDomainScorer(beta=0.6, domain_weighting="fixed")
    scorer.fit(connectivity=0.1)
    assert float(scorer.source_weight) == pytest.approx(0.6)
    score, patch_map = scorer.patch_maps(target, source, kernel)
    phi_t, phi_s = (target / 1.5) / (1 + target / 1.5), (source / 1.5) / (1 + source / 1.5)
    assert torch.allclose(patch_map[:, 0], 0.6 * phi_s + 0.4 * phi_t, atol=1e-6)  # Eq. 19
    expected = 0.6 * phi_s.amax(dim=(1, 2)) + 0.4 * phi_t.amax(dim=(1, 2))  # Eq. 18: mix of the per-domain maxima
    assert torch.allclose(score, expected, atol=1e-6)
    order = torch.argsort(target.flatten())
    assert (kernel.defect(target.flatten())[order].diff() >= 0).all()


def test_evidence_weighting_follows_cross_domain_connectivity() -> None:
    scorer = CrossDomainScorer(beta=0.6)
    for connectivity, weight in ((0.0, 0.0), (0.5, 0.3), (1.0, 0.6)):
        scorer.fit(connectivity)
        assert float(scorer.source_weight) == pytest.approx(weight)
    scorer.fit(None)  # no source domain
    assert float(scorer.source_weight) == 0.0
    target = torch.rand(1, 3, 3)
    _, patch_map = scorer.patch_maps(target, None, IncidenceKernel())
    assert torch.allclose(patch_map[:, 0], IncidenceKernel().defect(target))
    with pytest.raises(ValueError, match="domain_weighting must be one of"):
        CrossDomainScorer(domain_weighting="learned")  # type: ignore[arg-type]


def test_scorer_forward_map_shape_and_unblurred_image_score() -> None:
    target = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(12)) + 0.5
    target[1, 2, 3] = 0.0
    scorer = CrossDomainScorer(sigma=1.0)
    patch_score, patch_map = scorer.patch_maps(target, None, IncidenceKernel())
    assert patch_map[1, 0, 2, 3] == 0.0
    score, anomaly_map = scorer(target, None, IncidenceKernel(), (32, 32))
    assert anomaly_map.shape == (2, 1, 32, 32)
    assert torch.equal(score, patch_score)
    assert float(anomaly_map.min()) > 0  # blurred map: the zero patch is smoothed by its neighbours


def test_scorer_without_cross_domain_uses_the_nearer_bank() -> None:
    generator = torch.Generator().manual_seed(13)
    target, source = torch.rand(2, 4, 4, generator=generator), torch.rand(2, 4, 4, generator=generator)
    kernel = IncidenceKernel()
    score, patch_map = CrossDomainScorer(enabled_cross_domain=False).patch_maps(target, source, kernel)
    assert torch.allclose(patch_map[:, 0], kernel.defect(torch.minimum(target, source)))
    assert torch.allclose(score, patch_map.amax(dim=(1, 2, 3)))


@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_separable_blur_equals_anomalibs_gaussian_blur(sigma: float) -> None:
    reference = GaussianBlur2d(sigma=(sigma, sigma), channels=2)  # anomalib's own kernel width
    maps = torch.rand(3, 2, 64, 48, generator=torch.Generator().manual_seed(0))
    maps[0, 0, 10, 20] = 50.0  # a sharp peak: any wrong tap or border would show
    blurred = SeparableGaussianBlur(sigma)(maps)
    assert blurred.shape == maps.shape
    assert torch.allclose(blurred, reference(maps), atol=1e-5)
    assert "kernel" not in SeparableGaussianBlur(sigma).state_dict()  # derived from sigma, not stored


def test_scorer_refuses_a_non_positive_sigma() -> None:
    with pytest.raises(ValueError, match=r"sigma must be positive, got 0\.0"):
        CrossDomainScorer(sigma=0.0)
