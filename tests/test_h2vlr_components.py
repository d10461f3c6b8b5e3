"""H2VLR's pieces: cosine top-k, heterogeneous hyperedges, Laplacian, Eq. 5-7, soft histogram, CLIP access, prompts."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_hypergraph.backbones import ClipBackbone, register_open_clip_config
from anomalib_hypergraph.hypergraph import HeterogeneousHypergraph, SoftHypergraph, cosine_topk
from anomalib_hypergraph.models.h2vlr import H2VLRModel
from anomalib_hypergraph.models.h2vlr.prompts import PromptLearner
from anomalib_hypergraph.models.h2vlr.scoring import HistogramImageHead, corrected_map, soft_histogram, uniform_bins
from anomalib_hypergraph.models.h2vlr.synthesis import SupportAnomalySynthesizer
from anomalib_hypergraph.models.h2vlr.vocabulary import GENERIC_DEFECT_STATES, object_name, special_states

# A tiny random CLIP: 64 px, 8 px patches (8 x 8 grid), 3 vision blocks, 2 text blocks; the real BPE vocabulary.
TINY_CLIP = "anomalib-hypergraph-test-tiny-h2vlr-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 48, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_IMAGE_SIZE = 64
TINY_MODEL_KWARGS = {
    "backbone": TINY_CLIP,
    "backbone_config": TINY_CLIP_CONFIG,
    "pretrained": False,
    "gallery_layers": (0, 1),
}


@pytest.fixture(scope="module")
def tiny_backbone() -> ClipBackbone:
    register_open_clip_config(TINY_CLIP, TINY_CLIP_CONFIG)
    torch.manual_seed(0)
    return ClipBackbone(TINY_CLIP, pretrained=None, gallery_layers=(0, 1))


# ------------------------------------------------------------------------------------------ hypergraph core
def test_cosine_topk_is_exact_and_chunking_invariant() -> None:
    generator = torch.Generator().manual_seed(0)
    query, reference = torch.randn(2, 9, 5, generator=generator), torch.randn(2, 13, 5, generator=generator)
    similarity = F.normalize(query, dim=-1) @ F.normalize(reference, dim=-1).transpose(1, 2)
    expected_values, expected_index = similarity.topk(4, dim=-1)
    for chunk_size in (3, 13, 100):
        values, index = cosine_topk(query, reference, 4, chunk_size=chunk_size)
        torch.testing.assert_close(values, expected_values)
        assert torch.equal(index, expected_index)
    _, own = cosine_topk(query, query, 8, exclude_self=True, chunk_size=4)
    rows = torch.arange(9)[None, :, None]
    assert not bool((own == rows).any()), "a vertex chose itself"
    with pytest.raises(ValueError, match="k must be between 1 and"):
        cosine_topk(query, query, 9, exclude_self=True)


def test_structural_and_semantic_hyperedges_have_k_members_each() -> None:
    generator = torch.Generator().manual_seed(1)
    patches, prompts = torch.randn(2, 16, 6, generator=generator), torch.randn(5, 6, generator=generator)
    k = 4
    graph = HeterogeneousHypergraph.from_similarity(patches, prompts, k, k, chunk_size=5)
    assert graph.num_edges == 16 + 5
    assert graph.members.shape == (2, 21, k + 1)
    patch_similarity = F.normalize(patches, dim=-1) @ F.normalize(patches, dim=-1).transpose(1, 2)
    patch_similarity.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    prompt_similarity = F.normalize(prompts, dim=-1) @ F.normalize(patches, dim=-1).transpose(1, 2)  # (B, P, N)
    for image in range(2):
        for patch in range(16):
            centre, *neighbours = graph.members[image, patch].tolist()
            assert centre == patch
            assert set(neighbours) == set(patch_similarity[image, patch].topk(k).indices.tolist())
        for prompt in range(5):
            node, *members = graph.members[image, 16 + prompt].tolist()
            assert node == 16 + prompt  # the semantic node itself
            assert all(member < 16 for member in members)  # ... joined to visual nodes only
            assert set(members) == set(prompt_similarity[image, prompt].topk(k).indices.tolist())


def test_heterogeneous_smoothing_equals_the_shared_soft_hypergraph_operator() -> None:
    generator = torch.Generator().manual_seed(2)
    patches, prompts = torch.randn(2, 12, 4, generator=generator), torch.randn(3, 4, generator=generator)
    graph = HeterogeneousHypergraph.from_similarity(patches, prompts, 3, 5)  # unequal sizes: -1 padding
    weight = torch.rand(graph.num_edges, generator=generator) + 0.1
    features = torch.cat([patches, prompts.expand(2, -1, -1)], dim=1)
    smoothed = graph.smooth(features, weight)
    for image in range(2):
        soft = graph.to_soft_hypergraph(image, weight)
        assert isinstance(soft, SoftHypergraph)
        torch.testing.assert_close(smoothed[image], soft.smooth(features[image], weight), atol=1e-6, rtol=1e-5)


def test_laplacian_term_is_zero_for_constant_scores_and_the_pairwise_sum_otherwise() -> None:
    generator = torch.Generator().manual_seed(3)
    patches, prompts = torch.randn(2, 10, 4, generator=generator), torch.randn(3, 4, generator=generator)
    graph = HeterogeneousHypergraph.from_similarity(patches, prompts, 3, 4)
    weight = torch.rand(graph.num_edges, generator=generator) + 0.5
    constant = torch.full((2, 10), 0.37)
    assert torch.all(graph.laplacian_quadratic(constant, weight).abs() < 1e-9)
    scores = torch.rand(2, 10, generator=generator)
    expected = torch.zeros(2)
    for image in range(2):
        for edge in range(graph.num_edges):
            members = [int(m) for m in graph.members[image, edge] if 0 <= m < 10]
            values = scores[image, members]
            pairs = sum((values[i] - values[j]) ** 2 for i in range(len(members)) for j in range(i + 1, len(members)))
            expected[image] += weight[edge] * pairs / len(members)
    torch.testing.assert_close(graph.laplacian_quadratic(scores, weight), expected)
    assert bool((expected > 0).all())


# --------------------------------------------------------------------------------------------- Eq. 5-7, head
def test_eq7_stays_in_the_unit_interval() -> None:
    generator = torch.Generator().manual_seed(4)
    base = torch.rand(4, 50, generator=generator)
    node_scores = torch.rand(4, 50, generator=generator)
    for scale in (-25.0, 0.3, 40.0):
        for centre in (0.0, 0.9):
            corrected = corrected_map(base, node_scores, torch.tensor(centre), torch.tensor(scale), eta=0.4)
            assert float(corrected.min()) >= 0.0
            assert float(corrected.max()) <= 1.0
    unclamped = base + 0.4 * 40.0 * (node_scores - 0.0)
    assert float(unclamped.max()) > 1.0  # the clamp is what keeps M* in range


def test_soft_histogram_sums_to_one_and_follows_the_scores() -> None:
    generator = torch.Generator().manual_seed(5)
    maps = torch.rand(3, 225, generator=generator)
    bins = uniform_bins(16)
    histogram = soft_histogram(maps, *bins)
    torch.testing.assert_close(histogram.sum(dim=1), torch.ones(3))
    low, high = soft_histogram(torch.full((1, 10), 0.02), *bins), soft_histogram(torch.full((1, 10), 0.98), *bins)
    assert int(low.argmax()) == 0
    assert int(high.argmax()) == 15


def test_untrained_image_head_rises_with_the_upper_tail() -> None:
    head = HistogramImageHead(16, 32)
    generator = torch.Generator().manual_seed(13)
    normal = 0.3 * torch.rand(1, 64, generator=generator)
    defective = normal.clone()
    defective[0, :6] = 0.9  # a few patches with strong evidence
    with torch.no_grad():
        assert float(head(defective)) > float(head(normal))
        assert float(head(normal + 0.2)) > float(head(normal))


# ------------------------------------------------------------------------------------------------ CLIP access
def test_clip_backbone_matches_open_clip(tiny_backbone: ClipBackbone) -> None:
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(6))
    clip = tiny_backbone.clip
    normalised = (images - tiny_backbone.pixel_mean) / tiny_backbone.pixel_std
    with torch.no_grad():
        features = tiny_backbone.encode_image(images)
        torch.testing.assert_close(features.image_embedding, clip.encode_image(normalised), atol=1e-5, rtol=1e-5)
        texts = ["a photo of a bottle.", "a photo of a damaged bottle with a large breakage."]
        reference = clip.encode_text(open_clip.get_tokenizer(TINY_CLIP)(texts))
        torch.testing.assert_close(tiny_backbone.encode_text(texts), reference, atol=1e-5, rtol=1e-5)
    assert features.patch_tokens.shape == (2, 64, 32)
    assert features.gallery_tokens.shape == (2, 2, 64, 48)


def test_surgery_tokens_are_value_value_attention(tiny_backbone: ClipBackbone) -> None:
    """The surgery stream of the last block equals PyTorch's MHA with the value projection as query, key and value."""
    backbone = ClipBackbone(TINY_CLIP, pretrained=None, surgery_depth=1, gallery_layers=(0, 1))
    backbone.clip.load_state_dict(tiny_backbone.clip.state_dict())
    final = ClipBackbone(TINY_CLIP, pretrained=None, token_source="final", gallery_layers=(0, 1))
    final.clip.load_state_dict(tiny_backbone.clip.state_dict())
    images = torch.rand(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(7))
    visual = backbone.clip.visual
    last = visual.transformer.resblocks[-1]
    captured = {}
    handle = last.register_forward_hook(lambda _module, inputs, _output: captured.update(x=inputs[0]))
    with torch.no_grad():
        tokens = backbone.encode_image(images).patch_tokens
        handle.remove()
        block_input = captured["x"].transpose(0, 1)  # (N, L, C) input of the last block
        width = block_input.shape[-1]
        value_weight = last.attn.in_proj_weight[2 * width :]
        value_bias = last.attn.in_proj_bias[2 * width :]
        normed = last.ln_1(block_input).transpose(0, 1)
        attended, _ = F.multi_head_attention_forward(
            normed,
            normed,
            normed,
            width,
            last.attn.num_heads,
            None,
            torch.cat([value_bias] * 3),
            None,
            None,
            False,
            0.0,
            last.attn.out_proj.weight,
            last.attn.out_proj.bias,
            training=False,
            need_weights=False,
            use_separate_proj_weight=True,
            q_proj_weight=value_weight,
            k_proj_weight=value_weight,
            v_proj_weight=value_weight,
        )
        expected = visual.ln_post(block_input + attended.transpose(0, 1))[:, 1:] @ visual.proj
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tokens, final.encode_image(images).patch_tokens, atol=1e-3)


