"""The synthetic cross-domain dataset: layout, masks, RGB/XYZ correspondence, defects, determinism, folder safety."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_hypergraph.data.depth import read_xyz
from anomalib_hypergraph.data.synthetic import (
    DEFECT_MASK_THRESHOLD,
    DEFECT_TYPES,
    GEOMETRIC_DEFECT_TYPES,
    MARKER_FILE_NAME,
    SYNTHETIC_CATEGORIES,
    generate_synthetic_mvtec3d,
    main,
    render_synthetic_sample,
    sample_parameters,
)

SIZE = 64
TINY = {"num_train": 3, "num_validation": 1, "num_test_good": 2, "num_test_defect": 4, "image_size": SIZE}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_mvtec3d(tmp_path_factory.mktemp("synthetic") / "data", seed=3, **TINY)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_layout_and_counts(dataset: Path) -> None:
    expected = {("train", "good"): 3, ("validation", "good"): 1, ("test", "good"): 2}
    expected.update({("test", kind): 1 for kind in DEFECT_TYPES})
    for category in SYNTHETIC_CATEGORIES:
        labels = {(split.name, label.name) for split in (dataset / category).iterdir() for label in split.iterdir()}
        assert labels == set(expected)
        for (split, label), count in expected.items():
            folder = dataset / category / split / label
            names = [f"{index:03d}" for index in range(count)]
            assert sorted(path.stem for path in (folder / "rgb").glob("*.png")) == names
            assert sorted(path.stem for path in (folder / "xyz").glob("*.tiff")) == names
            assert sorted(path.stem for path in (folder / "gt").glob("*.png")) == names
    marker = json.loads((dataset / MARKER_FILE_NAME).read_text())
    assert marker["complete"] is True
    assert marker["parameters"]["seed"] == 3


def test_masks_agree_with_labels(dataset: Path) -> None:
    for mask_path in dataset.rglob("gt/*.png"):
        mask = np.asarray(Image.open(mask_path))
        rgb = np.asarray(Image.open(mask_path.parent.parent / "rgb" / mask_path.name))
        assert mask.dtype == np.uint8
        assert mask.shape == rgb.shape[:2] == (SIZE, SIZE)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        is_good = mask_path.parent.parent.name == "good"
        assert (mask.max() == 0) == is_good, mask_path


def test_xyz_clouds_are_float32_with_exact_zero_holes(dataset: Path) -> None:
    holes_seen = 0
    for xyz_path in (dataset / "dome").rglob("xyz/*.tiff"):
        cloud = read_xyz(xyz_path)
        assert cloud.shape == (SIZE, SIZE, 3)
        assert cloud.dtype == np.float32
        holes = np.all(cloud == 0, axis=-1)
        assert holes.mean() < 0.2
        # A hole is (0, 0, 0); a measured point has a Z on or above the background plane (~0.3 m).
        assert np.all(cloud[~holes][:, 2] > 0.25)
        holes_seen += int(holes.sum())
    assert holes_seen > 0


def _height_above_plane(cloud: np.ndarray) -> np.ndarray:
    """Z minus a least-squares plane through the valid points of the image border (the support the object is on)."""
    valid = np.any(cloud != 0, axis=-1)
    border = np.zeros_like(valid)
    border[:3], border[-3:], border[:, :3], border[:, -3:] = True, True, True, True
    points = cloud[valid & border].astype(np.float64)
    design = np.column_stack([points[:, 0], points[:, 1], np.ones(len(points))])
    coefficients, *_ = np.linalg.lstsq(design, points[:, 2], rcond=None)
    plane = cloud[..., 0] * coefficients[0] + cloud[..., 1] * coefficients[1] + coefficients[2]
    return np.where(valid, cloud[..., 2] - plane, np.nan)


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_rgb_silhouette_matches_the_raised_region_of_the_cloud(category: str) -> None:
    sample = render_synthetic_sample(sample_parameters(category, None, np.random.default_rng(11)), 96)
    height = _height_above_plane(sample.xyz)
    valid = ~np.isnan(height)
    raised = np.nan_to_num(height) > 0.002
    # The object is coloured, the support under it is grey: chroma marks the object in RGB.
    rgb = sample.rgb.astype(np.int16)
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 25
    intersection = (raised & coloured & valid).sum()
    union = ((raised | coloured) & valid).sum()
    assert raised.sum() > 0.15 * valid.sum()
    assert intersection / union > 0.85


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_contamination_changes_rgb_inside_the_mask_only_and_never_xyz(category: str) -> None:
    parameters = sample_parameters(category, "contamination", np.random.default_rng(5))
    dirty = render_synthetic_sample(parameters, SIZE)
    clean = render_synthetic_sample(dataclasses.replace(parameters, defect=None), SIZE)
    inside = dirty.mask == 255
    assert inside.sum() > 20
    np.testing.assert_array_equal(dirty.xyz, clean.xyz)
    np.testing.assert_array_equal(dirty.rgb[~inside], clean.rgb[~inside])
    difference = np.abs(dirty.rgb.astype(np.int16) - clean.rgb.astype(np.int16)).max(axis=-1)
    assert difference[inside].mean() > 20
    assert clean.mask.max() == 0


@pytest.mark.parametrize("kind", GEOMETRIC_DEFECT_TYPES)
@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_geometric_defects_change_the_cloud_exactly_inside_the_mask(category: str, kind: str) -> None:
    parameters = sample_parameters(category, kind, np.random.default_rng(7))
    defective = render_synthetic_sample(parameters, SIZE)
    clean = render_synthetic_sample(dataclasses.replace(parameters, defect=None), SIZE)
    inside = defective.mask == 255
    valid = np.any(clean.xyz != 0, axis=-1)
    np.testing.assert_array_equal(valid, np.any(defective.xyz != 0, axis=-1))  # same scanner holes
    np.testing.assert_array_equal(defective.xyz[..., :2], clean.xyz[..., :2])  # same X, Y grid
    change = defective.xyz[..., 2].astype(np.float64) - clean.xyz[..., 2]
    assert np.all(np.abs(change[inside & valid]) > DEFECT_MASK_THRESHOLD - 1e-6)
    assert np.all(np.abs(change[~inside]) <= DEFECT_MASK_THRESHOLD + 1e-6)
    sign = -1 if kind in ("dent", "crack") else 1
    assert np.all(sign * change[inside & valid] > 0)
    # A few per cent of the object, visible in RGB too (through the shading).
    object_area = (np.nan_to_num(_height_above_plane(clean.xyz)) > 0.002).sum()
    assert 0.003 < inside.sum() / object_area < 0.15
    assert np.any(defective.rgb[inside] != clean.rgb[inside])


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    options = {**TINY, "categories": ["tile"], "num_train": 2}
    first = files(generate_synthetic_mvtec3d(tmp_path / "a", seed=1, **options))
    second = files(generate_synthetic_mvtec3d(tmp_path / "b", seed=1, **options))
    other = files(generate_synthetic_mvtec3d(tmp_path / "c", seed=2, **options))
    assert first == second
    assert first.keys() == other.keys()
    images = [name for name in first if name.endswith(".tiff") or "/rgb/" in name]
    assert all(first[name] != other[name] for name in images)


def test_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "my_photos"
    foreign.mkdir()
    (foreign / "holiday.png").write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"my_photos.*not empty.*marker"):
            generate_synthetic_mvtec3d(foreign, categories=["dome"], overwrite=overwrite, **TINY)
    assert [path.name for path in foreign.iterdir()] == ["holiday.png"]
    assert (foreign / "holiday.png").read_bytes() == b"precious"


def test_reuses_regenerates_and_overwrites_its_own_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_synthetic_mvtec3d(root, categories=["disc"], seed=0, **TINY)
    sentinel = root / "disc" / "sentinel.txt"
    sentinel.write_text("still here")
    # Same parameters: reused, nothing is rewritten.
    generate_synthetic_mvtec3d(root, categories=["disc"], seed=0, **TINY)
    assert sentinel.exists()
    # Other parameters: the folder is ours (marker), so it is regenerated with the new ones.
    before = (root / "disc" / "test" / "good" / "rgb" / "000.png").read_bytes()
    generate_synthetic_mvtec3d(root, categories=["disc"], seed=4, **TINY)
    assert not sentinel.exists()
    assert (root / "disc" / "test" / "good" / "rgb" / "000.png").read_bytes() != before
    assert json.loads((root / MARKER_FILE_NAME).read_text())["parameters"]["seed"] == 4
    # overwrite=True regenerates even with the same parameters.
    sentinel.write_text("still here")
    generate_synthetic_mvtec3d(root, categories=["disc"], seed=4, overwrite=True, **TINY)
    assert not sentinel.exists()


def test_an_interrupted_generation_is_redone(tmp_path: Path) -> None:
    root = generate_synthetic_mvtec3d(tmp_path / "data", categories=["ridges"], **TINY)
    marker = root / MARKER_FILE_NAME
    content = json.loads(marker.read_text())
    marker.write_text(json.dumps({**content, "complete": False}))
    (root / "ridges" / "train" / "good" / "rgb" / "000.png").unlink()
    generate_synthetic_mvtec3d(root, categories=["ridges"], **TINY)
    assert (root / "ridges" / "train" / "good" / "rgb" / "000.png").is_file()
    assert json.loads(marker.read_text())["complete"] is True


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown synthetic category 'bagel'"):
        generate_synthetic_mvtec3d(tmp_path / "a", categories=["bagel"])
    with pytest.raises(ValueError, match="num_test_defect"):
        generate_synthetic_mvtec3d(tmp_path / "a", num_test_defect=-1)
    with pytest.raises(ValueError, match="Unknown synthetic defect type 'scratch'"):
        sample_parameters("dome", "scratch", np.random.default_rng(0))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file"):
        generate_synthetic_mvtec3d(tmp_path / "a_file")
    assert not (tmp_path / "a").exists()


def test_command_line(tmp_path: Path) -> None:
    root = tmp_path / "cli"
    args = ["--root", str(root), "--categories", "dome", "tile", "--num-train", "2", "--num-validation", "1"]
    args += ["--num-test-good", "1", "--num-test-defect", "2", "--image-size", "32", "--seed", "9"]
    assert main(args) == root
    assert sorted(path.name for path in root.iterdir() if path.is_dir()) == ["dome", "tile"]
    assert sorted(path.name for path in (root / "tile" / "test").iterdir()) == ["bump", "dent", "good"]
    assert np.asarray(Image.open(root / "dome" / "train" / "good" / "rgb" / "001.png")).shape == (32, 32, 3)
