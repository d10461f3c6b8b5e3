"""Per-image inference time of HyperTrans next to anomalib's PatchCore, same backbone, resolution and bank rows.

Both run the EfficientNet-Lite0 backbone (blocks.2 + blocks.4, real offline weights) on 256 px images, batch 1, in
eval mode, with memory banks of the same total number of rows. PatchCore's bank holds all rows; HyperTrans splits them
into a target bank (one shot in its eight dihedral views: 8 x 1024 rows, the default) and a source bank (the rest),
with the default configuration (adapters, rectification, cross-domain scoring). Bank rows are drawn from real Lite0
patch features of bottle images with small seeded noise (so no two rows coincide); only time is measured here.

    python benchmarks/speed.py            # 10k and 100k rows
    python benchmarks/speed.py --rows 10000 50000 --repeats 30

Prints the median milliseconds per image over ``--repeats`` images after ``--warmup`` images; the two models
alternate image by image.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from PIL import Image

from anomalib_hypergraph.backbones import backbone_normalization
from anomalib_hypergraph.backbones.efficientnet_lite import efficientnet_lite_state_dict
from anomalib_hypergraph.data.domains import SOURCE, TARGET
from anomalib_hypergraph.models.hypertrans.torch_model import HyperTransModel

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")
IMAGE_SIZE = 256
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARGET_ROWS = 8 * 1024  # one shot, eight views, 32 x 32 patches


def images(count: int) -> torch.Tensor:
    """Normalised bottle test images (or seeded random images when the data set is absent)."""
    mean, std = backbone_normalization(BACKBONE)
    paths = sorted((SHARED_DATA / "mvtec_ad" / "bottle" / "test").glob("*/*.png"))[:count]
    if len(paths) < count:
        batch = torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    else:
        arrays = [np.asarray(Image.open(p).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))) for p in paths]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def bank_rows(model: HyperTransModel, count: int, pool: torch.Tensor) -> torch.Tensor:
    """``count`` rows from real patch features of ``pool``, repeated with seeded noise."""
    with torch.no_grad():
        features = torch.cat([model.embed(pool[i : i + 4]) for i in range(0, len(pool), 4)])
    generator = torch.Generator().manual_seed(1)
    index = torch.randint(0, features.shape[0], (count,), generator=generator)
    return features[index] + 0.05 * torch.randn(count, features.shape[1], generator=generator)


def per_image_ms(
    forwards: Sequence[Callable[[torch.Tensor], object]], inputs: torch.Tensor, warmup: int
) -> list[float]:
    """Median ms per image of each forward; the forwards alternate image by image, so that a load change on the
    machine hits both alike."""
    timings: list[list[float]] = [[] for _ in forwards]
    with torch.no_grad():
        for index in range(inputs.shape[0]):
            for forward, times in zip(forwards, timings, strict=True):
                started = time.perf_counter()
                forward(inputs[index : index + 1])
                if index >= warmup:
                    times.append((time.perf_counter() - started) * 1000)
    return [statistics.median(times) for times in timings]


def patchcore_model(bank: torch.Tensor) -> PatchcoreModel:
    model = PatchcoreModel(backbone=BACKBONE, layers=list(LAYERS), pre_trained=False)
    weights = efficientnet_lite_state_dict(0)
    extractor = model.feature_extractor.feature_extractor
    extractor.load_state_dict({k: v for k, v in weights.items() if k in extractor.state_dict()}, strict=True)
    model.memory_bank = bank
    return model.eval()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = images(args.warmup + args.repeats)

    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads")
    print(f"{BACKBONE} {list(LAYERS)} at {IMAGE_SIZE} px, batch 1, median of {args.repeats} images\n")
    print("| bank rows | PatchCore ms/image | HyperTrans ms/image | ratio |")
    print("|---:|---:|---:|---:|")
    for rows in args.rows:
        model = HyperTransModel(backbone=BACKBONE, layers=LAYERS, seed=0).eval()
        all_rows = bank_rows(model, rows, inputs[: args.warmup])
        target_rows = min(TARGET_ROWS, rows // 2)
        model.memory_bank.set(TARGET, all_rows[:target_rows])
        model.memory_bank.set(SOURCE, all_rows[target_rows:])
        model.fit_banks(iterations=1, lr=1e-3)
        model.eval()
        ours, theirs = per_image_ms([model, patchcore_model(all_rows)], inputs, args.warmup)
        print(f"| {rows} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
