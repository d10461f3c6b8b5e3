"""Every option of H2VLR, its default and its documentation, in one place.

:class:`H2VLROptions` is the single source of truth: the torch model (:class:`~.torch_model.H2VLRModel`) is built
from it, the Lightning module (:class:`~.lightning_model.H2VLR`) takes the same names as keyword arguments (a test
checks that its signature equals the fields here: names, types, defaults) and gets its ``Args`` documentation from
:func:`options_docstring`, and the option table of the model README is :func:`options_table` (a test checks that the
README holds exactly this table; ``python -m anomalib_hypergraph.models.h2vlr.options`` prints it).

"paper:" in a description marks a value the paper states (arXiv 2604.14507); "ours" marks a choice the paper leaves
open; "paper reading" / "our reading" mark where the paper can be read two ways and which one the option selects.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from anomalib_hypergraph.backbones.clip import TOKEN_SOURCES, TokenSource
from anomalib_hypergraph.data.few_shot import ShotSelection, check_shot_arguments

PROMPT_GROUPS = ("global", "special", "local")
SUPPORT_CONDITIONINGS = ("multiply", "add")
EDGE_WEIGHTINGS = ("affinity", "free")
VERTEX_DEGREES = ("count", "weighted")
NORMALIZATIONS = ("one_sided", "symmetric")
SINGLE_SHOT_GALLERIES = ("shifted_view", "self")
IMAGE_HEAD_INITS = ("tail", "random")

SupportConditioning = Literal["multiply", "add"]
EdgeWeighting = Literal["affinity", "free"]
VertexDegree = Literal["count", "weighted"]
Normalization = Literal["one_sided", "symmetric"]
SingleShotGallery = Literal["shifted_view", "self"]
ImageHeadInit = Literal["tail", "random"]

# Groups of the README table, in order.
GROUPS = (
    "backbone",
    "shots and training",
    "prompts (DSI, Eq. 1-2)",
    "hypergraph (Eq. 3-4)",
    "maps and scores (Eq. 5-7)",
    "objective (Eq. 8-11)",
)


def _doc(group: str, doc: str) -> dict[str, str]:
    """Field metadata: the README group and the documentation (whitespace collapsed)."""
    return {"group": group, "doc": " ".join(doc.split())}


@dataclass(frozen=True)
class H2VLROptions:
    """H2VLR's options (see the module docstring); invalid combinations raise ``ValueError`` naming the option."""

    # ------------------------------------------------------------------------------------------------ backbone
    backbone: str = field(
        default="ViT-B-16-plus-240",
        metadata=_doc(
            GROUPS[0],
            "open_clip architecture (paper: ``ViT-B-16-plus-240``, 240 px input).",
        ),
    )
    pretrained: bool = field(
        default=True,
        metadata=_doc(
            GROUPS[0],
            "Load the pretrained CLIP weights ``pretrained_tag`` (hub or open_clip's cache); false: random weights "
            "(tests, timing). Ignored when ``pretrained_weights`` is given.",
        ),
    )
    pretrained_tag: str = field(
        default="laion400m_e32",
        metadata=_doc(
            GROUPS[0],
            "open_clip pretrained tag (``laion400m_e32``, the weights the reference names; open_clip also ships "
            "``laion400m_e31`` for this architecture).",
        ),
    )
    pretrained_weights: str | Path | None = field(
        default=None,
        metadata=_doc(
            GROUPS[0],
            "Local state dict of the whole CLIP model (machines without hub access); takes precedence.",
        ),
    )
    backbone_config: dict[str, Any] | None = field(
        default=None,
        metadata=_doc(
            GROUPS[0],
            "open_clip model config registered under ``backbone`` when open_clip does not know the name.",
        ),
    )
    image_size: tuple[int, int] | None = field(
        default=None,
        metadata=_doc(
            GROUPS[0],
            "Model input size; None = the backbone's (240 for ``ViT-B-16-plus-240``); must match it.",
        ),
    )
    token_source: TokenSource = field(
        default="surgery",
        metadata=_doc(
            GROUPS[0],
            "Text-aligned patch tokens: the value-value attention stream (``surgery``, ours, after the CLIP-surgery "
            "line of work) or CLIP's ``final`` tokens.",
        ),
    )
    surgery_depth: int | None = field(
        default=None,
        metadata=_doc(
            GROUPS[0],
            "Blocks in the value-value stream (None: the last half of the blocks).",
        ),
    )
    gallery_layers: Sequence[int] = field(
        default=(2, 7),
        metadata=_doc(
            GROUPS[0],
            "0-based blocks whose patch tokens form the visual support gallery of M_vis (ours: 2 and 7, as in the "
            "PromptAD line of work).",
        ),
    )
    save_backbone_weights: bool | None = field(
        default=None,
        metadata=_doc(
            GROUPS[0],
            "Keep the frozen CLIP weights (~830 MB for ``ViT-B-16-plus-240``) in checkpoints. None: only random "
            "weights, which nothing else can reproduce; weights from the hub or a file are rebuilt at load and checked"
            " against a SHA-256 fingerprint.",
        ),
    )
    # -------------------------------------------------------------------------------------- shots and training
    k_shot: int | None = field(
        default=None,
        metadata=_doc(
            GROUPS[1],
            "Normal training images kept as the support set; None = all of the datamodule's training images (use with "
            "``FewShot`` or the cross-domain datamodules). Paper: 1, 2 and 4 shots.",
        ),
    )
    shot_selection: ShotSelection = field(
        default="random",
        metadata=_doc(
            GROUPS[1],
            "``random`` (seeded by ``seed``) or ``first`` (first k in sorted path order).",
        ),
    )
    seed: int = field(
        default=0,
        metadata=_doc(
            GROUPS[1],
            "Seed of everything random: shot selection, random CLIP weights, each module's initialisation (one derived"
            " seed per module, the same whether the class name comes from the constructor or the datamodule), the shot"
            " order of multi-step epochs and every synthetic anomaly (keyed by seed, step and shot). Torch's global "
            "seed and the loader's shuffling do not matter.",
        ),
    )
    epochs: int = field(
        default=100,
        metadata=_doc(
            GROUPS[1],
            "Training epochs, each one pass over the support set (paper: 100).",
        ),
    )
    batch_size: int = field(
        default=400,
        metadata=_doc(
            GROUPS[1],
            "Shots per optimisation step (paper: batch size 400). A k-shot support set with k <= 400 is one batch, so "
            "an epoch is one step; larger sets take ceil(k / batch_size) steps in a seeded order. Each shot enters "
            "with its ``anomalies_per_shot`` synthetic copies. Independent of the datamodule's train_batch_size.",
        ),
    )
    lr: float = field(
        default=0.002,
        metadata=_doc(
            GROUPS[1],
            "SGD learning rate (paper: 2e-3), constant over the epochs (ours: no schedule is stated with the paper's "
            "settings we implement from).",
        ),
    )
    momentum: float = field(
        default=0.9,
        metadata=_doc(
            GROUPS[1],
            "SGD momentum (ours).",
        ),
    )
    weight_decay: float = field(
        default=0.0,
        metadata=_doc(
            GROUPS[1],
            "SGD weight decay (ours).",
        ),
    )
    anomalies_per_shot: int = field(
        default=1,
        metadata=_doc(
            GROUPS[1],
            "Synthetic-anomaly copies of each shot per step (ours; anomalib's Perlin generator: the masks Eq. 10-11 "
            "need from normal-only shots).",
        ),
    )
    anomaly_source_path: str | Path | None = field(
        default=None,
        metadata=_doc(
            GROUPS[1],
            "Texture folder for the synthetic anomalies (None: Perlin noise textures).",
        ),
    )
    leave_one_out: bool = field(
        default=True,
        metadata=_doc(
            GROUPS[1],
            "With k >= 2 shots, match each training image against the gallery of the *other* shots (ours), so that the"
            " training M_vis has the distribution of a test image's; false: against all shots (M_vis ~ 0 on normal "
            "regions).",
        ),
    )
    single_shot_gallery: SingleShotGallery = field(
        default="shifted_view",
        metadata=_doc(
            GROUPS[1],
            "With one shot there are no other shots: match the training images against a view of the shot shifted by "
            "half a patch (``shifted_view``, ours: every token differs from the shot's own, as a test image's do), or "
            "against the shot itself (``self``: M_vis ~ 0 on normal regions in training, > 0 at test).",
        ),
    )
    # -------------------------------------------------------------------------------------------------- prompts
    class_name: str | None = field(
        default=None,
        metadata=_doc(
            GROUPS[2],
            "Object class named in the prompts; None = the datamodule's category (``object`` without one).",
        ),
    )
    context_init: str | None = field(
        default="a photo of a",
        metadata=_doc(
            GROUPS[2],
            "Words initialising each prompt's learnable context (ours); None: ``context_length`` random vectors.",
        ),
    )
    context_length: int = field(
        default=4,
        metadata=_doc(
            GROUPS[2],
            "Context vectors per prompt when ``context_init`` is None (ours).",
        ),
    )
    prompt_groups: Sequence[str] = field(
        default=PROMPT_GROUPS,
        metadata=_doc(
            GROUPS[2],
            "Abnormal prompt groups (paper: Global, Special and Local), a subset of ``global``, ``special``, "
            "``local``.",
        ),
    )
    num_local_prompts: int = field(
        default=4,
        metadata=_doc(
            GROUPS[2],
            "Local prompts with learnable anomaly tokens (ours: 4).",
        ),
    )
    local_prompt_tokens: int = field(
        default=2,
        metadata=_doc(
            GROUPS[2],
            "Learnable anomaly tokens per Local prompt (ours: 2).",
        ),
    )
    use_dsi: bool = field(
        default=True,
        metadata=_doc(
            GROUPS[2],
            "Dynamic Semantic Induction (Table 4 ablation): condition the prompt contexts on the support set through "
            "C_S = Psi(G_s), Eq. 1; false: static learnable contexts.",
        ),
    )
    support_conditioning: SupportConditioning = field(
        default="multiply",
        metadata=_doc(
            GROUPS[2],
            "How C_S enters each context vector, Eq. 1: ``multiply`` element-wise (paper reading; Psi's output layer "
            "starts at 1, so the untrained prompts are the hand-written ones) or ``add`` (our earlier reading, "
            "CoCoOp-style; Psi's output layer starts at 0).",
        ),
    )
    # ----------------------------------------------------------------------------------------------- hypergraph
    use_hsr: bool = field(
        default=True,
        metadata=_doc(
            GROUPS[3],
            "High-order structural reasoning (Table 4 ablation): hypergraph message passing (Eq. 4), the anomaly head "
            "M_hg and the residual correction (Eq. 6-7). False: the base map (Eq. 5) goes straight to the image head; "
            "``use_sghm`` and ``use_structural_loss`` then have nothing to act on.",
        ),
    )
    use_sghm: bool = field(
        default=True,
        metadata=_doc(
            GROUPS[3],
            "Semantic guidance of the hypergraph (Table 4 ablation): prompt nodes and their semantic hyperedges. "
            "False: structural hyperedges only.",
        ),
    )
    num_neighbors: int = field(
        default=8,
        metadata=_doc(
            GROUPS[3],
            "K of the structural hyperedges (paper: K = 8).",
        ),
    )
    num_semantic_neighbors: int = field(
        default=8,
        metadata=_doc(
            GROUPS[3],
            "K of the semantic hyperedges (paper: K = 8).",
        ),
    )
    num_layers: int = field(
        default=2,
        metadata=_doc(
            GROUPS[3],
            "L, message-passing layers of Eq. 4 (paper: 2); 0: the head reads the unrefined patch tokens.",
        ),
    )
    edge_weights: EdgeWeighting = field(
        default="affinity",
        metadata=_doc(
            GROUPS[3],
            "Hyperedge weights W: ``affinity`` (paper reading: derived from the prompt-patch affinities; semantic "
            "hyperedge p gets the mean over its patches of their softmax affinity to prompt p, structural hyperedges "
            "1) or ``free`` (our earlier reading: one learnable softplus(theta) per patch position and per prompt).",
        ),
    )
    vertex_degree: VertexDegree = field(
        default="count",
        metadata=_doc(
            GROUPS[3],
            "D_v of Eq. 3: ``count`` of the hyperedges holding a vertex (paper) or ``weighted`` sum of their weights.",
        ),
    )
    normalization: Normalization = field(
        default="one_sided",
        metadata=_doc(
            GROUPS[3],
            "Eq. 4 propagation: ``one_sided`` D_v^-1 H W D_e^-1 H^T (paper) or ``symmetric`` D_v^-1/2 H W D_e^-1 H^T "
            "D_v^-1/2 (HGNN).",
        ),
    )
    prompt_messages: bool = field(
        default=False,
        metadata=_doc(
            GROUPS[3],
            "False (paper reading): prompts act only through hyperedge construction and weights, messages stay on the "
            "visual subgraph (a semantic hyperedge passes messages among its K patches). True (our earlier reading): "
            "the prompt node is a member of its hyperedge (K + 1) and its embedding enters H^T X.",
        ),
    )
    residual_update: bool = field(
        default=True,
        metadata=_doc(
            GROUPS[3],
            "Eq. 4 layer update x <- x + GELU(message) (ours: the refined nodes stay close to the CLIP tokens); false:"
            " x <- GELU(message).",
        ),
    )
    head_reduction: int = field(
        default=4,
        metadata=_doc(
            GROUPS[3],
            "Hidden size of the anomaly head (M_hg) = D / head_reduction (ours).",
        ),
    )
    chunk_size: int = field(
        default=4096,
        metadata=_doc(
            GROUPS[3],
            "Rows per block of the cosine top-k searches (memory only).",
        ),
    )
    # -------------------------------------------------------------------------------------------- maps, scores
    alpha: float = field(
        default=0.5,
        metadata=_doc(
            GROUPS[4],
            "Weight of M_txt in the base map, Eq. 5 (paper: 0.5).",
        ),
    )
    eta: float = field(
        default=0.4,
        metadata=_doc(
            GROUPS[4],
            "Weight of the residual correction, Eq. 7 (paper: 0.4).",
        ),
    )
    residual_scale: float = field(
        default=1.0,
        metadata=_doc(
            GROUPS[4],
            "Initial value of the learnable beta of Eq. 6 (ours: 1).",
        ),
    )
    histogram_bins: int = field(
        default=16,
        metadata=_doc(
            GROUPS[4],
            "Bins of the image head's soft histogram (ours: 16).",
        ),
    )
    learnable_histogram: bool = field(
        default=True,
        metadata=_doc(
            GROUPS[4],
            "Learn the soft histogram's bin centres and widths (paper: learnable soft histogram); false: fixed at (b +"
            " 0.5) / bins and the bin width.",
        ),
    )
    image_head_hidden: int = field(
        default=32,
        metadata=_doc(
            GROUPS[4],
            "Hidden units of the image head's MLP (ours: 32).",
        ),
    )
    image_head_init: ImageHeadInit = field(
        default="tail",
        metadata=_doc(
            GROUPS[4],
            "``tail``: the untrained image head rises with the histogram's upper tail (ours); ``random``: PyTorch's "
            "default initialisation.",
        ),
    )
    text_temperature: float | None = field(
        default=None,
        metadata=_doc(
            GROUPS[4],
            "Logit scale of text-image similarities; None = the CLIP model's learned one.",
        ),
    )
    sigma: float = field(
        default=4.0,
        metadata=_doc(
            GROUPS[4],
            "Gaussian smoothing of the upsampled anomaly map (ours: 4; 0: none).",
        ),
    )
    # ----------------------------------------------------------------------------------------------- objective
    use_structural_loss: bool = field(
        default=True,
        metadata=_doc(
            GROUPS[5],
            "L_str (Eq. 10) in the objective; false: left out (Table 5's lambda_str = 0 without computing it). Needs "
            "``use_hsr`` (it supervises M_hg).",
        ),
    )
    lambda_str: float = field(
        default=0.02,
        metadata=_doc(
            GROUPS[5],
            "Weight of L_str, Eq. 8 (paper: 0.02).",
        ),
    )
    lambda_seg: float = field(
        default=1.0,
        metadata=_doc(
            GROUPS[5],
            "Weight of L_seg, Eq. 8 (paper: 1.0).",
        ),
    )
    lambda_image: float = field(
        default=1.0,
        metadata=_doc(
            GROUPS[5],
            "Weight of the image-head BCE (ours: the paper lists no image term; the head needs one).",
        ),
    )
    laplacian_weight: float = field(
        default=1.0,
        metadata=_doc(
            GROUPS[5],
            "xi, weight of s^T L_H s inside L_str, Eq. 10 (ours: 1).",
        ),
    )
    focal_gamma: float = field(
        default=2.0,
        metadata=_doc(
            GROUPS[5],
            "Focusing parameter of the focal terms (ours: 2).",
        ),
    )
    eam_margin: float = field(
        default=0.1,
        metadata=_doc(
            GROUPS[5],
            "gamma of the explicit anomaly margin, Eq. 9 (ours: 0.1).",
        ),
    )
    triplet_margin: float = field(
        default=0.1,
        metadata=_doc(
            GROUPS[5],
            "Margin of the triplet term of Eq. 9 (ours: 0.1).",
        ),
    )

    def __post_init__(self) -> None:
        """Check values and combinations that do not depend on the CLIP architecture."""
        choices = {
            "token_source": TOKEN_SOURCES,
            "support_conditioning": SUPPORT_CONDITIONINGS,
            "edge_weights": EDGE_WEIGHTINGS,
            "vertex_degree": VERTEX_DEGREES,
            "normalization": NORMALIZATIONS,
            "single_shot_gallery": SINGLE_SHOT_GALLERIES,
            "image_head_init": IMAGE_HEAD_INITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                msg = f"H2VLR option {name} must be one of {allowed}, got {getattr(self, name)!r}."
                raise ValueError(msg)
        unknown = [group for group in self.prompt_groups if group not in PROMPT_GROUPS]
        if unknown or not self.prompt_groups:
            msg = (
                f"H2VLR option prompt_groups must be a non-empty subset of {PROMPT_GROUPS}, "
                f"got {list(self.prompt_groups)}."
            )
            raise ValueError(msg)
        positive = ("epochs", "batch_size", "anomalies_per_shot", "histogram_bins", "head_reduction", "chunk_size")
        for name in positive:
            if getattr(self, name) < 1:
                msg = f"H2VLR option {name} must be >= 1, got {getattr(self, name)}."
                raise ValueError(msg)
        if self.num_layers < 0:
            msg = f"H2VLR option num_layers must be >= 0, got {self.num_layers}."
            raise ValueError(msg)
        if not 0.0 <= self.alpha <= 1.0:
            msg = f"H2VLR option alpha (Eq. 5) must lie in [0, 1], got {self.alpha}."
            raise ValueError(msg)
        if self.sigma < 0:
            msg = f"H2VLR option sigma must be >= 0, got {self.sigma}."
            raise ValueError(msg)
        if self.k_shot is not None:
            check_shot_arguments(self.k_shot, self.shot_selection)

    @property
    def semantic_hyperedges(self) -> bool:
        """Whether the reasoning's hypergraph has prompt nodes and semantic hyperedges (SGHM)."""
        return self.use_hsr and self.use_sghm

    @property
    def structural_loss(self) -> bool:
        """Whether L_str is part of the objective."""
        return self.use_hsr and self.use_structural_loss

    def inert_switches(self) -> list[str]:
        """Switches set to true that have nothing to act on (``use_hsr=False`` removes what they switch)."""
        if self.use_hsr:
            return []
        return [name for name in ("use_sghm", "use_structural_loss") if getattr(self, name)]


def option_fields() -> tuple:
    """Return the dataclass fields of :class:`H2VLROptions`, in declaration order."""
    return fields(H2VLROptions)


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def options_docstring(indent: int = 8) -> str:
    """Google-style ``Args`` entries of every option (for the Lightning module's docstring)."""
    lines = []
    for option in option_fields():
        entry = f"{option.name}: {option.metadata['doc']}"
        lines += textwrap.wrap(entry, width=116 - indent, subsequent_indent="    ")
    return textwrap.indent("\n".join(lines), " " * indent)


def options_table() -> str:
    """Return the markdown option table of the model README, grouped, with CLI names and defaults."""
    rows = []
    for group in GROUPS:
        rows.append(f"| **{group}** | | |")
        for option in option_fields():
            if option.metadata["group"] != group:
                continue
            default = option.default if option.default is not MISSING else ""
            rows.append(f"| `{option.name}` | `{_default_text(default)}` | {option.metadata['doc']} |")
    return "\n".join(["| option (`--model.<option>`) | default | what |", "|---|---|---|", *rows])


if __name__ == "__main__":
    print(options_table())
