"""Cross-domain datamodules: MVTec 3D-AD layout (synthetic data), depth cache, XYZFolder, pairs of Folders."""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import AnomalibDataModule, Folder, ImageBatch
from anomalib.data.utils import read_image, read_mask
from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer
from jsonargparse import ArgumentParser
from PIL import Image
from torchvision.transforms.v2 import Resize

from anomalib_hypergraph.data import (
    CrossDomainDataModule,
    MVTec3DCrossDomain,
    XYZFolder,
    XYZFormatError,
    generate_synthetic_mvtec3d,
    render_depth_image,
)
from anomalib_hypergraph.data.depth import resize_nearest

IMAGE_SIZE = 64
NUM_TRAIN = 6
CATEGORY = "dome"


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XYZFolder's default cache lives in the user cache folder: point it at a private temporary folder."""
    folder = tmp_path / "user_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


@pytest.fixture(scope="module")
def pristine_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic MVTec 3D-AD data (two categories, 64 px), generated once; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("cross_domain") / "Synthetic3D"
    return generate_synthetic_mvtec3d(
        root,
        [CATEGORY, "tile"],
        num_train=NUM_TRAIN,
        num_validation=1,
        num_test_good=2,
        num_test_defect=4,
        image_size=IMAGE_SIZE,
    )


@pytest.fixture
def root(pristine_root: Path, tmp_path: Path) -> Path:
    """A private copy of the dataset (its default depth cache is then private too)."""
    return Path(shutil.copytree(pristine_root, tmp_path / "datasets" / "Synthetic3D"))


