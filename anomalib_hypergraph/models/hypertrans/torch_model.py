"""HyperTrans: hypergraph domain transfer for cross-domain few-shot anomaly detection (pure PyTorch).

The model of Algorithm 1 in the HyperTrans paper, as one ``nn.Module``:

- a frozen patch-feature backbone whose stages carry zero-initialised adapters trained under Perlin-AdaIN domain
  perturbation (DP, Eq. 3-7; :mod:`.perturbation`);
- a low-pass filter of the target sensor's images, chosen from the shots at fit time (ours; :mod:`.denoising`);
- a memory of patch features per domain: the source bank (greedy coreset of the source training images) and the
  target bank (all patches of the k target shots), both through the adapted backbone;
- hypergraph domain rectification (HDR, Eq. 8-11; :mod:`.rectification`): a residual HGNN trained on the cross-domain
  hypergraph over both banks. Bank vertices and query patches are rectified by one and the same operator (each vertex
  attached to the bank hypergraph by its own hyperedge), so inference is linear in the bank size and a query equal to
  a bank vertex lands exactly on that vertex's stored feature;
- cross-domain scoring (CDS, Eq. 12-19; :mod:`.scoring`) of the rectified query patches on the source and target
  sub-hypergraphs.

The training stages live here, so that the Lightning module only wires data and hooks and the benchmarks run the very
same code: :meth:`HyperTransModel.perturbation_step` / :meth:`~HyperTransModel.train_perturbation` (stage 1) and
:meth:`~HyperTransModel.fit_banks` (bank hypergraph, Eq. 10 pseudo features, stage 2, stored banks). In eval mode
:meth:`~HyperTransModel.forward` returns an :class:`InferenceBatch`.

One search per query. Each domain's raw bank is searched once for the K nearest rows of every query patch. Their
union holds the query's K nearest bank vertices overall (its hyperedge for rectification), and the same candidates,
compared again after rectification, give each domain's best match for scoring (re-ranking: the rectified nearest
vertex is taken among the K raw nearest of that domain).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

from anomalib_hypergraph.backbones import PatchFeatureExtractor
from anomalib_hypergraph.data.domains import SOURCE, TARGET
from anomalib_hypergraph.hypergraph import (
    AttachedHyperedges,
    BankIndex,
    HypergraphMemoryBank,
    IncidenceKernel,
    bank_hypergraph,
    chunked_knn,
)
from anomalib_hypergraph.models.state import DefaultedState

from .denoising import DenoisingReport, NoiseStatistics, TargetDenoiser
from .perturbation import DomainPerturbation, perturbation_loss
from .rectification import ResHGNN, pseudo_features, train_rectifier
from .scoring import CrossDomainScorer, DomainWeighting, ImageScore, SourceFusion
from .sensor_map import DEFAULT_RIDGE_CANDIDATES, SensorTranslation, TranslationReport, register_pairs

logger = logging.getLogger(__name__)

DOMAINS = (TARGET, SOURCE)  # vertex order of the cross-domain hypergraph: target rows first
SHORTLIST_MARGIN = 4  # extra exact candidates per search, see HyperTransModel._search_banks
VIEW_PROBE_IMAGES = 8  # source images seen in every view for the choice of shot views (choose_shot_views)
VIEW_HELD_OUT_IMAGES = 32  # further source images whose patches that choice matches against the probes
ShotAugmentation = Literal["auto", "dihedral", "none"]
TestViews = bool | Literal["auto"]
TranslationDirection = Literal["auto", "bank", "query"]


@dataclass
class BankReport:
    """What :meth:`HyperTransModel.fit_banks` did, for logs and benchmark tables.

    Attributes:
        target_rows: rows of the target bank.
        source_rows: rows of the source bank (0 without a source domain).
        kernel_scale: the fitted kernel scale (mean bank k-NN distance).
        source_weight: the weight of the source sub-hypergraph in Eq. 18-19 actually used.
        fallback_share: share of vertices whose pseudo feature (Eq. 10) came from the fallback (NaN without HDR).
        losses: stage-2 loss per iteration (empty without HDR).
        fusion: how the sub-hypergraphs are fused (``"target only"``, ``"union"`` or ``"weighted"``).
        translation: the map fitted on the paired shots in the direction used (None without pairs).
        units: ``(target, source)`` held-out median distances, the units of the union (None for other fusions).
        direction: how the paired shots bridge the sensors: ``"bank"`` (source bank translated into the target space),
            ``"query"`` (queries mapped into the source space), None without pairs.
        direction_evidence: held-out median distance of each direction, ``{"bank": ..., "query": ...}`` (the choice
            of ``translation_direction="auto"``; empty when a direction was forced or without a second group).
        pair_alignment: per view, the offset and zoom ``(dy, dx, zoom)`` (:class:`~.sensor_map.Alignment`) at which
            the paired source grids were read to line up with the shots' grids (``pair_registration``; empty when the
            pairs were taken as they are).

    """

    target_rows: int
    source_rows: int
    kernel_scale: float
    source_weight: float
    fallback_share: float
    losses: list[float]
    fusion: str = "target only"
    translation: TranslationReport | None = None
    units: tuple[float, float] | None = None
    direction: str | None = None
    direction_evidence: dict[str, float] = field(default_factory=dict)
    pair_alignment: dict[int, tuple[float, float, float]] = field(default_factory=dict)


@dataclass
class PairedShots:
    """Patch rows of the target shots and of their pixel-aligned source captures, in every candidate view.

    Row ``i`` of ``source`` and of ``target`` show the same spot of the same part, seen by the two sensors.

    Attributes:
        source: source-sensor rows ``(n, C)`` (the paired source images through the adapted backbone).
        target: target-sensor rows ``(n, C)`` (the shots through the adapted backbone).
        shot: ``(n,)`` integer id of the shot a row belongs to.
        view: ``(n,)`` index of the dihedral view a row belongs to (see :func:`dihedral_views`).
        grid: ``(h, w)`` patches of one feature grid when the rows of each shot's view are whole grids in row-major
            order (as extracted); None when they are not, and the pairs are then taken as they are.

    """

    source: torch.Tensor
    target: torch.Tensor
    shot: torch.Tensor
    view: torch.Tensor
    grid: tuple[int, int] | None = None


@dataclass
class ViewReport:
    """How :meth:`HyperTransModel.choose_shot_views` decided which views of the shots enter the target bank.

    Attributes:
        kept: indices of the kept views (0 is the shot as it is).
        shares: per candidate view, the share of held-out source patches whose nearest neighbour lies in that view of
            the probe images (empty when the choice was not made from data).
        view_distance_ratio: how much farther the probe images' patches are from the held-out images in the kept
            views than as they are (geometric mean over the kept views other than the first of the ratio of median
            nearest distances; 1.0: the part looks as normal turned as unturned). ``None`` without evidence or without
            a second kept view.
        test_views: whether ``test_views="auto"`` reads test images in the kept views.

    """

    kept: list[int]
    shares: list[float]
    view_distance_ratio: float | None = None
    test_views: bool = False


class HyperTransModel(DefaultedState, DynamicBufferMixin, nn.Module):
    """HyperTrans as a pure ``nn.Module``: adapted backbone, domain banks, residual HGNN and cross-domain scorer.

    Args:
        backbone: timm backbone name (paper: ``vit_base_patch8_224.dino``; offline: ``tf_efficientnet_lite0``).
        layers: backbone stages whose features form the patch descriptors (``None``: the backbone's default).
        pretrained: load pretrained weights (hub, offline weight package, or ``pretrained_weights``).
        pretrained_weights: local weights file for the backbone (air-gapped machines).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. tiny test models).
        perturbed_stages: 0-based backbone stages followed by perturbation and an adapter. ``None`` = the paper's
            layers 3..10 of a 12-block ViT (indices 2..9: all blocks but the first two and the last two; shallow test
            ViTs keep at least one block); for a CNN, every stage from the second up to the one before the last
            feature stage.
        noise_mean: mean of the Perlin channel factors P_avg, P_std (paper: 0).
        noise_std: standard deviation of the Perlin channel factors (paper: 0.75).
        adapter_reduction: bottleneck reduction of the residual adapters (our choice; the paper only says adapter).
        num_neighbors: K, the bank vertices in each vertex's hyperedge (our choice: 10; a bank vertex counts itself).
        incidence_kernel: how a distance becomes an incidence value in (0, 1]: ``"reciprocal"`` 1/(1+d/s) or
            ``"gaussian"`` exp(-(d/s)^2/2), with s the bank's mean k-NN distance (scale-free, fitted with the banks).
        alpha: residual weight of the HGNN branch in Eq. 9 (paper: 0.3).
        dropout: dropout inside the residual HGNN (paper: 0.5).
        beta: weight of the source sub-hypergraph in Eq. 18-19 (paper: 0.6).
        domain_weighting: how beta is applied, see :class:`~.scoring.CrossDomainScorer`.
        image_score: psi of Eq. 12-13 / 15-16, see :class:`~.scoring.CrossDomainScorer` (paper: ``"max"``).
        top_fraction: share of an image's patches averaged by ``image_score="top_mean"``.
        shot_augmentation: which views of every target shot enter the target bank. ``"auto"`` (ours, default): decided
            at fit time from the source images (:meth:`choose_shot_views`): a dihedral view (90-degree rotations, each
            also mirrored; four views for non-square images) is kept only when it explains held-out source patches, i.e.
            when the part's normal images really take that orientation; ``"dihedral"``: all views; ``"none"``: the
            shots as they are (the paper).
        view_min_share: ``"auto"`` keeps a view whose share of the held-out source patches' nearest neighbours is at
            least this fraction of the share every view would have if the part looked the same in all of them.
        test_views: score a query image in every view kept for the shots (``shot_view_indices``) and average, per
            sub-hypergraph, the nearest-neighbour distances of each view, mapped back onto the image, before scoring
            (ours). The backbone's patch grid samples a rotated or mirrored image at other offsets, so each view is
            another reading of the same surface: a defect smaller than a patch is seen by some of them, and the noise
            of a single reading averages out. But the source bank holds the source images only as they are, and a
            part whose normal images change when turned (an oriented texture, a shape) reads as slightly abnormal in
            every turned view, which drowns the defects. ``"auto"`` (default) decides at fit time from the source
            images (:meth:`choose_shot_views`): the views are read when turned probe images lie, on average over the
            kept views, at most ``test_view_tolerance`` farther from held-out images than unturned ones; ``True``
            always reads the kept views, ``False`` never. Reading costs one backbone pass and search per view.
        test_view_tolerance: the relative increase of the median nearest distance that ``test_views="auto"`` accepts
            (default 0.1: turned normal images at most 10 % farther from the other normal images than unturned).
        target_denoising: low-pass filter of every target-domain image before its features are extracted (ours,
            :mod:`.denoising`): ``"auto"`` chooses a Gaussian blur of 0 to 3 pixels at fit time from the target shots
            alone (their noise level, estimated at the finest scale, and the blur with the lowest Stein unbiased
            risk), so a noisy, coarse sensor is filtered and a sharp one is not (default); a number is a fixed blur
            sigma in pixels, 0 none, as the paper. Source images are never filtered.
        target_denoising_min_gain: ``"auto"`` filters only when the best blur removes at least this share of the
            noise energy (SURE), i.e. when the shots' finest scale is mostly noise rather than the part's detail.
        sigma: Gaussian smoothing of the upsampled anomaly map (paper: 4).
        chunk_size: rows per block in every distance computation (memory vs speed).
        search_backend: how the per-domain banks are searched (:class:`~anomalib_hypergraph.hypergraph.BankIndex`):
            ``"exact"`` (default, our chunked brute force), ``"faiss_flat"`` (exact, faiss), ``"faiss_ivf"`` or
            ``"faiss_hnsw"`` (approximate, for huge banks). The faiss ones need ``pip install
            "anomalib-hypergraph[faiss]"``; their indexes are rebuilt from the banks (checkpoints hold only tensors).
        use_domain_perturbation: ablation switch for DP (adapters are then absent).
        use_rectification: ablation switch for HDR (banks and queries are then used as extracted).
        use_cross_domain_scoring: ablation switch for CDS (off: one nearest-neighbour bank, the union of both).
        use_paired_shots: when the shots come with pixel-aligned source captures (:class:`PairedShots`), learn a map
            between the two sensors' features on them (:mod:`.sensor_map`); ``False`` ignores the pairs.
        translation_ridge: relative ridge strengths the translation chooses from by grouped cross-validation.
        pair_registration: largest displacement, in patches, by which each view's paired source grids may be moved
            to line up with the shots' grids before the map is fitted: an offset along each axis and a zoom (measured
            at the grid's corners), in half-patch steps, chosen by the smallest residual of a ridge map (ours;
            :func:`~.sensor_map.register_pairs`; 0 takes the pairs as they are). Captures from two cameras are rarely
            pixel-aligned; pairs that no alignment explains 1 % better are used as they are.
        translation_direction: which side of the map the source bank is compared on (ours): ``"bank"`` (default)
            translates the source bank into the target feature space once; ``"query"`` maps every query patch into
            the source feature space and compares it with the source bank as captured (better for a new sensor that
            keeps the detail of the old one, worse where the target sees what the source cannot: see the README);
            ``"auto"`` takes the direction in which held-out normal target patches of the shots lie closer to the
            source evidence (smaller median held-out distance, :meth:`translate_source_bank`), decided at fit time and
            stored with the maps. Not the default: the two medians are distances in two feature spaces, and on the
            synthetic depth -> RGB demo it chose the queries and lost (0.819 vs 0.896 image AUROC).
        rectify_translated_source: whether HDR (Eq. 8-11) also runs once the source bank is translated from paired
            shots. Off by default (ours): the translated bank already lives in the target feature space, fitted on the
            very pairs Eq. 10 would approximate, and HDR's pull of each bank towards the other domain's partners then
            blurs the defects the translation keeps apart. Without pairs HDR runs as in the paper; with queries mapped
            into the source space (``translation_direction``) it never runs, the two banks then live in two spaces.
        source_fusion: how the source sub-hypergraph joins the target one: ``"auto"`` (the calibrated union for a
            translated source bank, Eq. 18-19 weighting otherwise), ``"union"`` or ``"weighted"``
            (:class:`~.scoring.CrossDomainScorer`).
        seed: seed of the adapters' and the HGNN's initialisation and of the Perlin draws (private generators).

    """

    # Checkpoints from before paired shots, the choices of views and pair registration: every shot view kept, source
    # bank not translated, test images read as they are, pairs read as captured.
    defaulted_state = ("shot_view_indices", "source_bank_translated", "test_view_indices", "pair_alignment")
    # (``query_translation``'s map is defaulted by SensorTranslation itself: empty, i.e. queries are not mapped.)

    def __init__(
        self,
        *,
        backbone: str = "vit_base_patch8_224.dino",
        layers: Sequence[str] | None = None,
        pretrained: bool = True,
        pretrained_weights: str | Path | None = None,
        model_kwargs: dict | None = None,
        perturbed_stages: Sequence[int] | None = None,
        noise_mean: float = 0.0,
        noise_std: float = 0.75,
        adapter_reduction: int = 4,
        num_neighbors: int = 10,
        incidence_kernel: str = "reciprocal",
        alpha: float = 0.3,
        dropout: float = 0.5,
        beta: float = 0.6,
        domain_weighting: DomainWeighting = "evidence",
        image_score: ImageScore = "top_mean",
        top_fraction: float = 0.01,
        shot_augmentation: ShotAugmentation = "auto",
        view_min_share: float = 0.25,
        test_views: TestViews = "auto",
        test_view_tolerance: float = 0.1,
        target_denoising: float | str = "auto",
        target_denoising_min_gain: float = 0.5,
        sigma: float = 4.0,
        chunk_size: int = 2048,
        search_backend: str = "exact",
        use_domain_perturbation: bool = True,
        use_rectification: bool = True,
        use_cross_domain_scoring: bool = True,
        use_paired_shots: bool = True,
        translation_ridge: Sequence[float] = DEFAULT_RIDGE_CANDIDATES,
        pair_registration: float = 1.0,
        translation_direction: TranslationDirection = "bank",
        rectify_translated_source: bool = False,
        source_fusion: SourceFusion = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not pair_registration >= 0:
            msg = f"pair_registration must be a non-negative number of patches, got {pair_registration!r}."
            raise ValueError(msg)
        if translation_direction not in get_args(TranslationDirection):
            msg = (
                f"translation_direction must be one of {get_args(TranslationDirection)}, got {translation_direction!r}."
            )
            raise ValueError(msg)
        if shot_augmentation not in get_args(ShotAugmentation):
            msg = f"shot_augmentation must be one of {get_args(ShotAugmentation)}, got {shot_augmentation!r}."
            raise ValueError(msg)
        if not 0.0 <= view_min_share <= 1.0:
            msg = f"view_min_share must be in [0, 1], got {view_min_share}."
            raise ValueError(msg)
        if test_views not in (True, False, "auto"):
            msg = f"test_views must be true, false or 'auto', got {test_views!r}."
            raise ValueError(msg)
        if test_view_tolerance < 0.0:
            msg = f"test_view_tolerance must be >= 0, got {test_view_tolerance}."
            raise ValueError(msg)
        if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 2:
            msg = f"num_neighbors must be an int >= 2 (a bank vertex's hyperedge holds itself), got {num_neighbors!r}."
            raise ValueError(msg)
        self.feature_extractor = PatchFeatureExtractor(
            backbone,
            layers,
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            model_kwargs=model_kwargs,
        )
        self.num_neighbors = num_neighbors
        self.shot_augmentation = shot_augmentation
        self.view_min_share = view_min_share
        self.test_views = test_views
        self.test_view_tolerance = test_view_tolerance
        self.denoiser = TargetDenoiser(target_denoising, target_denoising_min_gain)  # fit_target_denoising
        self.chunk_size = chunk_size
        self.seed = seed

        self.perturbation: DomainPerturbation | None = None
        if use_domain_perturbation:
            stages = (
                list(perturbed_stages)
                if perturbed_stages is not None
                else default_perturbed_stages(self.feature_extractor)
            )
            self.perturbation = DomainPerturbation(
                stage_channels=self.feature_extractor.stage_channels,
                perturbed_stages=stages,
                kind=self.feature_extractor.kind,
                num_prefix_tokens=getattr(self.feature_extractor, "num_prefix_tokens", 0),
                noise_mean=noise_mean,
                noise_std=noise_std,
                adapter_reduction=adapter_reduction,
                seed=seed,
            )
        self.rectifier: ResHGNN | None = None
        if use_rectification:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.rectifier = ResHGNN(self.feature_extractor.feature_dim, alpha=alpha, dropout=dropout)
        self.kernel = IncidenceKernel(incidence_kernel)
        self.scorer = CrossDomainScorer(
            beta=beta,
            domain_weighting=domain_weighting,
            image_score=image_score,
            top_fraction=top_fraction,
            sigma=sigma,
            enabled_cross_domain=use_cross_domain_scoring,
            source_fusion=source_fusion,
        )
        self.use_paired_shots = use_paired_shots
        self.rectify_translated_source = rectify_translated_source
        self.translation_direction = translation_direction
        self.pair_registration = float(pair_registration)
        self.translation = SensorTranslation(translation_ridge)  # source -> target ("bank")
        # target -> source ("query"); fitted only when queries are mapped, so its shape tells inference what to do.
        self.query_translation = SensorTranslation(translation_ridge)
        self.memory_bank = HypergraphMemoryBank(domains=(SOURCE, TARGET))
        # Views of a shot in the target bank (indices into dihedral_views); all candidates until choose_shot_views.
        self.register_buffer("shot_view_indices", torch.empty(0, dtype=torch.long))
        self.shot_view_indices: torch.Tensor
        # test_views="auto": the shot views when test images are read in them, else empty. Only its size is used (the
        # views read are shot_view_indices); it is fixed at fit time, so an export has no data-dependent branch.
        self.register_buffer("test_view_indices", torch.empty(0, dtype=torch.long))
        self.test_view_indices: torch.Tensor
        # Whether the memory bank's source rows live in the target feature space (translated from paired shots).
        self.register_buffer("source_bank_translated", torch.zeros((), dtype=torch.bool))
        self.source_bank_translated: torch.Tensor
        # Fit-time record of pair registration: row v is the offset and zoom (dy, dx, zoom) at which view v's paired
        # source captures were read (NaN: no pairs in that view; empty: pairs read as captured, or none). Inference
        # does not use it.
        self.register_buffer("pair_alignment", torch.empty(0, 3))
        self.pair_alignment: torch.Tensor
        # Derived search state per domain bank (plain objects, not in the state dict; rebuilt when a bank changes).
        self.search_backend = search_backend
        self._bank_indexes = {
            domain: BankIndex(search_backend, chunk_size=chunk_size, seed=seed) for domain in (SOURCE, TARGET)
        }

        # What inference needs after training, per domain; persistent so that checkpoints reproduce test scores.
        for domain in DOMAINS:
            self.register_buffer(f"rectified_{domain}", torch.empty(0, 0))
            self.register_buffer(f"hidden_{domain}", torch.empty(0, 0))
            self.register_buffer(f"degree_{domain}", torch.empty(0))
        self.rectified_source: torch.Tensor
        self.rectified_target: torch.Tensor

    @property
    def is_fitted(self) -> bool:
        """Whether the banks are built; a shape check, so that ``torch.export`` (ONNX) sees no data-dependent branch."""
        return self.rectified_target.shape[0] > 0

    def _domain_buffer(self, kind: str, domain: str) -> torch.Tensor:
        return getattr(self, f"{kind}_{domain}")

    def fitted_domains(self) -> list[str]:
        """Domains with a stored bank, in hypergraph vertex order (target first)."""
        return [domain for domain in DOMAINS if self._domain_buffer("rectified", domain).shape[0] > 0]

    # ----------------------------------------------------------------------------------------------- features
    def extract(self, images: torch.Tensor, *, perturb: bool = False) -> torch.Tensor:
        """Patch features (B, C, h, w) through the adapted backbone; ``perturb`` adds the DP noise (training only)."""
        if self.perturbation is None:
            return self.feature_extractor(images)
        return self.feature_extractor(images, stage_hook=self.perturbation.stage_hook(perturb=perturb, adapt=True))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Bank-ready patch descriptors (B*h*w, C) of images through the adapted, unperturbed backbone."""
        return flatten_patches(self.extract(images))

    def fit_target_denoising(self, statistics: NoiseStatistics | None) -> DenoisingReport | None:
        """Choose (``target_denoising="auto"``) or set the filter of target images; before the shots are embedded.

        Args:
            statistics: :class:`~.denoising.NoiseStatistics` of the target shots as they are (gathered from every
                rank); only ``"auto"`` needs them.

        Returns:
            How ``"auto"`` chose (None for a fixed blur).

        """
        return self.denoiser.fit(statistics)

    def candidate_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return every view of target shots that may enter the target bank (see ``shot_augmentation``), shot first."""
        return [images] if self.shot_augmentation == "none" else dihedral_views(images)

    def shot_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the views of target shots that enter the target bank: the kept ones once chosen, else every one."""
        views = self.candidate_views(images)
        if self.shot_view_indices.numel() == 0:
            return views
        return [views[index] for index in self.shot_view_indices.tolist() if index < len(views)]

    @torch.no_grad()
    def choose_shot_views(
        self, probe_views: Sequence[torch.Tensor], held_out: torch.Tensor, *, from_source: bool = True
    ) -> ViewReport:
        """Decide which views of the shots enter the target bank and whether test images are read in them.

        A view of a shot helps when the part's normal images really take that orientation, and hurts when they never
        do (a rotated texture with a direction then looks like a defect and hides real ones). The source domain has
        many normal images of the same parts, so it tells which: a few probe images are seen in every candidate view,
        and every patch of other, held-out source images is matched to its nearest neighbour among all of them. A
        view is kept when its share of those nearest neighbours is at least ``view_min_share`` times the share
        ``1 / V`` each of the ``V`` views would get if the part looked the same in all of them; the shot as it is
        (view 0) is always kept. ``"dihedral"`` and ``"none"`` keep every candidate view without looking; so does
        ``"auto"`` when there is nothing to judge by (fewer than two images), and the report's shares are then empty.

        Reading a test image in the kept views (``test_views="auto"``) needs more: a turned normal image must stay as
        close to the other normal images as it is unturned, since the source bank holds them only as they are. The
        same images measure it: the median distance of the probe patches to their nearest held-out patch, in each
        kept view against the probes as they are (:attr:`ViewReport.view_distance_ratio`); the views are read when
        its geometric mean over the kept views stays within ``1 + test_view_tolerance``. Without source images
        (``from_source=False``: a single-domain run judges the shot views on the shots themselves, one probe shot
        against at most a few others) that measure is too thin to go by, and ``"auto"`` reads test images as they are.

        Args:
            probe_views: per candidate view ``v``, the patch rows of the probe images seen in view ``v``.
            held_out: patch rows of held-out images, as they are.
            from_source: whether probe and held-out images are source images (else target shots).

        """
        num_views = len(probe_views)
        no_evidence = held_out.shape[0] == 0 or any(part.shape[0] == 0 for part in probe_views)
        shares: list[float] = []
        if self.shot_augmentation != "auto" or num_views <= 1 or no_evidence:
            kept = list(range(num_views)) if self.shot_augmentation != "none" else [0]
        else:
            rows = torch.cat(list(probe_views))
            view_of_row = torch.cat(
                [torch.full((part.shape[0],), index, dtype=torch.long) for index, part in enumerate(probe_views)]
            ).to(rows.device)
            _, nearest = chunked_knn(held_out, rows, 1, chunk_size=self.chunk_size)
            view_share = torch.bincount(view_of_row[nearest[:, 0]], minlength=num_views).float() / held_out.shape[0]
            threshold = self.view_min_share / num_views
            kept = [0, *(index for index in range(1, num_views) if float(view_share[index]) >= threshold)]
            shares = [round(float(share), 4) for share in view_share]
        self.shot_view_indices = torch.tensor(kept, dtype=torch.long, device=self.shot_view_indices.device)
        judged = from_source and not no_evidence and len(kept) > 1
        ratio = self._view_distance_ratio(probe_views, held_out, kept) if judged else None
        reads_views = ratio is not None and ratio <= 1.0 + self.test_view_tolerance
        self.test_view_indices = self.shot_view_indices.clone() if reads_views else self.shot_view_indices[:0].clone()
        return ViewReport(
            kept=kept,
            shares=shares,
            view_distance_ratio=None if ratio is None else round(ratio, 4),
            test_views=reads_views,
        )

    def _view_distance_ratio(
        self, probe_views: Sequence[torch.Tensor], held_out: torch.Tensor, kept: list[int]
    ) -> float:
        """Geometric mean over the kept views ``v > 0`` of median(probe-to-held-out distance in ``v``) / in view 0."""
        medians = torch.stack(
            [chunked_knn(probe_views[view], held_out, 1, chunk_size=self.chunk_size)[0][:, 0].median() for view in kept]
        )
        log_medians = medians.clamp_min(torch.finfo(medians.dtype).tiny).log()
        return float((log_medians[1:] - log_medians[0]).mean().exp())

    # ------------------------------------------------------------------------------------------------ stage 1
    def perturbation_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Stage 1 objective (Eq. 7): clean frozen-backbone features vs perturbed features through the adapters."""
        if self.perturbation is None:
            msg = "Domain perturbation is disabled (use_domain_perturbation=False): there is no stage-1 loss."
            raise RuntimeError(msg)
        with torch.no_grad():
            clean = self.feature_extractor(images)
        perturbed = self.extract(images, perturb=True)
        return perturbation_loss(clean, perturbed)  # Eq. 7

    def perturbation_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam over the adapters, the only parameters stage 1 trains (the paper gives no optimiser: our choice)."""
        if self.perturbation is None:
            msg = "Domain perturbation is disabled (use_domain_perturbation=False): there is nothing to optimise."
            raise RuntimeError(msg)
        return torch.optim.Adam(self.perturbation.parameters(), lr=lr)

    def perturbation_step(
        self,
        images: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """One stage-1 step on a batch of images: Eq. 7, backward, adapter update. Returns the (detached) loss.

        Args:
            images: pre-processed images (B, 3, H, W).
            optimizer: from :meth:`perturbation_optimizer`.
            backward: how to back-propagate (Lightning passes ``manual_backward``); default ``loss.backward()``.

        """
        optimizer.zero_grad()
        loss = self.perturbation_loss(images)  # Eq. 7
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        return loss.detach()

    def train_perturbation(
        self, batches: Callable[[], Iterable[torch.Tensor]], *, epochs: int, lr: float
    ) -> list[float]:
        """Stage 1 over ``epochs`` passes of ``batches()`` (a fresh iterable of image batches per epoch).

        The same :meth:`perturbation_step` the Lightning module calls once per training batch. Returns the losses.
        """
        optimizer = self.perturbation_optimizer(lr)
        was_training = self.training
        self.train()
        losses = [float(self.perturbation_step(images, optimizer)) for _ in range(epochs) for images in batches()]
        self.train(was_training)
        return losses

    # ---------------------------------------------------------------------------------------- banks, stage 2
    @property
    def rectification_possible(self) -> bool:
        """Whether HDR can run: switched on and both domains have a bank."""
        return self.rectifier is not None and self.memory_bank.has(SOURCE) and self.memory_bank.has(TARGET)

    def fit_banks(
        self,
        *,
        iterations: int,
        lr: float,
        on_iteration: Callable[[int, float], None] | None = None,
        pairs: PairedShots | None = None,
    ) -> BankReport:
        """Build the cross-domain hypergraph of the banks, run stage 2 (HDR) and store what inference needs.

        The memory bank must hold the target bank (and the source bank for two domains). With paired shots (and
        ``use_paired_shots``), the sensors are first bridged (:mod:`.sensor_map`): the source bank translated into the
        target feature space, or a map for the queries into the source space, and the units of the calibrated union
        measured on held-out pairs (:meth:`translate_source_bank`). Steps
        (Algorithm 1): one exact k-NN search over the joined banks (target rows first) gives every vertex's hyperedge;
        the kernel scale is fitted on those distances; with HDR (on a translated source bank only with
        ``rectify_translated_source``), pseudo features (Eq. 10) and ``iterations`` Adam steps on Eq. 11; every bank
        vertex is rectified by the inference operator and stored with its hidden state and degree; finally the fusion
        of the sub-hypergraphs (Eq. 18-19 weight, or the union's units) is fixed.

        Args:
            iterations: stage-2 iterations, epochsR (paper: 100).
            lr: Adam learning rate of the residual HGNN.
            on_iteration: called with ``(iteration, loss)`` after every stage-2 step.
            pairs: the shots' patch rows with their source captures' rows, in every candidate view (or None).

        """
        if not self.memory_bank.has(TARGET):
            msg = "fit_banks needs a target bank: fill memory_bank's 'target' domain first."
            raise RuntimeError(msg)
        translation, units, direction, evidence, alignment = None, None, None, {}, {}
        self.query_translation.clear()  # queries are mapped only when this fit chooses it
        if pairs is not None and self.use_paired_shots and self.memory_bank.has(SOURCE):
            translation, units, direction, evidence, alignment = self.translate_source_bank(pairs)
        domains = [domain for domain in DOMAINS if self.memory_bank.has(domain)]
        banks = [self.memory_bank.get(domain) for domain in domains]
        features = torch.cat(banks)
        sizes = [bank.shape[0] for bank in banks]
        with torch.no_grad():
            searches = self._search_banks(features, domains)
            member_distances, member_index = self._joint_members(searches, sizes)
            self.kernel.fit(member_distances[:, 1:])  # mean distance to the nearest other vertices
            hypergraph = bank_hypergraph(member_index, self.kernel(member_distances))
            degrees = hypergraph.vertex_degree().split(sizes)
            hyperedges = self._attached_hyperedges(searches, degrees)

        losses: list[float] = []
        fallback_share = float("nan")
        # HDR joins the banks in one hypergraph: never with mapped queries (the source bank keeps its own space).
        rectify = translation is None or (self.rectify_translated_source and direction == "bank")
        if self.rectification_possible and rectify:
            assert self.rectifier is not None
            domain = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
            domain[: sizes[0]] = 1  # target rows first
            pseudo = pseudo_features(features, domain, hypergraph, chunk_size=self.chunk_size)  # Eq. 10
            fallback_share = float(pseudo.used_fallback.float().mean())
            losses = train_rectifier(
                self.rectifier,
                banks,
                hyperedges,
                pseudo.features,
                iterations=iterations,
                lr=lr,
                seed=self.seed,
                on_iteration=on_iteration,
            )
            with torch.no_grad():
                rectified, hidden = self.rectifier.rectify_bank(banks, hyperedges)  # Eq. 9, inference operator
        else:
            rectified, hidden = features, features.new_empty(features.shape[0], 0)
        for domain, part, part_hidden, part_degree in zip(
            domains, rectified.split(sizes), hidden.split(sizes), degrees, strict=True
        ):
            setattr(self, f"rectified_{domain}", part.detach().clone())
            setattr(self, f"hidden_{domain}", part_hidden.detach().clone())
            setattr(self, f"degree_{domain}", part_degree.detach().clone())
        for domain in set(DOMAINS) - set(domains):
            setattr(self, f"rectified_{domain}", features.new_empty(0, 0))
            setattr(self, f"hidden_{domain}", features.new_empty(0, 0))
            setattr(self, f"degree_{domain}", features.new_empty(0))
        fusion = self.scorer.fit(
            self.cross_domain_connectivity(), translated_source=translation is not None, units=units
        )
        return BankReport(
            target_rows=sizes[0],
            source_rows=sizes[1] if len(sizes) > 1 else 0,
            kernel_scale=float(self.kernel.scale),
            source_weight=float(self.scorer.source_weight),
            fallback_share=fallback_share,
            losses=losses,
            fusion=fusion,
            translation=translation,
            units=units if fusion == "union" else None,
            direction=direction,
            direction_evidence=evidence,
            pair_alignment=alignment,
        )

    @torch.no_grad()
    def translate_source_bank(
        self, pairs: PairedShots
    ) -> tuple[TranslationReport, tuple[float, float], str, dict[str, float], dict[int, tuple[float, float, float]]]:
        """Bridge the two sensors with a map learnt on the paired shots, in the direction that fits them (ours).

        First, when the pairs are whole feature grids, each view's source grids are lined up with the shots' grids
        (``pair_registration``, :func:`~.sensor_map.register_pairs`). Two directions can make the source bank judge
        target patches (:mod:`.sensor_map`): ``"bank"`` translates the
        source bank into the target feature space (source -> target map), ``"query"`` maps each query patch into the
        source feature space (target -> source map) and compares it with the source bank as captured. Each map is a
        ridge regression fitted on every paired row, its strength chosen by cross-validation over groups of pairs
        (the shots, or with a single shot its views).

        The same groups give held-out evidence: each group of target rows (in the views the target bank keeps) is held
        out in turn and matched against the rest of the target bank (the target unit), against the source bank
        translated by the source -> target map fitted without it (``"bank"``), and, mapped by the target -> source
        map fitted without it, against the source bank as captured (``"query"``). The medians of those distances are
        the units of the calibrated union (:class:`~.scoring.CrossDomainScorer`). ``translation_direction="auto"``
        takes the direction with the smaller median: the one in which normal target patches find their source
        evidence more tightly (a sensor that loses detail maps poorly onto the source; one that keeps it maps well).
        Both medians are distances between features of the same adapted backbone, so they share one scale. Without a
        second group there is no held-out evidence: the units are equal and ``"auto"`` takes ``"bank"``. The
        evidence is measured on the features as extracted (before HDR, which a translated bank skips by default).

        Returns:
            The report of the map used, the units ``(target, source)``, the direction and its evidence (held-out
            median per direction measured; empty without a second group), and the offset and zoom of each view's pairs.

        """
        if bool(self.source_bank_translated):
            msg = "The source bank is already translated into the target feature space; refill the banks first."
            raise RuntimeError(msg)
        shots = torch.unique(pairs.shot)
        groups = pairs.shot if len(shots) > 1 else pairs.view
        source = self.memory_bank.get(SOURCE)
        kept = (
            torch.isin(pairs.view, self.shot_view_indices.to(pairs.view.device))
            if self.shot_view_indices.numel()
            else torch.ones_like(pairs.view, dtype=torch.bool)
        )
        paired_source, alignment = pairs.source, {}
        if self.pair_registration > 0 and pairs.grid is not None:
            paired_source, per_view = register_pairs(
                pairs.source,
                pairs.target,
                pairs.view,
                pairs.grid,
                max_offset=self.pair_registration,
                ridge=self.translation.middle_ridge,
            )
            alignment = {view: read.as_tuple() for view, read in per_view.items()}
            recorded = torch.full((max(alignment, default=-1) + 1, 3), float("nan"), device=self.pair_alignment.device)
            for view, read in alignment.items():
                recorded[view] = torch.tensor(read)
            self.pair_alignment = recorded
        candidates = ("bank", "query") if self.translation_direction == "auto" else (self.translation_direction,)
        maps = {"bank": self.translation, "query": self.query_translation}
        inputs_outputs = {"bank": (paired_source, pairs.target), "query": (pairs.target, paired_source)}
        reports = {direction: maps[direction].fit(*inputs_outputs[direction], groups) for direction in candidates}
        target_distances: list[torch.Tensor] = []
        held_out_distances: dict[str, list[torch.Tensor]] = {direction: [] for direction in candidates}
        for label in torch.unique(groups).tolist():
            held_out, rest = kept & (groups == label), kept & (groups != label)
            if not held_out.any() or not rest.any():
                continue
            queries = pairs.target[held_out]
            target_distances.append(self._nearest(queries, pairs.target[rest]))
            for direction in candidates:
                weight, bias = reports[direction].held_out_maps[label]
                weight, bias = weight.to(source.device), bias.to(source.device)
                if direction == "bank":
                    distance = self._nearest(queries, torch.addmm(bias, source, weight))
                else:
                    distance = self._nearest(torch.addmm(bias, queries, weight), source)
                held_out_distances[direction].append(distance)
        evidence: dict[str, float] = {}
        units = (1.0, 1.0)
        direction = candidates[0]
        if target_distances:
            evidence = {name: float(torch.cat(values).median()) for name, values in held_out_distances.items()}
            direction = min(evidence, key=evidence.__getitem__)  # "auto": the direction that fits held-out pairs
            units = (float(torch.cat(target_distances).median()), evidence[direction])
        for other in set(maps) - {direction}:
            maps[other].clear()  # only the map of the direction used is state
        if direction == "bank":
            self.memory_bank.set(SOURCE, self.translation(source))
            self.source_bank_translated = torch.ones((), dtype=torch.bool, device=self.source_bank_translated.device)
        return reports[direction], units, direction, evidence, alignment

    def _nearest(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Distance of every query row to its nearest bank row (exact, chunked)."""
        return chunked_knn(queries, bank, 1, chunk_size=self.chunk_size)[0][:, 0]

    @torch.no_grad()
    def cross_domain_connectivity(self) -> float | None:
        """Share of stored target vertices with a source vertex among their K nearest stored bank vertices.

        Measured on the stored (rectified) banks, i.e. on the hypergraph that queries meet at inference. None without a
        source bank. It is the evidence behind the source weight of Eq. 18-19 (see :mod:`.scoring`).
        """
        if self.rectified_source.shape[0] == 0:
            return None
        joined = torch.cat([self.rectified_target, self.rectified_source])
        _, neighbours = chunked_knn(
            self.rectified_target, joined, min(self.num_neighbors, joined.shape[0]), chunk_size=self.chunk_size
        )
        return float((neighbours >= self.rectified_target.shape[0]).any(dim=1).float().mean())

    # -------------------------------------------------------------------------------------------- inference
    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training mode: patch features (B, C, h, w). Eval mode: image scores and anomaly maps (Eq. 18-19)."""
        if self.training:
            return self.extract(images)
        if not self.is_fitted:
            msg = (
                "HyperTrans has no memory bank yet: train it first (anomalib train/fit, or Engine.fit) "
                "or load a trained checkpoint."
            )
            raise RuntimeError(msg)
        images = self.denoiser(images)  # the target sensor's images as the shots were banked
        if not self.reads_test_views:
            return self.score_features(self.extract(images), tuple(images.shape[-2:]))
        return self.score_grids(self.view_averaged_distances(images), tuple(images.shape[-2:]))

    @property
    def reads_test_views(self) -> bool:
        """Whether test images are read in views (``test_views``).

        Under ``"auto"`` a size check on the fit-time choice, so that an export has no data-dependent branch.
        """
        if self.test_views == "auto":
            return self.test_view_indices.numel() > 0
        return bool(self.test_views)

    def view_averaged_distances(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per fitted domain, nearest distances ``(B, h, w)`` averaged over the images' read views (``test_views``).

        Each view's distance grid is turned back into the image's orientation before averaging, so a patch's value is
        the mean over the readings of the same spot. The views read are those kept for the shots
        (``shot_view_indices``; none chosen yet: all), whatever ``test_views`` says about reading them at all. Views not
        read are skipped; an export reads every candidate view and weights it by whether it is read, so the
        graph has no branch on the stored choice.
        """
        candidates = self.candidate_views(images)
        square = images.shape[-1] == images.shape[-2]
        kept = torch.ones(len(candidates), device=images.device)
        views = self.shot_view_indices
        if views.numel() > 0:  # a comparison, not index_fill_ (whose ONNX lowering logs an ambiguous attribute)
            candidate_index = torch.arange(len(candidates), device=views.device)
            kept = (candidate_index[:, None] == views[None, :]).any(dim=1).to(kept)
        total: dict[str, torch.Tensor] = {}
        exporting = torch.compiler.is_exporting()
        for index, view in enumerate(candidates):
            if not exporting and not bool(kept[index]):
                continue
            features = self.extract(view)
            batch_size, _, height, width = features.shape
            for domain, distances in self.nearest_distances(flatten_patches(features)).items():
                grid = kept[index] * undo_dihedral_view(
                    distances.reshape(batch_size, height, width), index, square=square
                )
                total[domain] = grid if domain not in total else total[domain] + grid
        return {domain: grid / kept.sum() for domain, grid in total.items()}

    def nearest_distances(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per fitted domain, the distance of every query patch row to its best-matching stored bank vertex.

        One k-NN search per domain bank on the raw (adapted) features; with HDR the query rows are rectified on the
        union of those candidates (their K nearest bank vertices overall) and each domain's best match is re-ranked
        among its K raw candidates by the rectified distance. When paired shots chose the ``"query"`` direction, the
        source bank is searched with the query rows mapped into the source feature space (never rectified).
        """
        domains = self.fitted_domains()
        if self.query_translation.is_fitted:  # paired shots, "query" direction (a shape check: no branch on data)
            searches = self._search_banks(patches, [TARGET]) + self._search_banks(
                self.query_translation(patches), [SOURCE]
            )
            return {domain: distances[:, 0] for domain, (distances, _) in zip(domains, searches, strict=True)}
        searches = self._search_banks(patches, domains)
        if self.rectifier is None or self._domain_buffer("hidden", TARGET).shape[-1] == 0:
            return {domain: distances[:, 0] for domain, (distances, _) in zip(domains, searches, strict=True)}
        hyperedges = self._attached_hyperedges(searches, [self._domain_buffer("degree", domain) for domain in domains])
        rectified = self.rectifier(
            patches,
            hyperedges,
            [self.memory_bank.get(domain) for domain in domains],
            [self._domain_buffer("hidden", domain) for domain in domains],
        )  # Eq. 9, query rows
        return {
            domain: torch.linalg.vector_norm(
                rectified[:, None, :] - self._domain_buffer("rectified", domain)[index], dim=-1
            ).amin(dim=1)
            for domain, (_, index) in zip(domains, searches, strict=True)
        }

    def _search_banks(self, rows: torch.Tensor, domains: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per domain, exact distances (ascending) and indices of the nearest raw bank rows of every row.

        The search goes through the domain's :class:`BankIndex` (``search_backend``); with an approximate backend the
        rows found may miss some of the true nearest, their distances are still exact.

        ``num_neighbors + SHORTLIST_MARGIN`` rows are kept: the search ranks candidates by a fast expansion of the
        squared distance and then recomputes exact distances, so taking the K nearest from a slightly longer exact list
        makes the choice immune to rounding (a query equal to a bank vertex gets exactly that vertex's hyperedge).
        """
        searches = []
        for domain in domains:
            bank = self.memory_bank.get(domain)
            k = min(self.num_neighbors + SHORTLIST_MARGIN, bank.shape[0])
            index = self._bank_indexes[domain]
            searches.append(index.search(rows, bank, k, squared_norm=self.memory_bank.squared_norm(domain)))
        return searches

    def _joint_nearest(
        self, searches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the per-domain candidate distances side by side ``(Q, sum of k)`` and where the K nearest are."""
        distances = torch.cat([d for d, _ in searches], dim=1)
        _, position = torch.topk(distances, min(self.num_neighbors, distances.shape[1]), dim=1, largest=False)
        return distances, position

    def _joint_members(
        self, searches: Sequence[tuple[torch.Tensor, torch.Tensor]], sizes: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the K nearest rows over all domains: distances and indices into the concatenated banks, (Q, K)."""
        offsets = [sum(sizes[:position]) for position in range(len(sizes))]
        distances, position = self._joint_nearest(searches)
        index = torch.cat([i + offset for (_, i), offset in zip(searches, offsets, strict=True)], dim=1)
        return torch.gather(distances, 1, position), torch.gather(index, 1, position)

    def _attached_hyperedges(
        self, searches: Sequence[tuple[torch.Tensor, torch.Tensor]], degrees: Sequence[torch.Tensor]
    ) -> AttachedHyperedges:
        """Attached hyperedge of every searched row: its K nearest bank vertices over all domains (Eq. 8 rows)."""
        distances, position = self._joint_nearest(searches)
        chosen = torch.zeros_like(distances).scatter_(1, position, 1.0)
        incidence = (self.kernel(distances) * chosen).split([d.shape[1] for d, _ in searches], dim=1)
        return AttachedHyperedges.from_neighbours([i for _, i in searches], list(incidence), list(degrees))

    def score_against_bank(self, images: torch.Tensor, bank: torch.Tensor) -> InferenceBatch:
        """Target-only nearest-neighbour scores against a given bank, without rectification.

        For progress checks before the banks are built (validation during stage 1, against the embedded shots). The
        bank is small and new at every call, so it is searched exactly whatever ``search_backend`` is.
        """
        features = self.extract(self.denoiser(images))
        batch_size, _, height, width = features.shape
        distances, _ = chunked_knn(flatten_patches(features), bank, 1, chunk_size=self.chunk_size)
        pred_score, anomaly_map = self.scorer(
            distances[:, 0].reshape(batch_size, height, width), None, self.kernel, tuple(images.shape[-2:])
        )
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def score_features(self, features: torch.Tensor, image_size: tuple[int, int]) -> InferenceBatch:
        """Cross-domain scores of extracted patch features (B, C, h, w) against the stored banks, maps at image size."""
        batch_size, _, height, width = features.shape
        distances = self.nearest_distances(flatten_patches(features))
        return self.score_grids(
            {domain: value.reshape(batch_size, height, width) for domain, value in distances.items()}, image_size
        )

    def score_grids(self, grids: dict[str, torch.Tensor], image_size: tuple[int, int]) -> InferenceBatch:
        """Cross-domain scores from per-domain nearest distances ``(B, h, w)``, maps at image size (Eq. 18-19)."""
        pred_score, anomaly_map = self.scorer(grids[TARGET], grids.get(SOURCE), self.kernel, image_size)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """Return the eight dihedral views of square images, or the four that keep the shape of non-square ones.

    Square: rotations by 0/90/180/270 degrees, then the same of the mirror image. Non-square: identity, horizontal and
    vertical mirror, half turn.
    """
    if images.shape[-1] != images.shape[-2]:
        return [images, images.flip(-1), images.flip(-2), images.flip(-2, -1)]
    mirrored = images.flip(-1)
    return [torch.rot90(view, turns, dims=(-2, -1)) for view in (images, mirrored) for turns in range(4)]


def undo_dihedral_view(grid: torch.Tensor, index: int, *, square: bool = True) -> torch.Tensor:
    """Map a grid ``(..., h, w)`` computed on view ``index`` of :func:`dihedral_views` back onto the original image.

    ``square``: whether the views were taken of square images (eight views) or not (four mirror views).
    """
    if not square:
        mirrored_dims = ((), (-1,), (-2,), (-2, -1))[index]  # each mirror is its own inverse
        return grid.flip(mirrored_dims) if mirrored_dims else grid
    restored = torch.rot90(grid, -(index % 4), dims=(-2, -1))
    return restored.flip(-1) if index >= 4 else restored


def image_key(path: str | Path, root: str | Path | None = None) -> int:
    """Stable 44-bit key of an image path (a SHA-1 prefix): the same on every rank, run, machine and folder.

    ``root`` (the data set's folder, :func:`image_root`): the key hashes the path relative to it, so the same data set
    gives the same keys wherever it lies, and with them the same view probes (:func:`view_probe_split`). Without a
    root the whole path string is hashed.
    """
    relative = Path(os.path.relpath(path, root)).as_posix() if root is not None else str(path)
    return int(hashlib.sha1(relative.encode()).hexdigest()[:11], 16)


def image_root(paths: Iterable[str | Path]) -> str | None:
    """Return the deepest folder holding all ``paths`` (None without paths): the root of :func:`image_key`."""
    folders = [os.path.dirname(os.path.abspath(path)) for path in paths]
    return os.path.commonpath(folders) if folders else None


def view_probe_split(keys: Sequence[int]) -> tuple[list[int], list[int]]:
    """Positions of the probe images and of the held-out images for :meth:`HyperTransModel.choose_shot_views`.

    The images are ordered by key (:func:`image_key` relative to the data set's root, a hash, so the order is an
    arbitrary but fixed sample that does not depend on where the data set lies): the first
    :data:`VIEW_PROBE_IMAGES` are the probes, the next :data:`VIEW_HELD_OUT_IMAGES` are held out. With fewer than two
    images there is nothing to hold out (both lists may be short or empty).
    """
    order = sorted(range(len(keys)), key=lambda position: keys[position])
    if len(order) < 2:
        return [], []
    probes = min(VIEW_PROBE_IMAGES, len(order) - 1)
    return order[:probes], order[probes : probes + VIEW_HELD_OUT_IMAGES]


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) patch grid -> (B*h*w, C) rows in row-major patch order."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def default_perturbed_stages(extractor: PatchFeatureExtractor) -> list[int]:
    """Stages followed by perturbation when the user does not choose (see ``HyperTransModel.perturbed_stages``)."""
    if extractor.kind == "vit":
        first = max(min(2, extractor.num_stages - 2), 0)
        return list(range(first, max(extractor.num_stages - 2, first + 1)))
    last_feature_stage = max(extractor.stage_names.index(layer) for layer in extractor.layers)
    return list(range(1, max(last_feature_stage, 2)))
