"""H2VLR against its paper: the ablation switches, the equations' readings, the seeds, the option documentation."""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_hypergraph.hypergraph import HeterogeneousHypergraph
from anomalib_hypergraph.models.h2vlr import H2VLR, H2VLRModel
from anomalib_hypergraph.models.h2vlr import losses as h2vlr_losses
from anomalib_hypergraph.models.h2vlr.scoring import visual_anomaly_map
from anomalib_hypergraph.models.h2vlr.synthesis import SupportAnomalySynthesizer
from tests.test_h2vlr_components import TINY_IMAGE_SIZE, TINY_MODEL_KWARGS

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = REPOSITORY / "anomalib_hypergraph" / "models" / "h2vlr"
MODEL_README = PACKAGE / "README.md"


def textured_images(count: int, seed: int = 0) -> torch.Tensor:
    """Normal-looking images: a grey level with pixel noise, in [0, 1]."""
    rng = np.random.default_rng(seed)
    pixels = 110 + rng.integers(0, 30, (count, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def scores_of(model: H2VLRModel, images: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model.score(model.encode(images), model.stored_prompts(), model.support_gallery, model.residual_centre)


# ------------------------------------------------------------------------------ defect 1: what the switches remove
def test_without_hsr_the_base_map_goes_straight_to_the_image_head() -> None:
    model = H2VLRModel(use_hsr=False, **TINY_MODEL_KWARGS)  # use_sghm keeps its default: it has nothing to act on
    assert model.reasoner is None
    assert not any("residual_scale" in name for name, _ in model.named_parameters())
    model.set_support(textured_images(1))
    scores = scores_of(model, textured_images(2, seed=1))
    assert scores.reasoning is None
    torch.testing.assert_close(scores.corrected_map, scores.base_map.clamp(0.0, 1.0), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(scores.image_score, model.image_head(scores.base_map.clamp(0.0, 1.0)))


def test_structural_loss_has_its_own_switch() -> None:
    shots = textured_images(2)
    batch = SupportAnomalySynthesizer(seed=0)(shots, torch.arange(2))
    terms = {}
    for use_structural_loss in (True, False):
        model = H2VLRModel(use_structural_loss=use_structural_loss, **TINY_MODEL_KWARGS)
        model.set_support(shots)
        assert model.reasoner is not None  # the reasoning and the correction stay on
        terms[use_structural_loss] = model.training_losses(batch.images, batch.masks, batch.shot_index, batch.clean)
    assert float(terms[True].structural) > 0
    assert float(terms[False].structural) == 0.0
    # everything but L_str is the same objective
    expected = terms[True].total - 0.02 * terms[True].structural
    torch.testing.assert_close(terms[False].total, expected, rtol=1e-5, atol=1e-6)


def test_semantic_hyperedges_and_reasoning_layers_switch_off_on_their_own() -> None:
    tokens = F.normalize(torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    prompts = F.normalize(torch.randn(23, 32, generator=torch.Generator().manual_seed(1)), dim=-1)

    visual_only = H2VLRModel(use_sghm=False, **TINY_MODEL_KWARGS)  # reasoning on, no prompt nodes
    output = visual_only.reasoner(tokens, prompts, 100.0)
    assert output.hypergraph.num_semantic == 0
    assert output.hypergraph.num_edges == 64  # structural hyperedges only

    unrefined = H2VLRModel(num_layers=0, **TINY_MODEL_KWARGS)  # head and correction on the CLIP tokens
    assert len(unrefined.reasoner.layers) == 0
    output = unrefined.reasoner(tokens, prompts, 100.0)
    torch.testing.assert_close(output.refined, tokens, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(output.node_scores, torch.sigmoid(unrefined.reasoner.head(tokens).squeeze(-1)))


# -------------------------------------------------------------------------- defect 2: L_str and the scale of W
def test_structural_loss_is_unchanged_by_a_common_scale_of_the_hyperedge_weights() -> None:
    generator = torch.Generator().manual_seed(2)
    patches, prompts = torch.randn(3, 16, 8, generator=generator), torch.randn(5, 8, generator=generator)
    graph = HeterogeneousHypergraph.from_similarity(patches, prompts, 4, 4)
    scores = torch.rand(3, 16, generator=generator)
    targets = (torch.rand(3, 16, generator=generator) > 0.7).float()
    config = SimpleNamespace(focal_gamma=2.0, laplacian_weight=1.0)  # the fields structural_loss reads
    weight = (torch.rand(graph.num_edges, generator=generator) + 0.2).requires_grad_(True)
    loss, laplacian = h2vlr_losses.structural_loss(scores, targets, graph, weight, config)
    shrunk_loss, shrunk_laplacian = h2vlr_losses.structural_loss(scores, targets, graph, 0.1 * weight, config)
    assert float(laplacian) > 0
    torch.testing.assert_close(shrunk_laplacian, laplacian, rtol=1e-6, atol=0)
    torch.testing.assert_close(shrunk_loss, loss, rtol=1e-6, atol=0)
    assert not shrunk_loss.requires_grad  # W gets no gradient from the smoothness prior: it cannot shrink it


# ------------------------------------------------------------------------------ defect 4: one initialisation path
def test_the_start_does_not_depend_on_where_the_class_name_comes_from() -> None:
    torch.manual_seed(1)  # nor on torch's global generator
    from_constructor = H2VLRModel(class_name="bottle", **TINY_MODEL_KWARGS)
    torch.manual_seed(2)
    from_datamodule = H2VLRModel(**TINY_MODEL_KWARGS)  # "object" until the datamodule's category arrives
    from_datamodule.set_class_name("bottle")
    expected, actual = from_constructor.state_dict(), from_datamodule.state_dict()
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------- defect 5: what is attributed to the paper
H2VLR_DOCUMENTS = [
    *sorted(PACKAGE.glob("*.py")),
    MODEL_README,
    REPOSITORY / "configs" / "model" / "h2vlr.yaml",
    REPOSITORY / "examples" / "h2vlr_api.py",
]
NOT_IN_THE_PAPER = {
    r"paper[^.;\n]{0,20}laion400m_e32": "the paper names the architecture, not the pretrained tag",
    r"paper[^.;\n]{0,20}blocks 2 and 7": "the gallery blocks come from the PromptAD line of work",
    r"paper: 2 and 7": "the gallery blocks come from the PromptAD line of work",
    r"paper's batch is the whole support set": "the paper's batch size is 400",
}


@pytest.mark.parametrize("path", H2VLR_DOCUMENTS, ids=lambda path: path.name)
def test_nothing_the_paper_does_not_state_is_attributed_to_it(path: Path) -> None:
    text = path.read_text()
    for pattern, reason in NOT_IN_THE_PAPER.items():
        assert not re.search(pattern, text), f"{path.name}: '{pattern}' ({reason})"


def _labelled_lines(path: Path, label: str) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if "#" in line and label in line.split("#", 1)[1]]


def test_equation_labels_follow_the_papers_numbering() -> None:
    # Eq. 1: C_S = Psi(G_s) and its combination with the context; Eq. 2: the text encoder and the centres.
    prompts = PACKAGE / "prompts.py"
    assert any("mapper(" in line for line in _labelled_lines(prompts, "Eq. 1"))
    assert any("context" in line and "support" in line for line in _labelled_lines(prompts, "Eq. 1"))
    assert all("C_S" not in line for line in _labelled_lines(prompts, "Eq. 2")), "the C_S combination is Eq. 1"
    assert any("normal_centre" in line for line in _labelled_lines(prompts, "Eq. 2"))
    # Eq. 3: the hypergraph (H, W, degrees); Eq. 4: message passing. No message-passing line is labelled Eq. 3.
    reasoning = PACKAGE / "reasoning.py"
    eq3, eq4 = _labelled_lines(reasoning, "Eq. 3"), _labelled_lines(reasoning, "Eq. 4")
    assert any("hypergraph" in line for line in eq3)
    assert not [line for line in eq3 if "layer(" in line or "nodes" in line]
    assert any("layer(" in line for line in eq4)


# ------------------------------------------------------------------------------- Eq. 1: element-wise product
def test_eq1_multiplies_the_support_context_into_every_context_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    model = H2VLRModel(class_name="bottle", **TINY_MODEL_KWARGS)
    learner, backbone = model.prompts, model.backbone
    assert learner.conditioning == "multiply"
    support = F.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
    with torch.no_grad():
        learner.mapper[-1].weight.normal_(generator=torch.Generator().manual_seed(4))
        support_context = learner.mapper(support)
    captured = {}
    encode = backbone.encode_token_embeddings

    def capture(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        captured["rows"] = rows
        return encode(rows, tokens)

    monkeypatch.setattr(backbone, "encode_token_embeddings", capture)
    with torch.no_grad():
        learner(backbone, support)
    context = captured["rows"][:, 1 : 1 + learner.context_length]
    torch.testing.assert_close(context, learner.context * support_context)


def test_untrained_support_context_is_neutral_in_both_readings() -> None:
    support = F.normalize(torch.randn(32, generator=torch.Generator().manual_seed(5)), dim=0)
    static = H2VLRModel(class_name="bottle", use_dsi=False, **TINY_MODEL_KWARGS)
    with torch.no_grad():
        reference = static.prompts(static.backbone, None).embeddings
    for conditioning in ("multiply", "add"):
        model = H2VLRModel(class_name="bottle", support_conditioning=conditioning, **TINY_MODEL_KWARGS)
        with torch.no_grad():
            encoded = model.prompts(model.backbone, support).embeddings
        torch.testing.assert_close(encoded, reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- Eq. 3-4: degrees and propagation
def _dense_incidence(graph: HeterogeneousHypergraph, image: int) -> torch.Tensor:
    incidence = torch.zeros(graph.num_vertices, graph.num_edges)
    for edge, members in enumerate(graph.members[image].tolist()):
        for member in members:
            if member >= 0:
                incidence[member, edge] = 1.0
    return incidence


def test_eq4_one_sided_propagation_with_count_degrees_over_the_visual_subgraph() -> None:
    generator = torch.Generator().manual_seed(6)
    patches, prompts = torch.randn(2, 12, 4, generator=generator), torch.randn(3, 4, generator=generator)
    graph = HeterogeneousHypergraph.from_similarity(
        patches, prompts, 3, 5, normalization="one_sided", vertex_degree_mode="count"
    ).visual_subgraph()
    assert graph.num_vertices == 12
    assert graph.edge_degree()[:, 12:].eq(5).all(), "a semantic hyperedge passes messages among its K patches"
    assert graph.edge_degree()[:, :12].eq(4).all(), "a structural hyperedge holds its patch and K neighbours"
    weight = torch.rand(2, graph.num_edges, generator=generator) + 0.1
    features = torch.randn(2, 12, 6, generator=generator)
    smoothed = graph.smooth(features, weight)
    for image in range(2):
        incidence = _dense_incidence(graph, image)
        vertex_degree = incidence.sum(dim=1)  # counts, not weights
        edge_degree = incidence.sum(dim=0)
        propagation = torch.diag(1 / vertex_degree) @ incidence @ torch.diag(weight[image] / edge_degree) @ incidence.T
        torch.testing.assert_close(smoothed[image], propagation @ features[image], rtol=1e-5, atol=1e-6)


def test_prompts_act_only_through_hyperedge_construction_by_default() -> None:
    tokens = F.normalize(torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(7)), dim=-1)
    # free weights: the prompts' only other route; scaling them keeps every cosine ranking, so H and W stay the same
    results = {}
    for prompt_messages in (False, True):
        model = H2VLRModel(edge_weights="free", prompt_messages=prompt_messages, **TINY_MODEL_KWARGS)
        prompts = F.normalize(
            torch.randn(model.prompts.num_prompts, 32, generator=torch.Generator().manual_seed(8)), dim=-1
        )
        with torch.no_grad():
            results[prompt_messages] = [model.reasoner(tokens, scale * prompts, 100.0).refined for scale in (1.0, 3.0)]
    torch.testing.assert_close(results[False][0], results[False][1], rtol=0, atol=0)
    assert not torch.allclose(results[True][0], results[True][1])  # the other reading: prompt features in H^T X


def test_hyperedge_weights_are_derived_from_prompt_patch_affinities() -> None:
    model = H2VLRModel(**TINY_MODEL_KWARGS)
    reasoner = model.reasoner
    assert not [name for name, _ in reasoner.named_parameters() if "weight_logit" in name]  # nothing free per edge
    tokens = F.normalize(torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(9)), dim=-1)
    prompts = F.normalize(torch.randn(23, 32, generator=torch.Generator().manual_seed(10)), dim=-1)
    prompts.requires_grad_(True)
    output = reasoner(tokens, prompts, 100.0)
    affinity = torch.softmax(100.0 * tokens @ prompts.T, dim=-1)
    for image in range(2):
        for prompt in range(23):
            members = [int(m) for m in output.hypergraph.members[image, 64 + prompt] if 0 <= m < 64]
            expected = affinity[image, members, prompt].mean()
            torch.testing.assert_close(output.edge_weight[image, 64 + prompt], expected)
    assert output.edge_weight[:, :64].eq(1).all()
    output.node_scores.sum().backward()
    assert prompts.grad is not None
    assert float(prompts.grad.abs().sum()) > 0, "the prompts reach the reasoning through W"


# ---------------------------------------------------------------------------------- the learnable soft histogram
def test_the_soft_histogram_is_learned() -> None:
    model = H2VLRModel(**TINY_MODEL_KWARGS)
    head = model.image_head
    assert head.bin_centres.requires_grad
    assert head.bin_log_widths.requires_grad
    before = head.bin_centres.detach().clone()
    shots = textured_images(2)
    model.set_support(shots)
    batch = SupportAnomalySynthesizer(seed=0)(shots, torch.arange(2))
    optimizer = torch.optim.SGD(model.learnable_parameters(), lr=0.1)
    model.training_losses(batch.images, batch.masks, batch.shot_index, batch.clean).total.backward()
    optimizer.step()
    assert not torch.equal(head.bin_centres.detach(), before)
    fixed = H2VLRModel(learnable_histogram=False, **TINY_MODEL_KWARGS).image_head
    assert not fixed.bin_centres.requires_grad
    assert fixed.state_dict().keys() == head.state_dict().keys()  # checkpoints fit either way


# ------------------------------------------------------------------------------ k = 1: the training visual map
def test_one_shot_training_visual_map_has_the_test_time_distribution() -> None:
    shot, other_normal = textured_images(1, seed=0), textured_images(1, seed=1)
    model = H2VLRModel(**TINY_MODEL_KWARGS)
    model.set_support(shot)
    with torch.no_grad():
        training = visual_anomaly_map(
            model.encode(shot).gallery, model.training_gallery(torch.tensor([0])), chunk_size=4096
        )
        test = visual_anomaly_map(model.encode(other_normal).gallery, model.support_gallery, chunk_size=4096)
    ratio = float(training.mean() / test.mean())
    assert 0.5 < ratio < 2.0, f"training M_vis {float(training.mean()):.4f} vs test {float(test.mean()):.4f}"

    itself = H2VLRModel(single_shot_gallery="self", **TINY_MODEL_KWARGS)
    itself.set_support(shot)
    with torch.no_grad():
        trivial = visual_anomaly_map(
            itself.encode(shot).gallery, itself.training_gallery(torch.tensor([0])), chunk_size=4096
        )
    assert float(trivial.max()) < 1e-5  # the shot finds itself


# ------------------------------------------------------------------------------------------- one set of options
def _option_fields():
    from anomalib_hypergraph.models.h2vlr.options import H2VLROptions

    return fields(H2VLROptions), typing.get_type_hints(H2VLROptions)


def test_the_lightning_signature_is_the_options_dataclass() -> None:
    option_fields, option_types = _option_fields()
    signature = inspect.signature(H2VLR.__init__)
    lightning_types = typing.get_type_hints(H2VLR.__init__)
    components = {"pre_processor", "post_processor", "evaluator", "visualizer"}
    arguments = [name for name in signature.parameters if name != "self" and name not in components]
    assert arguments == [option.name for option in option_fields]
    for option in option_fields:
        parameter = signature.parameters[option.name]
        assert option.default is not MISSING
        assert parameter.default == option.default, option.name
        assert lightning_types[option.name] == option_types[option.name], option.name


def test_every_option_is_documented_once_and_shown_everywhere() -> None:
    from anomalib_hypergraph.models.h2vlr.options import options_table

    option_fields, _ = _option_fields()
    docstring = " ".join((H2VLR.__doc__ or "").split())
    for option in option_fields:
        assert option.metadata["doc"], option.name
        assert f"{option.name}: {option.metadata['doc']}" in docstring, option.name
    readme = MODEL_README.read_text()
    table = re.search(r"<!-- options-table -->\n(.*?)\n<!-- /options-table -->", readme, re.DOTALL)
    assert table, "the model README has no generated options table"
    assert table.group(1).strip() == options_table().strip(), (
        "README options table is stale: python -m anomalib_hypergraph.models.h2vlr.options"
    )


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="edge_weights must be one of"):
        H2VLRModel(edge_weights="learned", **TINY_MODEL_KWARGS)
    with pytest.raises(ValueError, match="num_layers must be >= 0"):
        H2VLRModel(num_layers=-1, **TINY_MODEL_KWARGS)
    with pytest.raises(TypeError, match="no_such_option"):
        H2VLRModel(no_such_option=1, **TINY_MODEL_KWARGS)
