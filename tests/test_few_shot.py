"""Few-shot sampling: shot selection, normal-only subsets, the FewShot wrapper (Folder, jsonargparse, MVTecAD)."""

import logging
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import AnomalibDataModule, Folder, ImageBatch, MVTecAD
from jsonargparse import ArgumentParser
from PIL import Image

from anomalib_hypergraph.data import CrossDomainDataModule, FewShot, few_shot_subset, select_shots

MVTEC_AD_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"
IMAGE_SIZE = 32


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """Hand-made Folder dataset: 7 normal train, 3 normal test, 4 abnormal test images with 0/255 masks."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny_folder"
    for folder, count in (("good", 7), ("good_test", 3), ("bad", 4)):
        for index in range(count):
            image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            _write_png(root / folder / f"{index:03d}.png", image)
    for index in range(4):
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        mask[4 + index : 12 + index, 8:20] = 255
        _write_png(root / "masks" / f"{index:03d}.png", mask)
    return root


def _folder(root: Path, name: str = "tiny_folder", **kwargs: object) -> Folder:
    return Folder(
        name=name,
        root=root,
        normal_dir="good",
        abnormal_dir="bad",
        normal_test_dir="good_test",
        mask_dir="masks",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        val_split_mode="same_as_test",
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# select_shots
# ---------------------------------------------------------------------------------------------------------------

PATHS = [f"/data/cat/train/good/{index:03d}.png" for index in range(50)]


def test_first_strategy_takes_the_first_k_sorted_paths_whatever_the_input_order() -> None:
    shuffled = PATHS.copy()
    random.Random(3).shuffle(shuffled)
    chosen = select_shots(shuffled, 3, strategy="first")
    assert [shuffled[index] for index in chosen] == PATHS[:3]


def test_random_strategy_is_deterministic_per_seed_and_independent_of_input_order() -> None:
    shuffled = PATHS.copy()
    random.Random(5).shuffle(shuffled)
    picks = {}
    for seed in (0, 1, 2):
        from_sorted = [PATHS[index] for index in select_shots(PATHS, 5, strategy="random", seed=seed)]
        from_shuffled = [shuffled[index] for index in select_shots(shuffled, 5, strategy="random", seed=seed)]
        assert from_sorted == from_shuffled
        assert from_sorted == sorted(from_sorted)
        assert len(set(from_sorted)) == 5
        picks[seed] = tuple(from_sorted)
    assert len(set(picks.values())) == 3  # different seeds, different shots
    assert picks[0] != tuple(PATHS[:5])  # random really is not "first"


def test_select_shots_errors_name_counts_and_location() -> None:
    with pytest.raises(ValueError, match=r"k_shot=4 normal shots were requested, but only 3 .* found in /data/cat"):
        select_shots(PATHS[:3], 4)
    with pytest.raises(ValueError, match=r"only 2 .* found in my folder"):
        select_shots(PATHS[:2], 3, location="my folder")
    with pytest.raises(ValueError, match=r"k_shot must be an int >= 1.*got 0"):
        select_shots(PATHS, 0)
    with pytest.raises(ValueError, match=r"strategy must be one of \('first', 'random'\), got 'last'"):
        select_shots(PATHS, 1, strategy="last")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# few_shot_subset and FewShot on a Folder dataset
# ---------------------------------------------------------------------------------------------------------------


def test_few_shot_subset_keeps_only_normal_images(folder_root: Path) -> None:
    datamodule = _folder(folder_root)
    datamodule.setup()
    test_set = datamodule.test_data  # 3 normal + 4 abnormal
    normal_paths = sorted(test_set.samples.loc[test_set.samples.label_index == 0, "image_path"])
    subset = few_shot_subset(test_set, 3, strategy="random", seed=1)
    assert type(subset) is type(test_set)
    assert (subset.samples.label_index == 0).all()
    assert sorted(subset.samples.image_path) == normal_paths
    with pytest.raises(
        ValueError, match=r"k_shot=4 .* only 3 normal images were found in the tiny_folder dataset under .*tiny_folder"
    ):
        few_shot_subset(test_set, 4)


def test_few_shot_wrapper_on_folder(folder_root: Path) -> None:
    wrapped = _folder(folder_root)
    datamodule = FewShot(wrapped, k_shot=2)
    datamodule.setup()
    expected_shots = [str(folder_root / "good" / f"{index:03d}.png") for index in range(2)]
    assert datamodule.shots == expected_shots
    assert datamodule.name == "tiny_folder"
    assert datamodule.category == wrapped.category
    batches = list(datamodule.train_dataloader())
    assert all(isinstance(batch, ImageBatch) for batch in batches)
    assert sorted(path for batch in batches for path in batch.image_path) == expected_shots
    assert torch.equal(torch.cat([batch.gt_label for batch in batches]), torch.zeros(2, dtype=torch.bool))
    # val/test are the wrapped datamodule's: all 7 test images, masks 0/1 matching the labels.
    assert len(datamodule.test_data) == 7
    test_batches = list(datamodule.test_dataloader())
    labels = torch.cat([batch.gt_label for batch in test_batches])
    masks = torch.cat([batch.gt_mask for batch in test_batches])
    assert set(masks.unique().tolist()) <= {0, 1}
    assert torch.equal(masks.flatten(1).any(dim=1), labels.bool())
    assert int(labels.sum()) == 4
    assert len(datamodule.val_data) == 7

    random_shots = FewShot(_folder(folder_root), k_shot=2, shot_selection="random", seed=4)
    random_shots.setup()
    again = FewShot(_folder(folder_root), k_shot=2, shot_selection="random", seed=4)
    again.setup()
    assert random_shots.shots == again.shots
    assert all(Path(path).parent.name == "good" for path in random_shots.shots)


def test_few_shot_wrapper_errors(folder_root: Path) -> None:
    with pytest.raises(ValueError, match=r"k_shot must be an int >= 1"):
        FewShot(_folder(folder_root), k_shot=0)
    datamodule = FewShot(_folder(folder_root), k_shot=8)
    with pytest.raises(ValueError, match=r"k_shot=8 .* only 7 normal images were found in .*good"):
        datamodule.setup()


def test_few_shot_through_jsonargparse(folder_root: Path, tmp_path: Path) -> None:
    """The anomalib CLI builds ``--data`` with ``add_subclass_arguments(AnomalibDataModule, "data")``."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data", required=False, fail_untyped=False)
    config = parser.parse_args(
        [
            "--data=anomalib_hypergraph.data.FewShot",
            "--data.k_shot=3",
            "--data.shot_selection=random",
            "--data.seed=7",
            "--data.datamodule=anomalib.data.Folder",
            "--data.datamodule.name=tiny_folder",
            f"--data.datamodule.root={folder_root}",
            "--data.datamodule.normal_dir=good",
            "--data.datamodule.abnormal_dir=bad",
            "--data.datamodule.normal_test_dir=good_test",
            "--data.datamodule.mask_dir=masks",
            "--data.datamodule.num_workers=0",
        ]
    )
    datamodule = parser.instantiate_classes(config).data
    assert isinstance(datamodule, FewShot)
    assert isinstance(datamodule.datamodule, Folder)
    assert (datamodule.k_shot, datamodule.shot_selection, datamodule.seed) == (3, "random", 7)
    datamodule.setup()
    assert len(datamodule.train_data) == 3

    config_file = tmp_path / "data.yaml"
    config_file.write_text(
        "class_path: anomalib_hypergraph.data.FewShot\n"
        "init_args:\n"
        "  k_shot: 2\n"
        "  datamodule:\n"
        "    class_path: anomalib.data.Folder\n"
        "    init_args:\n"
        "      name: tiny_folder\n"
        f"      root: {folder_root}\n"
        "      normal_dir: good\n"
        "      normal_test_dir: good_test\n"
        "      abnormal_dir: bad\n"
        "      mask_dir: masks\n"
        "      num_workers: 0\n"
    )
    from_config = AnomalibDataModule.from_config(config_file)
    assert isinstance(from_config, FewShot)
    from_config.setup()
    assert from_config.shots == [str(folder_root / "good" / f"{index:03d}.png") for index in range(2)]


