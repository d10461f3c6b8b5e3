"""HyperTrans through anomalib's Python API: cross-domain 1-shot on the built-in synthetic data, then prediction.

Run from the repository root after `pip install -e ".[weights]"`:
    python examples/hypertrans_api.py
"""

from pathlib import Path

from anomalib.engine import Engine

from anomalib_hypergraph.data import SYNTHETIC_CATEGORIES, MVTec3DCrossDomain, generate_synthetic_mvtec3d
from anomalib_hypergraph.models import HyperTrans


def main() -> None:
    root = generate_synthetic_mvtec3d("datasets/hypergraph_synthetic", seed=0)
    datamodule = MVTec3DCrossDomain(root=root, category=SYNTHETIC_CATEGORIES[0], k_shot=1, seed=0, num_workers=0)

    # The offline backbone; for the paper's DINO ViT-B/8 use backbone="vit_base_patch8_224.dino" and, without hub
    # access, pretrained_weights="/path/to/vit_base_patch8_224.dino.pth".
    model = HyperTrans(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"))

    engine = Engine(default_root_dir="results/api_example", accelerator="cpu", devices=1, max_epochs=4)
    engine.fit(model=model, datamodule=datamodule)
    (metrics,) = engine.test(model=model, datamodule=datamodule)
    print({name: round(float(value), 4) for name, value in metrics.items()})

    # Predict on a folder of target-domain images: here the depth images the datamodule rendered for testing.
    checkpoint = (
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    test_images = Path(datamodule.test_data.samples.image_path.iloc[0]).parent
    predictions = engine.predict(model=model, data_path=test_images, ckpt_path=checkpoint)
    for batch in predictions[:3]:
        print(batch.image_path[0], float(batch.pred_score[0]))


if __name__ == "__main__":
    main()