def test_backbone_rejects_bad_arguments() -> None:
    register_open_clip_config(TINY_CLIP, TINY_CLIP_CONFIG)
    with pytest.raises(ValueError, match="gallery_layers must be"):
        ClipBackbone(TINY_CLIP, pretrained=None, gallery_layers=(2, 7))
    with pytest.raises(ValueError, match="token_source must be one of"):
        ClipBackbone(TINY_CLIP, pretrained=None, token_source="middle", gallery_layers=(0,))
    backbone = ClipBackbone(TINY_CLIP, pretrained=None, gallery_layers=(0,))
    with pytest.raises(ValueError, match="longer than the text context"):
        backbone.tokenize(["a photo of a " + "very " * 40 + "long bottle."])  # 32-token context
    with pytest.raises(ValueError, match="already defines an architecture"):
        register_open_clip_config("ViT-B-16-plus-240", TINY_CLIP_CONFIG)


# ---------------------------------------------------------------------------------------------------- prompts
def test_special_prompts_per_dataset_and_generic_fallback(tiny_backbone: ClipBackbone) -> None:
    assert special_states("bottle")[0] == "{} with a large breakage"  # MVTec AD
    assert "{} with a bent pin" in special_states("PCB1")  # VisA, case-blind
    assert "{} with a damaged thread" in special_states("cable_gland")  # MVTec 3D-AD
    assert special_states("my_conveyor_part") == GENERIC_DEFECT_STATES  # Folder data
    assert object_name("pcb3") == "printed circuit board"
    learner = PromptLearner(tiny_backbone, "metal_nut")
    assert "a photo of a flipped metal nut." in learner.prompt_texts
    assert learner.context_length == 4  # "a photo of a"
    assert int(learner.is_abnormal.sum()) == 9 + 4 + 4  # Global + Special + Local
    assert int((~learner.is_abnormal).sum()) == 7