@pytest.mark.skipif(not (MVTEC_AD_ROOT / "bottle").is_dir(), reason="shared MVTec AD bottle data not present")
def test_few_shot_on_mvtec_ad_bottle() -> None:
    datamodule = FewShot(
        MVTecAD(root=MVTEC_AD_ROOT, category="bottle", train_batch_size=4, eval_batch_size=4, num_workers=0),
        k_shot=2,
    )
    datamodule.setup()
    assert datamodule.name == "MVTecAD"
    assert datamodule.category == "bottle"
    assert [Path(path).name for path in datamodule.shots] == ["000.png", "001.png"]
    train_batch = next(iter(datamodule.train_dataloader()))
    assert isinstance(train_batch, ImageBatch)
    assert train_batch.image.shape[0] == 2
    assert len(datamodule.test_data) == 83  # 20 good + 63 defective
    test_batch = next(iter(datamodule.test_dataloader()))
    assert test_batch.gt_mask.shape[-2:] == test_batch.image.shape[-2:]
    assert torch.equal(test_batch.gt_mask.flatten(1).any(dim=1), test_batch.gt_label.bool())


# ---------------------------------------------------------------------------------------------------------------
# Wrapped datamodules in a user's pipeline: 16-bit images, broken files, seeds
# ---------------------------------------------------------------------------------------------------------------