def _datamodule(root: Path, **kwargs: object) -> MVTec3DCrossDomain:
    arguments = {"category": CATEGORY, "train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}
    arguments.update(kwargs)
    return MVTec3DCrossDomain(root, **arguments)


def _all_batches(loader: torch.utils.data.DataLoader) -> list[ImageBatch]:
    batches = list(loader)
    assert all(isinstance(batch, ImageBatch) for batch in batches)
    return batches


def _as_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float image in [0, 1] as read by anomalib -> (H, W, 3) uint8."""
    return np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_train_loaders_source_all_normals_target_k_shots(root: Path) -> None:
    datamodule = _datamodule(root, k_shot=2, pair_shots=False)
    datamodule.setup()
    loaders = datamodule.train_dataloader()
    assert set(loaders) == {"source", "target"}

    source_batches = _all_batches(loaders["source"])
    source_paths = sorted(path for batch in source_batches for path in batch.image_path)
    assert source_paths == [str(root / CATEGORY / "train" / "good" / "rgb" / f"{i:03d}.png") for i in range(NUM_TRAIN)]
    assert len(datamodule.source_train_data) == NUM_TRAIN

    target_batches = _all_batches(loaders["target"])
    target_paths = sorted(path for batch in target_batches for path in batch.image_path)
    assert target_paths == datamodule.shots
    assert [Path(path).name for path in target_paths] == ["000.png", "001.png"]
    assert all(Path(path).parent.name == "depth" for path in target_paths)
    assert datamodule.train_data is datamodule.target_train_data

    for batch in source_batches + target_batches:
        assert batch.image.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch.image.dtype == torch.float32
        assert 0.0 <= float(batch.image.min()) <= float(batch.image.max()) <= 1.0
        assert not batch.gt_label.any()

    # Source RGB and target depth really are different domains: depth has 3 identical channels, RGB does not.
    depth_image = target_batches[0].image[0]
    assert torch.equal(depth_image[0], depth_image[1])
    assert torch.equal(depth_image[0], depth_image[2])
    rgb_image = source_batches[0].image[0]
    assert not torch.equal(rgb_image[0], rgb_image[2])


def test_mvtec3d_pairs_each_shot_with_the_same_samples_rgb(root: Path) -> None:
    datamodule = _datamodule(root, k_shot=3, shot_selection="random", seed=1, train_batch_size=2)
    datamodule.setup()
    loaders = datamodule.train_dataloader()
    assert set(loaders) == {"source", "target", "paired_source"}
    target_batches = _all_batches(loaders["target"])
    paired_batches = _all_batches(loaders["paired_source"])
    assert [len(batch.image) for batch in target_batches] == [len(batch.image) for batch in paired_batches] == [2, 1]
    rgb_folder = root / CATEGORY / "train" / "good" / "rgb"
    for target, paired in zip(target_batches, paired_batches, strict=True):
        for target_path, paired_path, image in zip(target.image_path, paired.image_path, paired.image, strict=True):
            assert paired_path == str(rgb_folder / Path(target_path).name)  # the same sample, seen in RGB
            assert np.array_equal(_as_uint8(image), np.asarray(Image.open(paired_path).convert("RGB")))
    assert sorted(path for batch in target_batches for path in batch.image_path) == datamodule.shots
    # The shots stay in order on every pass (both loaders unshuffled), so the pairs never drift apart.
    assert [batch.image_path for batch in _all_batches(loaders["target"])] == [b.image_path for b in target_batches]


def test_folder_pairs_by_relative_path_and_names_unmatched_shots(tmp_path: Path) -> None:
    _write_camera(tmp_path / "old_camera", seed=0, num_good=5, colour=True)
    _write_camera(tmp_path / "new_camera", seed=1, num_good=4, colour=False)
    old, new = (
        folder_camera(tmp_path / "old_camera", "old_camera"),
        folder_camera(tmp_path / "new_camera", "new_camera"),
    )
    datamodule = CrossDomainDataModule(old, new, k_shot=3, shot_selection="random", seed=2, pair_shots=True)
    datamodule.setup()
    paired = datamodule.paired_source_data.samples["image_path"].tolist()
    assert paired == [str(tmp_path / "old_camera" / "good" / Path(shot).name) for shot in datamodule.shots]

    (tmp_path / "new_camera" / "good" / "003.png").rename(tmp_path / "new_camera" / "good" / "late.png")
    unmatched = CrossDomainDataModule(
        folder_camera(tmp_path / "old_camera", "old_camera"),
        folder_camera(tmp_path / "new_camera", "new_camera"),
        k_shot=4,
        pair_shots=True,
    )
    with pytest.raises(ValueError, match=r"1 target shot\(s\) have no source .*new_camera/good/late.png .*'late.png'"):
        unmatched.setup()
    unpaired = CrossDomainDataModule(
        folder_camera(tmp_path / "old_camera", "old_camera"),
        folder_camera(tmp_path / "new_camera", "new_camera"),
        k_shot=4,
    )
    unpaired.setup()
    assert unpaired.paired_source_data is None
    assert set(unpaired.train_dataloader()) == {"source", "target"}


def test_test_batches_are_target_domain_with_masks(root: Path) -> None:
    datamodule = _datamodule(root, k_shot=1)
    datamodule.setup()
    batches = _all_batches(datamodule.test_dataloader())
    labels = torch.cat([batch.gt_label for batch in batches])
    assert labels.tolist() == [1, 1, 1, 1, 0, 0]  # sorted paths: bump, contamination, crack, dent, good, good
    for batch in batches:
        assert batch.gt_mask.shape == (batch.image.shape[0], IMAGE_SIZE, IMAGE_SIZE)
        assert set(batch.gt_mask.unique().tolist()) <= {0, 1}
        assert torch.equal(batch.gt_mask.flatten(1).any(dim=1), batch.gt_label.bool())
        for image_path, mask_path, mask in zip(batch.image_path, batch.mask_path, batch.gt_mask, strict=True):
            assert Path(image_path).parent.name == "depth"
            label_folder = Path(image_path).parents[1].name
            assert mask_path == str(root / CATEGORY / "test" / label_folder / "gt" / Path(image_path).name)
            assert torch.equal(mask.bool(), read_mask(mask_path, as_tensor=True).bool())
    # val defaults to the test set, as anomalib's MVTec3D does; predict uses the test set.
    assert len(datamodule.val_data) == len(datamodule.test_data)
    predict_batch = next(iter(datamodule.predict_dataloader()))
    assert predict_batch.image_path == batches[0].image_path
    # No NaN mask paths anywhere (anomalib's own MVTec3D builder leaves "nan" strings in the train split on pandas 3).
    for dataset in (datamodule.source_train_data, datamodule.target_train_data, datamodule.test_data):
        assert not dataset.samples["mask_path"].isna().any()
        assert not dataset.samples["mask_path"].astype(str).str.lower().eq("nan").any()
    assert (datamodule.source_train_data.samples["mask_path"] == "").all()


def test_depth_cache_equals_render_and_value_range(root: Path) -> None:
    datamodule = _datamodule(root)
    datamodule.setup()
    samples = datamodule.test_data.samples
    for image_path, source_path in zip(samples.image_path, samples.source_path, strict=True):
        cached = _as_uint8(read_image(image_path, as_tensor=True))
        np.testing.assert_array_equal(cached, render_depth_image(source_path))
        values = cached[..., 0]
        valid = values[values > 0]
        # Depth is min-max mapped to [0.1, 0.9] per image (0 = invalid): 26 .. 230 in uint8, both ends reached.
        assert valid.min() == round(0.1 * 255)
        assert valid.max() == round(0.9 * 255)


def test_domains_are_swappable(root: Path) -> None:
    datamodule = _datamodule(root, source_domain="depth", target_domain="rgb", k_shot=3)
    datamodule.setup()
    assert all(Path(path).parent.name == "depth" for path in datamodule.source_train_data.samples.image_path)
    assert len(datamodule.source_train_data) == NUM_TRAIN
    assert datamodule.shots == [str(root / CATEGORY / "train" / "good" / "rgb" / f"{i:03d}.png") for i in range(3)]
    test_paths = datamodule.test_data.samples.image_path
    assert all(Path(path).parent.name == "rgb" and Path(path).is_relative_to(root) for path in test_paths)


def test_cache_is_outside_the_dataset_which_stays_unchanged(root: Path) -> None:
    before = _tree_digest(root)
    datamodule = _datamodule(root, remove_background=True)
    datamodule.setup()
    assert _tree_digest(root) == before
    cache = root.parent / ".anomalib_hypergraph_cache" / root.name / CATEGORY
    assert Path(datamodule.test_data.samples.image_path[0]).is_relative_to(cache)
    assert sorted(path.relative_to(cache).as_posix() for path in cache.glob("test/good/depth/*.png")) == [
        "test/good/depth/000.png",
        "test/good/depth/001.png",
    ]
    index = json.loads((cache / "render_parameters.json").read_text())
    assert index["parameters"] == {"depth_size": None, "remove_background": True}
    with pytest.raises(ValueError, match=r"lies inside the dataset folder"):
        _datamodule(root, cache_dir=root / "cache").setup()


def test_cache_is_rerendered_when_parameters_or_sources_change(root: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    full = _datamodule(root, cache_dir=cache_dir)
    full.setup()
    first_path = full.test_data.samples.image_path[0]
    assert Image.open(first_path).size == (IMAGE_SIZE, IMAGE_SIZE)

    small = _datamodule(root, cache_dir=cache_dir, depth_size=32)
    small.setup()
    samples = small.test_data.samples
    assert samples.image_path[0] == first_path  # same cache entry, re-rendered at the new size
    for image_path, mask_path, source_path in zip(
        samples.image_path, samples.mask_path, samples.source_path, strict=True
    ):
        np.testing.assert_array_equal(
            _as_uint8(read_image(image_path, as_tensor=True)), render_depth_image(source_path, 32)
        )
        # Masks follow the image size: nearest-neighbour copies in the cache, aligned with the depth resize.
        assert Path(mask_path).is_relative_to(cache_dir)
        original_mask = np.asarray(Image.open(Path(source_path).parents[1] / "gt" / Path(mask_path).name))
        np.testing.assert_array_equal(np.asarray(Image.open(mask_path)), resize_nearest(original_mask, (32, 32)))
    batch = next(iter(small.test_dataloader()))
    assert batch.image.shape[-2:] == batch.gt_mask.shape[-2:] == (32, 32)
    assert torch.equal(batch.gt_mask.flatten(1).any(dim=1), batch.gt_label.bool())

    # A changed source file is re-rendered (here: a defect cloud replaced by a good one).
    xyz_path = Path(samples.source_path[0])
    replacement = root / CATEGORY / "test" / "good" / "xyz" / "000.tiff"
    shutil.copyfile(replacement, xyz_path)
    os.utime(xyz_path, ns=(1_000_000_000, 1_000_000_000))
    again = _datamodule(root, cache_dir=cache_dir, depth_size=32)
    again.setup()
    refreshed = _as_uint8(read_image(again.test_data.samples.image_path[0], as_tensor=True))
    np.testing.assert_array_equal(refreshed, render_depth_image(replacement, 32))


def test_xyz_folder_gives_the_cached_pixels(root: Path) -> None:
    datamodule = _datamodule(root, depth_size=48)
    datamodule.setup()
    cached = {
        source: image
        for source, image in zip(
            datamodule.test_data.samples.source_path, datamodule.test_data.samples.image_path, strict=True
        )
    }
    predict = XYZFolder(path=root / CATEGORY / "test", depth_size=48, eval_batch_size=4)
    predict.setup()
    samples = predict.test_data.samples
    assert sorted(samples.source_path) == sorted(cached)
    source_of = dict(zip(samples.image_path, samples.source_path, strict=True))
    batches = _all_batches(predict.predict_dataloader())
    paths = [path for batch in batches for path in batch.image_path]
    assert sorted(paths) == sorted(samples.image_path)
    for batch in batches:
        assert batch.gt_label is None
        for image, path in zip(batch.image, batch.image_path, strict=True):
            assert torch.equal(image, read_image(cached[source_of[path]], as_tensor=True))
    # Visualisations get unique file names (anomalib derives them from name/category and image_path).
    names = {generate_output_filename(path, "out", predict.name, predict.category, mkdir=False) for path in paths}
    assert len(names) == len(paths)
    with pytest.raises(RuntimeError, match=r"no training data"):
        predict.train_dataloader()
    with pytest.raises(FileNotFoundError, match=r"No XYZ point cloud .* found at .*rgb"):
        XYZFolder(path=root / CATEGORY / "test" / "good" / "rgb").setup()


def test_visualisation_file_names_are_unique(root: Path) -> None:
    for source_domain, target_domain in (("rgb", "depth"), ("depth", "rgb")):
        datamodule = _datamodule(root, source_domain=source_domain, target_domain=target_domain)
        datamodule.setup()
        paths = list(datamodule.test_data.samples.image_path)
        names = {generate_output_filename(p, "out", datamodule.name, datamodule.category, mkdir=False) for p in paths}
        assert len(names) == len(paths)


def test_model_resize_reaches_source_and_target(root: Path) -> None:
    datamodule = _datamodule(root)
    model = SimpleNamespace(pre_processor=SimpleNamespace(transform=Resize((32, 32))))
    datamodule.trainer = SimpleNamespace(model=model)
    datamodule.setup()
    loaders = datamodule.train_dataloader()
    assert next(iter(loaders["source"])).image.shape[-2:] == (32, 32)
    assert next(iter(loaders["target"])).image.shape[-2:] == (32, 32)
    test_batch = next(iter(datamodule.test_dataloader()))
    assert test_batch.image.shape[-2:] == test_batch.gt_mask.shape[-2:] == (32, 32)


def test_mvtec3d_errors(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Category 'bagel' not found .*categories found: \['dome', 'tile'\]"):
        _datamodule(root, category="bagel").setup()
    with pytest.raises(FileNotFoundError, match=r"root folder .*missing_root' does not exist"):
        _datamodule(root.parent / "missing_root").setup()
    with pytest.raises(ValueError, match=rf"k_shot={NUM_TRAIN + 1} .* only {NUM_TRAIN} normal images were found"):
        _datamodule(root, k_shot=NUM_TRAIN + 1).setup()
    with pytest.raises(ValueError, match=r"target_domain must be one of \('rgb', 'depth'\)"):
        _datamodule(root, target_domain="ir")

    missing_mask = root / CATEGORY / "test" / "crack" / "gt" / "000.png"
    missing_mask.unlink()
    with pytest.raises(FileNotFoundError, match=rf"mask '{missing_mask}' of the anomalous image .* does not exist"):
        _datamodule(root).setup()
    shutil.rmtree(root / CATEGORY / "test" / "crack")

    for image in (root / CATEGORY / "test" / "bump" / "rgb").glob("*.png"):
        image.unlink()
    with pytest.raises(FileNotFoundError, match=r"No rgb images .* found in .*bump/rgb"):
        _datamodule(root, source_domain="depth", target_domain="rgb").setup()

    corrupt = root / CATEGORY / "test" / "dent" / "xyz" / "000.tiff"
    corrupt.write_bytes(b"not a tiff at all")
    with pytest.raises(XYZFormatError, match=rf"{corrupt}"):
        _datamodule(root).setup()
    # The depth test split of a depth SOURCE is never read: an RGB target still works.
    rgb_target = _datamodule(root, source_domain="depth", target_domain="rgb", k_shot=1)
    shutil.rmtree(root / CATEGORY / "test" / "bump")
    rgb_target.setup()
    assert len(rgb_target.test_data) == 4


def test_mvtec3d_cross_domain_through_jsonargparse(root: Path) -> None:
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data", required=False, fail_untyped=False)
    config = parser.parse_args(
        [
            "--data=anomalib_hypergraph.data.MVTec3DCrossDomain",
            f"--data.root={root}",
            f"--data.category={CATEGORY}",
            "--data.k_shot=2",
            "--data.depth_size=32",
            "--data.num_workers=0",
        ]
    )
    datamodule = parser.instantiate_classes(config).data
    assert isinstance(datamodule, MVTec3DCrossDomain)
    datamodule.setup()
    assert len(datamodule.shots) == 2
    assert read_image(datamodule.shots[0], as_tensor=True).shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# CrossDomainDataModule with two Folder datamodules (old camera = source, new camera = target)
# ---------------------------------------------------------------------------------------------------------------


def _write_camera(folder: Path, seed: int, num_good: int, colour: bool) -> None:
    rng = np.random.default_rng(seed)
    for subfolder, count in (("good", num_good), ("good_test", 2), ("bad", 3)):
        for index in range(count):
            image = rng.integers(0, 256, (24, 24, 3 if colour else 1), dtype=np.uint8)
            image = image if colour else np.repeat(image, 3, axis=-1)
            (folder / subfolder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / subfolder / f"{index:03d}.png")
    for index in range(3):
        mask = np.zeros((24, 24), dtype=np.uint8)
        mask[2 : 8 + index, 3:9] = 255
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(folder / "masks" / f"{index:03d}.png")


def folder_camera(folder: Path, name: str) -> Folder:
    """An anomalib ``Folder`` over a camera folder (``good``, ``good_test``, ``bad``, ``masks``), named ``name``."""
    return Folder(
        name=name,
        root=folder,
        normal_dir="good",
        abnormal_dir="bad",
        normal_test_dir="good_test",
        mask_dir="masks",
        num_workers=0,
        val_split_mode="same_as_test",
    )


def test_cross_domain_with_two_folders(tmp_path: Path) -> None:
    _write_camera(tmp_path / "old_camera", seed=0, num_good=5, colour=True)
    _write_camera(tmp_path / "new_camera", seed=1, num_good=4, colour=False)
    datamodule = CrossDomainDataModule(
        folder_camera(tmp_path / "old_camera", "old_camera"),
        folder_camera(tmp_path / "new_camera", "new_camera"),
        k_shot=2,
        shot_selection="random",
        seed=3,
        train_batch_size=2,
    )
    datamodule.setup()
    assert datamodule.name == "new_camera"
    loaders = datamodule.train_dataloader()
    source_paths = sorted(path for batch in _all_batches(loaders["source"]) for path in batch.image_path)
    assert source_paths == [str(tmp_path / "old_camera" / "good" / f"{i:03d}.png") for i in range(5)]
    target_paths = sorted(path for batch in _all_batches(loaders["target"]) for path in batch.image_path)
    assert target_paths == datamodule.shots
    assert len(target_paths) == 2
    assert all(Path(path).parent == tmp_path / "new_camera" / "good" for path in target_paths)
    test_batches = _all_batches(datamodule.test_dataloader())
    test_paths = [path for batch in test_batches for path in batch.image_path]
    assert len(test_paths) == 5
    assert all(Path(path).is_relative_to(tmp_path / "new_camera") for path in test_paths)
    for batch in test_batches:
        assert torch.equal(batch.gt_mask.flatten(1).any(dim=1), batch.gt_label.bool())

    same_seed = CrossDomainDataModule(
        folder_camera(tmp_path / "old_camera", "a"),
        folder_camera(tmp_path / "new_camera", "b"),
        k_shot=2,
        shot_selection="random",
        seed=3,
    )
    same_seed.setup()
    assert same_seed.shots == datamodule.shots

    too_many = CrossDomainDataModule(
        folder_camera(tmp_path / "old_camera", "a"), folder_camera(tmp_path / "new_camera", "b"), k_shot=5
    )
    with pytest.raises(ValueError, match=r"k_shot=5 .* only 4 normal images were found in .*new_camera"):
        too_many.setup()


def test_cross_domain_rejects_a_source_without_normal_images(tmp_path: Path) -> None:
    _write_camera(tmp_path / "camera", seed=0, num_good=3, colour=True)
    source = folder_camera(tmp_path / "camera", "old_camera")
    source.setup()
    source.train_data = source.test_data.subsample(np.flatnonzero(source.test_data.samples.label_index == 1).tolist())
    source._is_setup = True  # keep the anomalous-only training set when the pair sets the source up again
    datamodule = CrossDomainDataModule(source, folder_camera(tmp_path / "camera", "new_camera"))
    with pytest.raises(
        ValueError, match=r"source datamodule Folder\(root='.*camera'.*\) has no normal training images"
    ):
        datamodule.setup()


def test_cross_domain_and_xyz_folder_through_jsonargparse(tmp_path: Path, root: Path) -> None:
    _write_camera(tmp_path / "old_camera", seed=0, num_good=3, colour=True)
    _write_camera(tmp_path / "new_camera", seed=1, num_good=3, colour=False)
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data", required=False, fail_untyped=False)
    camera_arguments = []
    for side, camera in (("source", "old_camera"), ("target", "new_camera")):
        camera_arguments += [
            f"--data.{side}=anomalib.data.Folder",
            f"--data.{side}.name={camera}",
            f"--data.{side}.root={tmp_path / camera}",
            f"--data.{side}.normal_dir=good",
            f"--data.{side}.normal_test_dir=good_test",
            f"--data.{side}.abnormal_dir=bad",
            f"--data.{side}.mask_dir=masks",
        ]
    config = parser.parse_args(
        ["--data=anomalib_hypergraph.data.CrossDomainDataModule", "--data.k_shot=2", *camera_arguments]
    )
    datamodule = parser.instantiate_classes(config).data
    assert isinstance(datamodule, CrossDomainDataModule)
    datamodule.setup()
    assert [Path(path).parent.parent.name for path in datamodule.shots] == ["new_camera", "new_camera"]
    assert len(datamodule.source_train_data) == 3

    config = parser.parse_args(["--data=anomalib_hypergraph.data.XYZFolder", f"--data.path={root / CATEGORY / 'test'}"])
    predict = parser.instantiate_classes(config).data
    assert isinstance(predict, XYZFolder)
    predict.setup()
    assert len(predict.test_data) == 6


# ---------------------------------------------------------------------------------------------------------------
# Safe in a user's pipeline: predict visualisations, the depth cache, 16-bit and broken images, bad arguments
# ---------------------------------------------------------------------------------------------------------------


def _visualise(datamodule: AnomalibDataModule, output_dir: Path) -> list[Path]:
    """Run anomalib's default ImageVisualizer over the predict batches, as the Engine does; list what it wrote."""
    visualizer = ImageVisualizer(output_dir=output_dir)
    trainer = SimpleNamespace(datamodule=datamodule, default_root_dir=output_dir)
    for index, batch in enumerate(datamodule.predict_dataloader()):
        scored = batch.update(anomaly_map=torch.rand(batch.image.shape[0], *batch.image.shape[-2:]))
        visualizer.on_predict_batch_end(trainer, None, scored, scored, index)
    return sorted(path for path in output_dir.rglob("*.png"))


def test_xyz_folder_predictions_visualise_the_depth_image_once_per_file(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Point clouds with equal file names in nested sub-folders, predicted from a relative path.
    scans = tmp_path / "scans"
    clouds = sorted((root / CATEGORY / "test").rglob("xyz/000.tiff"))[:3]
    targets = [scans / "line_a" / "part" / "000.tiff", scans / "line_b" / "part" / "000.tiff", scans / "000.tiff"]
    for cloud, target in zip(clouds, targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cloud, target)
    before = _tree_digest(scans)
    monkeypatch.chdir(scans)
    datamodule = XYZFolder(path=".", eval_batch_size=2)
    datamodule.setup()
    assert datamodule.name == "scans"

    written = _visualise(datamodule, tmp_path / "out")
    assert [path.relative_to(tmp_path / "out").as_posix() for path in written] == [
        "000.png",
        "line_a/part/000.png",
        "line_b/part/000.png",
    ]
    # The picture's "Image" panel is the depth image the model saw (below its title: the title covers the top rows).
    for output, cloud in zip(written, [clouds[2], clouds[0], clouds[1]], strict=True):
        panel = np.asarray(Image.open(output).convert("RGB"))[:, :256]
        expected = np.asarray(Image.fromarray(render_depth_image(cloud)).resize((256, 256)))
        np.testing.assert_array_equal(panel[64:], expected[64:])
    assert _tree_digest(scans) == before  # the input folder is never written to
    for image_path in datamodule.test_data.samples.image_path:
        assert not Path(image_path).is_relative_to(scans)


def test_mvtec3d_visualisations_are_one_file_per_test_image(root: Path, tmp_path: Path) -> None:
    for source_domain, target_domain in (("rgb", "depth"), ("depth", "rgb")):
        datamodule = _datamodule(root, source_domain=source_domain, target_domain=target_domain)
        datamodule.setup()
        written = _visualise(datamodule, tmp_path / target_domain)
        assert len(written) == len(datamodule.test_data) == 6


def test_depth_cache_never_deletes_or_writes_outside_itself(root: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _datamodule(root, cache_dir=cache_dir).setup()
    cache = cache_dir / root.name / CATEGORY
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    dataset_cloud = root / CATEGORY / "test" / "good" / "xyz" / "000.tiff"
    link = cache / "test" / "good" / "depth" / "link.png"
    link.symlink_to(victim)
    index_path = cache / "render_parameters.json"
    index = json.loads(index_path.read_text())
    index["files"].update(
        {
            os.path.relpath(victim, cache): [1, 1],
            os.path.relpath(dataset_cloud, cache): [1, 1],
            str(victim): [1, 1],
            "test/good/depth/link.png": [1, 1],
        }
    )
    index_path.write_text(json.dumps(index))
    before = _tree_digest(root)

    # New render parameters: every file the index lists is deleted -- but only PNGs inside the cache.
    _datamodule(root, cache_dir=cache_dir, depth_size=32).setup()
    assert victim.read_text() == "keep me"
    assert _tree_digest(root) == before
    assert json.loads(index_path.read_text())["parameters"]["depth_size"] == 32

    # A cache folder that resolves into the dataset (through a link) is refused before anything is written.
    linked_dir = tmp_path / "linked"
    linked_dir.mkdir()
    (linked_dir / root.name).symlink_to(root)
    with pytest.raises(ValueError, match=r"lies inside the dataset folder"):
        _datamodule(root, cache_dir=linked_dir).setup()
    assert _tree_digest(root) == before


def test_sixteen_bit_and_broken_images_of_our_datamodules(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    shot = root / CATEGORY / "train" / "good" / "rgb" / "000.png"
    depth = (np.arange(IMAGE_SIZE * IMAGE_SIZE).reshape(IMAGE_SIZE, IMAGE_SIZE) * 16).astype(np.uint16)
    Image.fromarray(depth).save(shot)
    with caplog.at_level(logging.INFO):
        datamodule = _datamodule(root, source_domain="depth", target_domain="rgb", k_shot=1)
        datamodule.setup()
    assert "1 of 6 train rgb images" in caplog.text
    assert "read at full range (value / 65535" in caplog.text
    image = next(iter(datamodule.train_dataloader()["target"])).image[0]
    expected = torch.from_numpy(depth.astype(np.float32) / 65535)
    for channel in image:
        torch.testing.assert_close(channel, expected)

    truncated = root / CATEGORY / "test" / "good" / "rgb" / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"Cannot read image '{truncated}'.*truncated"):  # an ImageFileError
        _datamodule(root, source_domain="depth", target_domain="rgb").setup()


def test_bad_arguments_say_what_is_wrong(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"source_domain and target_domain are both 'depth'"):
        _datamodule(root, source_domain="depth", target_domain="depth")
    a_file = tmp_path / "MVTec3D.zip"
    a_file.write_bytes(b"zip")
    with pytest.raises(NotADirectoryError, match=rf"root folder '{a_file}' is a file, not a folder"):
        _datamodule(a_file).setup()
    with pytest.raises(ValueError, match=r"is a file but not a point cloud"):
        XYZFolder(path=a_file).setup()
    camera = tmp_path / "camera"
    _write_camera(camera, seed=0, num_good=3, colour=True)
    folder = folder_camera(camera, "camera")
    with pytest.raises(ValueError, match=r"source and target are the same datamodule"):
        CrossDomainDataModule(folder, folder)


def test_k_shot_error_names_the_users_dataset_folder_not_the_depth_cache(root: Path) -> None:
    user_folder = root / CATEGORY / "train" / "good" / "xyz"  # the depth target's shots come from these point clouds
    with pytest.raises(ValueError, match=rf"only {NUM_TRAIN} normal images were found in .* under '{user_folder}'"):
        _datamodule(root, k_shot=NUM_TRAIN + 1).setup()


def test_one_folder_as_source_and_target_is_refused_whatever_the_objects(tmp_path: Path) -> None:
    """Every CLI config makes two datamodule objects; equal roots still put the target shots into the source bank."""
    _write_camera(tmp_path / "camera", seed=0, num_good=4, colour=True)
    pair = CrossDomainDataModule(
        folder_camera(tmp_path / "camera", "old"), folder_camera(tmp_path / "camera", "new"), k_shot=1
    )
    shot = tmp_path / "camera" / "good" / "000.png"
    with pytest.raises(ValueError, match=rf"read the same files: 1 of the target's 1 train images .*'{shot}'"):
        pair.setup()
    link = tmp_path / "camera_link"  # another path to the same files
    link.symlink_to(tmp_path / "camera", target_is_directory=True)
    pair = CrossDomainDataModule(folder_camera(tmp_path / "camera", "old"), folder_camera(link, "new"), k_shot=1)
    with pytest.raises(ValueError, match=r"read the same files"):
        pair.setup()
