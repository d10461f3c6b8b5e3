r"""Dynamic Semantic Induction (DSI, Eq. 1-2): support-conditioned learnable prompts and semantic centres.

Each prompt is ``[V_1 .. V_m] <state words>.`` where the m context vectors V are learnable per prompt. DSI conditions
them on the support set (Eq. 1): the global support feature G_s (mean of the normalised image embeddings of the k
shots) goes through the learnable mapper Psi (ours: Linear D -> D/16, ReLU, Linear D/16 -> text width; 640 -> 40 ->
640 for ``ViT-B-16-plus-240``) and the support context :math:`C_S = \Psi(G_s)` is multiplied element-wise into every
context vector of every prompt, :math:`V^{(i)}_j \odot C_S` (``conditioning="multiply"``, the paper's Eq. 1), or
added to it, :math:`V^{(i)}_j + C_S` (``"add"``, our earlier, CoCoOp-style reading). Prompts come in groups:

- **normal**: the normal states of :data:`~.vocabulary.NORMAL_STATES`;
- **Global** (G): generic anomaly states (:data:`~.vocabulary.GLOBAL_ANOMALY_STATES`);
- **Special** (S): class-specific defect states (:func:`~.vocabulary.special_states`, generic fallback);
- **Local** (L): ``[V] [A_1 .. A_r] <object>.`` with r learnable anomaly tokens A per prompt instead of words.

Eq. 2: the frozen text encoder maps every prompt to :math:`T_k^{(i)}`; the semantic centres are C_n = normalise(mean
of the normal T) and C_a = normalise(mean of the abnormal T). A normal patch token is expected to be more similar to
C_n than to C_a: that is the direction of Eq. 9's margin and of the text map M_txt (the inequality printed with
Eq. 2 runs the other way, which would contradict both; we follow Eq. 9).

Choices (ours, parameters): the context vectors start as the token embeddings of ``context_init`` ("a photo of a",
so m = 4); Psi's output layer starts at the neutral element of the combination (weight 0, bias 1 for the product,
bias 0 for the sum), so C_S starts neutral and the untrained prompts are the hand-written CLIP prompts:
conditioning is learned, not imposed; r = 2 anomaly tokens in each of 4 Local prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_hypergraph.backbones import ClipBackbone

from .options import PROMPT_GROUPS, SUPPORT_CONDITIONINGS
from .vocabulary import GLOBAL_ANOMALY_STATES, NORMAL_STATES, object_name, special_states

PLACEHOLDER = "X"  # a one-token word whose embedding is replaced by a learned vector
INIT_STD = 0.02


class PromptEmbeddings(NamedTuple):
    """Encoded prompts of one forward pass.

    Attributes:
        embeddings: ``(P, D)`` normalised text features T of every prompt.
        is_abnormal: ``(P,)`` True for G, S and L prompts.
        normal_centre: ``(D,)`` C_n.
        anomaly_centre: ``(D,)`` C_a.

    """

    embeddings: torch.Tensor
    is_abnormal: torch.Tensor
    normal_centre: torch.Tensor
    anomaly_centre: torch.Tensor


class PromptLearner(nn.Module):
    """Learnable, support-conditioned prompt ensemble of one object class (Eq. 1-2, module docstring).

    The CLIP model is not a submodule: it is passed to :meth:`forward` (it belongs to the parent model).

    Args:
        backbone: the frozen CLIP encoder (tokenizer, token embeddings, text transformer).
        class_name: category name (``bottle``, ``pcb1``, any other name gets the generic S-prompts).
        context_init: words whose token embeddings initialise the context vectors (m = their token count), or None
            for ``context_length`` random vectors.
        context_length: m when ``context_init`` is None.
        groups: abnormal prompt groups to use, a subset of ``("global", "special", "local")``.
        num_local_prompts: number of Local prompts.
        local_prompt_tokens: r, learnable anomaly tokens per Local prompt.
        use_support_conditioning: DSI on (the contexts are combined with C_S = Psi(G_s)) or off (static contexts).
        conditioning: ``"multiply"`` (element-wise, Eq. 1) or ``"add"`` C_S to every context vector.
        mapper_reduction: hidden size of Psi = D / ``mapper_reduction`` (16: 640 -> 40 -> 640).

    """

    def __init__(
        self,
        backbone: ClipBackbone,
        class_name: str,
        *,
        context_init: str | None = "a photo of a",
        context_length: int = 4,
        groups: Sequence[str] = PROMPT_GROUPS,
        num_local_prompts: int = 4,
        local_prompt_tokens: int = 2,
        use_support_conditioning: bool = True,
        conditioning: str = "multiply",
        mapper_reduction: int = 16,
    ) -> None:
        super().__init__()
        if conditioning not in SUPPORT_CONDITIONINGS:
            msg = f"conditioning must be one of {SUPPORT_CONDITIONINGS}, got {conditioning!r}."
            raise ValueError(msg)
        self.conditioning = conditioning
        unknown = [group for group in groups if group not in PROMPT_GROUPS]
        if unknown or not groups:
            msg = f"prompt groups must be a non-empty subset of {PROMPT_GROUPS}, got {list(groups)}."
            raise ValueError(msg)
        if "local" in groups and (num_local_prompts < 1 or local_prompt_tokens < 1):
            msg = "num_local_prompts and local_prompt_tokens must be >= 1 when the 'local' group is used."
            raise ValueError(msg)
        self.class_name = class_name
        self.object_name = object_name(class_name)
        context_words = context_init.strip() if context_init else " ".join([PLACEHOLDER] * context_length)
        context_ids = _inner_tokens(backbone, context_words)
        self.context_length = len(context_ids)
        self.local_prompt_tokens = local_prompt_tokens if "local" in groups else 0

        texts, abnormal = [], []
        for state in NORMAL_STATES:
            texts.append(f"{context_words} {state.format(self.object_name)}.")
            abnormal.append(False)
        if "global" in groups:
            texts += [f"{context_words} {state.format(self.object_name)}." for state in GLOBAL_ANOMALY_STATES]
            abnormal += [True] * len(GLOBAL_ANOMALY_STATES)
        if "special" in groups:
            states = special_states(class_name)
            texts += [f"{context_words} {state.format(self.object_name)}." for state in states]
            abnormal += [True] * len(states)
        self.num_fixed_prompts = len(texts)
        if "local" in groups:
            anomaly_words = " ".join([PLACEHOLDER] * local_prompt_tokens)
            texts += [f"{context_words} {anomaly_words} {self.object_name}."] * num_local_prompts
            abnormal += [True] * num_local_prompts
        self.prompt_texts = tuple(texts)

        tokens = backbone.tokenize(texts)
        _check_positions(
            backbone,
            tokens,
            context_ids=context_ids,
            num_fixed=self.num_fixed_prompts,
            local_tokens=self.local_prompt_tokens,
            texts=texts,
        )
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("is_abnormal", torch.tensor(abnormal), persistent=False)
        self.tokens: torch.Tensor
        self.is_abnormal: torch.Tensor

        with torch.no_grad():
            context_embedding = backbone.token_embedding(torch.tensor(context_ids))  # (m, width)
        if context_init:
            context = context_embedding.detach().clone().unsqueeze(0).repeat(len(texts), 1, 1)
        else:
            context = torch.randn(len(texts), self.context_length, backbone.text_width) * INIT_STD
        self.context = nn.Parameter(context)  # V^(i): one learnable context per prompt
        num_local = len(texts) - self.num_fixed_prompts
        self.local_tokens = nn.Parameter(
            torch.randn(num_local, self.local_prompt_tokens, backbone.text_width) * INIT_STD
        )
        self.mapper: nn.Sequential | None = None
        if use_support_conditioning:
            hidden = max(backbone.embed_dim // mapper_reduction, 1)
            self.mapper = nn.Sequential(
                nn.Linear(backbone.embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, backbone.text_width)
            )
            nn.init.zeros_(self.mapper[-1].weight)  # C_S starts neutral: 1 for the product, 0 for the sum
            nn.init.constant_(self.mapper[-1].bias, 1.0 if conditioning == "multiply" else 0.0)

    @property
    def num_prompts(self) -> int:
        """P, the number of prompts (normal + abnormal)."""
        return int(self.tokens.shape[0])

    def forward(self, backbone: ClipBackbone, support_feature: torch.Tensor | None) -> PromptEmbeddings:
        """Encode the prompt ensemble conditioned on the global support feature G_s ``(D,)`` (mean of unit vectors)."""
        embeddings = backbone.token_embedding(self.tokens)  # (P, L, width), frozen vocabulary
        context = self.context
        if self.mapper is not None and support_feature is not None:
            support_context = self.mapper(support_feature)  # Eq. 1: C_S = Psi(G_s)
            multiply = self.conditioning == "multiply"
            # Eq. 1: V^(i) (element-wise) C_S; or our earlier reading V^(i) + C_S
            context = context * support_context if multiply else context + support_context
        start, stop = 1, 1 + self.context_length
        fixed = self.num_fixed_prompts
        rows = [torch.cat([embeddings[:fixed, :start], context[:fixed], embeddings[:fixed, stop:]], dim=1)]
        if self.local_tokens.shape[0]:
            local_stop = stop + self.local_prompt_tokens
            rows.append(
                torch.cat(
                    [embeddings[fixed:, :start], context[fixed:], self.local_tokens, embeddings[fixed:, local_stop:]],
                    dim=1,
                )
            )
        text = backbone.encode_token_embeddings(torch.cat(rows), self.tokens)  # Eq. 2: T_k^(i), frozen text encoder
        text = F.normalize(text, dim=-1)
        normal_centre = F.normalize(text[~self.is_abnormal].mean(dim=0), dim=-1)  # Eq. 2: C_n
        anomaly_centre = F.normalize(text[self.is_abnormal].mean(dim=0), dim=-1)  # Eq. 2: C_a
        return PromptEmbeddings(text, self.is_abnormal, normal_centre, anomaly_centre)


def _inner_tokens(backbone: ClipBackbone, words: str) -> list[int]:
    """BPE ids of ``words`` without the start and end tokens."""
    tokens = backbone.tokenize([words])[0]
    end = int(tokens.argmax())
    return tokens[1:end].tolist()


def _check_positions(
    backbone: ClipBackbone,
    tokens: torch.Tensor,
    *,
    context_ids: list[int],
    num_fixed: int,
    local_tokens: int,
    texts: Sequence[str],
) -> None:
    """Make sure the learned vectors replace exactly the context words and the anomaly-token placeholders."""
    expected = torch.tensor(context_ids)
    start, stop = 1, 1 + len(context_ids)
    misplaced = [text for text, row in zip(texts, tokens, strict=True) if not torch.equal(row[start:stop], expected)]
    if local_tokens:
        placeholder = _inner_tokens(backbone, PLACEHOLDER)
        local_rows = tokens[num_fixed:, stop : stop + local_tokens]
        if len(placeholder) != 1 or bool((local_rows != placeholder[0]).any()):
            misplaced += list(texts[num_fixed:])
    if misplaced:
        msg = f"Prompt tokenisation does not put the learnable vectors where expected for: {misplaced[:3]}."
        raise ValueError(msg)