def _sixteen_bit_folder(root: Path, seed: int) -> dict[str, np.ndarray]:
    """Folder dataset of 16-bit grayscale PNGs (values over the whole 0..65535 range); returns the arrays by path."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for folder, count in (("good", 4), ("good_test", 2), ("bad", 2)):
        for index in range(count):
            array = rng.integers(0, 65536, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint16)
            path = root / folder / f"{index:03d}.png"
            _write_png(path, array)
            arrays[str(path)] = array
    for index in range(2):
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        mask[4:12, 8 + index : 20] = 255
        _write_png(root / "masks" / f"{index:03d}.png", mask)
    return arrays


def _assert_full_range(batch: ImageBatch, arrays: dict[str, np.ndarray]) -> None:
    for image, path in zip(batch.image, batch.image_path, strict=True):
        expected = torch.from_numpy(arrays[path].astype(np.float32) / 65535)
        for channel in image:
            torch.testing.assert_close(channel, expected)


def test_sixteen_bit_images_are_read_at_full_range(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    arrays = _sixteen_bit_folder(tmp_path / "depth_camera", seed=0)
    with caplog.at_level(logging.INFO):
        datamodule = FewShot(_folder(tmp_path / "depth_camera", name="depth_camera"), k_shot=2)
        datamodule.setup()
    assert "2 of 2 train images of depth_camera" in caplog.text
    assert "4 of 4 test images of depth_camera" in caplog.text
    assert "read at full range (value / 65535, replicated to 3 channels)" in caplog.text
    _assert_full_range(next(iter(datamodule.train_dataloader())), arrays)
    test_batch = next(iter(datamodule.test_dataloader()))
    _assert_full_range(test_batch, arrays)
    assert 0.4 < float(test_batch.image.mean()) < 0.6  # not saturated: uniform values over the 16-bit range
    assert torch.equal(test_batch.gt_mask.flatten(1).any(dim=1), test_batch.gt_label.bool())
    assert datamodule.test_data.name == "depth_camera"  # the Folder dataset's own properties are kept
    # DataLoader workers started with "spawn" get a pickled copy: it still reads at full range.
    copy = pickle.loads(pickle.dumps(datamodule.test_data))
    assert torch.equal(copy[0].image, datamodule.test_data[0].image)

    # The same through CrossDomainDataModule: a 16-bit source camera beside an 8-bit target camera.
    _write_png(tmp_path / "rgb_camera" / "good" / "000.png", np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    shutil.copytree(tmp_path / "depth_camera" / "bad", tmp_path / "rgb_camera" / "bad")
    shutil.copytree(tmp_path / "depth_camera" / "masks", tmp_path / "rgb_camera" / "masks")
    pair = CrossDomainDataModule(
        _folder(tmp_path / "depth_camera", name="depth_camera"),
        Folder(
            name="rgb_camera", root=tmp_path / "rgb_camera", normal_dir="good", abnormal_dir="bad", mask_dir="masks"
        ),
    )
    pair.setup()
    source_batch = next(iter(pair.train_dataloader()["source"]))
    _assert_full_range(source_batch, arrays)
    assert float(next(iter(pair.train_dataloader()["target"])).image.max()) == 0.0


def test_broken_images_fail_at_setup_naming_the_file(folder_root: Path) -> None:
    truncated = folder_root / "good_test" / "001.png"
    content = truncated.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=rf"Cannot read image '{truncated}'.*truncated"):  # an ImageFileError
        FewShot(_folder(folder_root), k_shot=1).setup()
    truncated.write_bytes(content)

    mask = folder_root / "masks" / "002.png"
    mask.write_bytes(mask.read_bytes()[:60])
    with pytest.raises(ValueError, match=rf"Cannot read mask '{mask}'"):
        FewShot(_folder(folder_root), k_shot=1).setup()
    mask.unlink()

    float_image = folder_root / "bad" / "002.tiff"
    Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE), 0.5, dtype=np.float32)).save(float_image)
    (folder_root / "bad" / "002.png").unlink()
    Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)).save(folder_root / "masks" / "002.tiff")
    with pytest.raises(ValueError, match=rf"'{float_image}' has the PIL mode 'F'"):
        FewShot(_folder(folder_root), k_shot=1).setup()


def _split_of(datamodule: FewShot) -> tuple[list[str], list[str], list[str]]:
    """(shots, test images, validation images)."""
    return (
        datamodule.shots,
        sorted(datamodule.test_data.samples.image_path),
        sorted(datamodule.val_data.samples.image_path),
    )


def test_same_arguments_and_seed_give_the_same_shots_and_test_set(folder_root: Path) -> None:
    """A Folder without normal test images moves a random part of its normals into the test set."""

    def folder(**kwargs: object) -> Folder:
        return Folder(name="tiny_folder", root=folder_root, normal_dir="good", abnormal_dir="bad", **kwargs)

    splits = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        datamodule = FewShot(folder(), k_shot=2, shot_selection="random", seed=3)
        datamodule.setup()
        splits.append(_split_of(datamodule))
    assert splits[0] == splits[1]
    shots, test_paths, val_paths = splits[0]
    # Folder's defaults: 20 % of the 7 normals join the 4 anomalous images, half of which go to validation.
    assert len(test_paths) + len(val_paths) == 4 + 1
    assert not set(shots) & set(test_paths + val_paths)

    # A seed set on the wrapped datamodule itself is kept.
    own_seed = FewShot(folder(seed=11), k_shot=2, shot_selection="random", seed=3)
    assert own_seed.datamodule.seed == 11

    # Through the command line, as `anomalib fit --data anomalib_hypergraph.data.FewShot --data.datamodule Folder`.
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data", required=False, fail_untyped=False)
    arguments = [
        "--data=anomalib_hypergraph.data.FewShot",
        "--data.k_shot=2",
        "--data.shot_selection=random",
        "--data.seed=3",
        "--data.datamodule=anomalib.data.Folder",
        "--data.datamodule.name=tiny_folder",
        f"--data.datamodule.root={folder_root}",
        "--data.datamodule.normal_dir=good",
        "--data.datamodule.abnormal_dir=bad",
    ]
    for global_seed in (4, 5):
        torch.manual_seed(global_seed)
        from_cli = parser.instantiate_classes(parser.parse_args(arguments)).data
        from_cli.setup()
        assert _split_of(from_cli) == splits[0]


def _folder_of(root: Path, name: str) -> Folder:
    return Folder(name=name, root=root, normal_dir="good", abnormal_dir="bad", val_split_mode="same_as_test")


def test_visualisations_that_would_share_a_file_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "camera_2"
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for relative in ("good/000.png", "good/001.png", "bad/line_a/part/000.png", "bad/line_b/part/000.png"):
        _write_png(root / relative, image)
    datamodule = FewShot(_folder_of(root, "new_camera"), k_shot=1)
    with caplog.at_level(logging.WARNING):
        datamodule.setup()
    assert "to the same file 'part/000.png'" in caplog.text
    assert str(root / "bad" / "line_a" / "part" / "000.png") in caplog.text

    caplog.clear()
    named = FewShot(_folder_of(root, "camera_2"), k_shot=1)
    with caplog.at_level(logging.WARNING):
        named.setup()
    assert "same file" not in caplog.text