def test_untrained_prompts_equal_the_hand_written_prompts(tiny_backbone: ClipBackbone) -> None:
    learner = PromptLearner(tiny_backbone, "bottle", groups=("global", "special"))
    support = F.normalize(torch.randn(32, generator=torch.Generator().manual_seed(8)), dim=0)
    with torch.no_grad():
        encoded = learner(tiny_backbone, support)  # Psi starts at zero: C_S = 0
        reference = F.normalize(tiny_backbone.encode_text(learner.prompt_texts), dim=-1)
    torch.testing.assert_close(encoded.embeddings, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoded.normal_centre.norm(), torch.tensor(1.0))


# ------------------------------------------------------------------------------------------------ the model
def test_loss_decreases_over_a_few_steps() -> None:
    torch.manual_seed(0)
    model = H2VLRModel(class_name="bottle", **TINY_MODEL_KWARGS)
    shots = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(9))
    model.set_support(shots)
    batch = SupportAnomalySynthesizer()(shots, torch.arange(2))
    optimizer = torch.optim.SGD(model.learnable_parameters(), lr=2e-3, momentum=0.9)
    losses = []
    for _ in range(6):
        terms = model.training_losses(batch.images, batch.masks, batch.shot_index, batch.clean)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        losses.append(float(terms.total.detach()))
    assert losses[-1] < losses[0]
    assert float(terms.structural.detach()) > 0
    assert float(terms.laplacian.detach()) >= 0


