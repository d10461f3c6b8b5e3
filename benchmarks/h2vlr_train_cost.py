"""What a full H2VLR train + test costs on MVTec AD bottle: seconds per epoch, fit time, test images/s, parameters.

Each shot count runs in its own process (``--worker``), as ``Engine.fit`` then ``Engine.test`` with
``H2VLR(k_shot=k)`` on ``MVTecAD(category="bottle")`` (validation once, after the last epoch). Random CLIP weights by
default (nothing to download): the AUROC columns are then *not* H2VLR's accuracy, only a check that the run is whole;
``--pretrained-weights <file>`` uses a local OpenCLIP state dict instead.

    python benchmarks/h2vlr_train_cost.py                  # 1, 2 and 4 shots, 100 epochs, 1 thread
    python benchmarks/h2vlr_train_cost.py --shots 1 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPOSITORY.parent / "shared" / "data" / "mvtec_ad"


def run_one(args: argparse.Namespace) -> dict:
    """Train and test once; return the timings and metrics."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import Callback

    from anomalib_hypergraph.models import H2VLR

    class Timer(Callback):
        def __init__(self) -> None:
            self.epochs: list[float] = []
            self.test_images = 0
            self.test_seconds = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._started = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.epochs.append(time.perf_counter() - self._started)

        def on_test_start(self, trainer, pl_module) -> None:
            self._test_started = time.perf_counter()

        def on_test_batch_end(  # noqa: PLR0917 - Lightning's signature
            self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
        ) -> None:
            self.test_images += len(batch.image)

        def on_test_end(self, trainer, pl_module) -> None:
            self.test_seconds = time.perf_counter() - self._test_started

    torch.set_num_threads(args.threads)
    weights = {"pretrained_weights": args.pretrained_weights} if args.pretrained_weights else {"pretrained": False}
    model = H2VLR(k_shot=args.worker, epochs=args.epochs, seed=args.seed, **weights)
    learnable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    data = MVTecAD(root=args.root, category="bottle", train_batch_size=8, eval_batch_size=8, num_workers=0)
    timer = Timer()
    with tempfile.TemporaryDirectory() as output:
        engine = Engine(
            default_root_dir=output,
            callbacks=[timer],
            max_epochs=args.epochs,
            check_val_every_n_epoch=args.epochs,
            num_sanity_val_steps=0,
            logger=False,
            enable_progress_bar=False,
            accelerator="cpu",
        )
        started = time.perf_counter()
        engine.fit(model=model, datamodule=data)
        fit_seconds = time.perf_counter() - started
        metrics = engine.test(model=model, datamodule=data)[0]
    return {
        "shots": args.worker,
        "learnable": learnable,
        "median_epoch": statistics.median(timer.epochs),  # validation runs once, inside the last epoch
        "fit": fit_seconds,
        "images_per_second": timer.test_images / timer.test_seconds,
        "image_AUROC": metrics["image_AUROC"],
        "pixel_AUROC": metrics["pixel_AUROC"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--pretrained-weights", type=Path, default=None)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    weights = f"weights {args.pretrained_weights}" if args.pretrained_weights else "random CLIP weights"
    print(f"H2VLR on MVTec AD bottle, {args.epochs} epochs, {args.threads} thread(s), seed {args.seed}, {weights}\n")
    print("| shots | median s/epoch | fit (s) | test images/s | learnable params | image / pixel AUROC |")
    print("|---:|---:|---:|---:|---:|---|")
    for shots in args.shots:
        command = [sys.executable, __file__, "--worker", str(shots), "--epochs", str(args.epochs)]
        command += ["--threads", str(args.threads), "--seed", str(args.seed), "--root", str(args.root)]
        if args.pretrained_weights:
            command += ["--pretrained-weights", str(args.pretrained_weights)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
        print(
            f"| {shots} | {result['median_epoch']:.2f} | {result['fit']:.0f} | {result['images_per_second']:.2f} | "
            f"{result['learnable']:,} | {result['image_AUROC']:.3f} / {result['pixel_AUROC']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
