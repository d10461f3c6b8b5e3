"""README's XYZ predict command, as written, with anomalib's default visualizer: one depth picture per point cloud."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from anomalib.engine import Engine
from PIL import Image

from anomalib_hypergraph.data import MVTec3DCrossDomain, render_depth_image
from anomalib_hypergraph.models import HyperTrans
from tests.conftest import TINY_IMAGE_SIZE, TINY_VIT_KWARGS
from tests.test_cli import ANOMALIB, model_arguments, run

pytestmark = pytest.mark.skipif(not ANOMALIB.exists(), reason="the anomalib console script is not installed")


def test_readme_xyz_predict_command_writes_one_depth_picture_per_cloud(
    tmp_path: Path, synthetic_root: Path, synthetic_category: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tiny checkpoint, trained in-process with the options that model_arguments() gives the command line.
    options = dict(zip(model_arguments()[2::2], model_arguments()[3::2], strict=True))
    assert json.loads(options["--model.model_kwargs"]) == TINY_VIT_KWARGS
    model = HyperTrans(
        backbone=options["--model.backbone"],
        pretrained=False,
        model_kwargs=dict(TINY_VIT_KWARGS),
        image_size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
        epochs_perturbation=int(options["--model.epochs_perturbation"]),
        epochs_rectification=int(options["--model.epochs_rectification"]),
        num_neighbors=int(options["--model.num_neighbors"]),
        visualizer=False,
    )
    datamodule = MVTec3DCrossDomain(
        root=synthetic_root, category=synthetic_category, num_workers=0, cache_dir=tmp_path / "cache"
    )
    engine = Engine(default_root_dir=tmp_path / "train", accelerator="cpu", devices=1, max_epochs=2, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    checkpoint = sorted((tmp_path / "train").rglob("*.ckpt"))[-1]

    # README: anomalib predict --model HyperTrans --ckpt_path <ckpt> --data anomalib_hypergraph.data.XYZFolder
    #         --data.path <folder>   (plus the tiny model's options; the default visualizer is on)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))  # XYZFolder's default depth cache
    folder = synthetic_root / synthetic_category / "test"  # label sub-folders hold equal file names (000.tiff, ...)
    predict = run(
        [
            str(ANOMALIB),
            "predict",
            *model_arguments(),
            "--ckpt_path",
            str(checkpoint),
            "--data",
            "anomalib_hypergraph.data.XYZFolder",
            "--data.path",
            str(folder),
        ],
        cwd=tmp_path,
    )
    assert predict.returncode == 0, predict.stderr[-4000:]
    clouds = sorted(path.relative_to(folder).with_suffix(".png").as_posix() for path in folder.rglob("*.tiff"))
    images = tmp_path / "results" / "HyperTrans" / folder.name / "latest" / "images"
    written = sorted(path.relative_to(images).as_posix() for path in images.rglob("*.png"))
    assert written == clouds  # one picture per point cloud, at the cloud's path below the input folder
    picture = np.asarray(Image.open(images / "good" / "xyz" / "000.png").convert("RGB"))[:, :256]
    depth = render_depth_image(folder / "good" / "xyz" / "000.tiff")
    expected = np.asarray(Image.fromarray(depth).resize((256, 256)))
    np.testing.assert_array_equal(picture[64:], expected[64:])  # the "Image" panel is the depth image, under its title
