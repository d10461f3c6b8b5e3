"""Inference speed of H2VLR next to anomalib's WinClip: same backbone, resolution, shots and images.

Both models run as plain torch modules (no pre/post-processing, no data loading) under ``torch.inference_mode`` on
the same pre-resized images, with the same k reference shots. Weights are random (timing does not depend on them),
so nothing is downloaded: WinClip's module-level ``PRETRAINED`` tag is set to None before it is built, which makes
anomalib's own ``open_clip.create_model_and_transforms`` call build random weights offline (anomalib is not edited).
WinClip gets CLIP-normalised images (what its pre-processor feeds it); H2VLR gets [0, 1] images and normalises
itself, inside the timed call.

    python benchmarks/h2vlr_speed.py                       # ViT-B-16-plus-240, 240 px, shots 1 2 4
    python benchmarks/h2vlr_speed.py --shots 1 --images 8  # quicker

Images: the MVTec AD bottle test images under ../shared/data/mvtec_ad when present, random images otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torchvision.io import ImageReadMode, read_image

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

DEFAULT_DATA = REPOSITORY.parent / "shared" / "data" / "mvtec_ad" / "bottle"


def load_images(folder: Path, count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return (support candidates, query images) in [0, 1] at ``size``, and where they came from."""
    train = sorted((folder / "train" / "good").glob("*.png"))
    test = sorted((folder / "test").rglob("*.png"))
    if train and test:

        def read(paths: list[Path]) -> torch.Tensor:
            images = [read_image(str(path), mode=ImageReadMode.RGB).float() / 255 for path in paths]
            return F.interpolate(torch.stack(images), size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)

        step = max(len(test) // count, 1)
        return read(train[:4]), read(test[::step][:count]), f"MVTec AD bottle ({folder})"
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.rand(4, 3, size, size, generator=generator),
        torch.rand(count, 3, size, size, generator=generator),
        "random images",
    )


def images_per_second(model: torch.nn.Module, images: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Throughput over ``repeats`` passes through all images in batches, after one warm-up batch."""
    with torch.inference_mode():
        model(images[:batch_size])
        start = time.perf_counter()
        for _ in range(repeats):
            for offset in range(0, images.shape[0], batch_size):
                model(images[offset : offset + batch_size])
        elapsed = time.perf_counter() - start
    return repeats * images.shape[0] / elapsed


def build_winclip(backbone: str, class_name: str, references: torch.Tensor) -> torch.nn.Module:
    """anomalib's WinClipModel with random weights (PRETRAINED=None) and the given backbone, offline."""
    from anomalib.models.image.winclip import torch_model as winclip

    winclip.PRETRAINED = None  # open_clip.create_model_and_transforms(..., pretrained=None): random, no download
    winclip.BACKBONE = backbone
    model = winclip.WinClipModel(class_name=class_name, reference_images=references, scales=(2, 3))
    return model.eval()


def build_h2vlr(backbone: str, class_name: str, shots: torch.Tensor, **options: object) -> torch.nn.Module:
    """H2VLR's torch model with random weights and the support set stored (untrained parameters time the same)."""
    from anomalib_hypergraph.models import H2VLRModel

    model = H2VLRModel(backbone=backbone, pretrained=False, class_name=class_name, **options)
    model.set_support(shots)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-16-plus-240")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=16, help="query images per measurement")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--class-name", default="bottle")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import open_clip

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = open_clip.get_model_config(args.backbone)
    if config is None:
        parser.error(f"unknown open_clip architecture {args.backbone!r}")
    size = int(config["vision_cfg"]["image_size"])
    support_pool, queries, source = load_images(args.data, args.images, size, args.seed)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    rows = []
    for shots in args.shots:
        support = support_pool[:shots]
        winclip = build_winclip(args.backbone, args.class_name, (support - mean) / std)
        rows.append(
            ("WinClip", shots, images_per_second(winclip, (queries - mean) / std, args.batch_size, args.repeats))
        )
        del winclip
        h2vlr = build_h2vlr(args.backbone, args.class_name, support)
        rows.append(("H2VLR", shots, images_per_second(h2vlr, queries, args.batch_size, args.repeats)))
        del h2vlr

    print(f"\nInference speed, {args.backbone} at {size} px, random weights, {queries.shape[0]} query images: {source}")
    print(f"batch size {args.batch_size}, {args.threads} threads, {args.repeats} pass(es) after one warm-up batch\n")
    print("| model | shots | images/s | ms/image | speed-up vs WinClip |")
    print("|---|---|---|---|---|")
    winclip_speed = {shots: speed for name, shots, speed in rows if name == "WinClip"}
    for name, shots, speed in rows:
        ratio = speed / winclip_speed[shots]
        print(f"| {name} | {shots} | {speed:.2f} | {1000 / speed:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