def test_support_feature_is_the_mean_of_the_shots_unit_embeddings() -> None:
    """Eq. 1's G_s: the mean of the normalised image embeddings, not normalised again (shorter for unlike shots)."""
    model = H2VLRModel(class_name="bottle", **TINY_MODEL_KWARGS)
    shots = torch.zeros(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    shots[1] = 1.0
    model.set_support(shots)  # a black and a white shot: unlike embeddings, so their mean is visibly shorter than 1
    unit = model.encode(shots).embedding
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(model.support_embedding, unit.mean(dim=0))
    assert float(model.support_embedding.norm()) < 0.95


def test_ablation_switches_remove_their_parts() -> None:
    sab = H2VLRModel(use_dsi=False, use_hsr=False, **TINY_MODEL_KWARGS)
    full = H2VLRModel(**TINY_MODEL_KWARGS)
    assert sab.reasoner is None
    assert sab.prompts.mapper is None
    assert full.reasoner is not None
    assert full.prompts.mapper is not None
    assert sab.num_learnable_parameters() < full.num_learnable_parameters()
    shots = torch.rand(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(10))
    sab.set_support(shots)
    batch = SupportAnomalySynthesizer()(shots, torch.arange(1))
    terms = sab.training_losses(batch.images, batch.masks, batch.shot_index, batch.clean)
    assert float(terms.structural.detach()) == 0.0
    sab.eval()
    with torch.no_grad():
        output = sab(shots)
    assert output.anomaly_map.shape == (1, 1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def test_local_weights_file_gives_the_same_outputs_as_weights_in_memory(tmp_path) -> None:
    reference = H2VLRModel(class_name="bottle", **TINY_MODEL_KWARGS)
    weights_file = tmp_path / "tiny_clip.pt"
    torch.save(reference.backbone.clip.state_dict(), weights_file)
    # another seed: other random weights everywhere, so only the file can make the CLIP models equal
    from_file = H2VLRModel(class_name="bottle", pretrained_weights=weights_file, seed=1, **TINY_MODEL_KWARGS)
    from_file.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("backbone.")}, strict=False
    )
    shots = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(11))
    queries = torch.rand(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(12))
    assert not torch.equal(
        H2VLRModel(class_name="bottle", seed=1, **TINY_MODEL_KWARGS).backbone.clip.visual.conv1.weight,
        reference.backbone.clip.visual.conv1.weight,
    )
    outputs = []
    for model in (reference, from_file):
        model.set_support(shots)
        model.eval()
        with torch.no_grad():
            outputs.append(model(queries))
    torch.testing.assert_close(outputs[1].pred_score, outputs[0].pred_score, rtol=0, atol=0)
    torch.testing.assert_close(outputs[1].anomaly_map, outputs[0].anomaly_map, rtol=0, atol=0)
