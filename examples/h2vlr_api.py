"""H2VLR through anomalib's Python API: k-shot training on MVTec AD, testing, prediction and ONNX export.

Run from the repository root (MVTec AD under ./datasets/MVTecAD, or pass --root):
    python examples/h2vlr_api.py --k-shot 1
    python examples/h2vlr_api.py --pretrained-weights /path/to/ViT-B-16-plus-240.pt   # no hub access
    python examples/h2vlr_api.py --random-weights --epochs 2                          # a quick dry run, no weights
"""

import argparse
from pathlib import Path

from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine

from anomalib_hypergraph.models import H2VLR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("datasets/MVTecAD"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--pretrained-weights", type=Path, default=None, help="local state dict of the CLIP model")
    parser.add_argument("--random-weights", action="store_true", help="random CLIP weights (timing, dry runs)")
    args = parser.parse_args()

    datamodule = MVTecAD(root=args.root, category=args.category, num_workers=0)
    # k seeded shots from the training set (their paths are logged); the prompts name the category.
    model = H2VLR(
        k_shot=args.k_shot,
        epochs=args.epochs,
        pretrained=not args.random_weights,
        pretrained_weights=args.pretrained_weights,
    )
    engine = Engine(
        default_root_dir="results/h2vlr_api",
        max_epochs=args.epochs,
        check_val_every_n_epoch=args.epochs,  # validation only feeds normalisation/thresholds: once, at the end
        num_sanity_val_steps=0,
    )
    engine.fit(model=model, datamodule=datamodule)
    print("support shots:", model.shots)
    print("learnable parameters:", model.model.num_learnable_parameters())
    (metrics,) = engine.test(model=model, datamodule=datamodule)
    print({name: round(float(value), 4) for name, value in metrics.items()})

    checkpoint = (
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    defects = sorted((args.root / args.category / "test").iterdir())[0]
    predictions = engine.predict(model=model, data_path=defects, ckpt_path=checkpoint)
    for batch in predictions[:2]:
        print(batch.image_path[0], float(batch.pred_score[0]))

    # Into this run's own (versioned) folder: an export never replaces an earlier one, so a fixed folder would refuse
    # the second run of this script.
    onnx_file = engine.export(model=model, export_type=ExportType.ONNX, export_root=engine.trainer.default_root_dir)
    print("ONNX model:", onnx_file)


if __name__ == "__main__":
    main()
