"""MVTec 3D-AD layout (REFERENCES 1.4): samples, dataset and datamodules of one domain or a pair of domains.

- :class:`MVTec3DDomain` reads one domain (``rgb`` or ``depth``) of an MVTec 3D-AD category (the real dataset or the
  synthetic one of :mod:`anomalib_hypergraph.data.synthetic`) as a plain anomalib datamodule;
- :class:`MVTec3DCrossDomain` pairs two domains of a category (the paper's protocol: RGB source, depth target) as a
  :class:`~anomalib_hypergraph.data.CrossDomainDataModule`.

Depth images are rendered from the ``xyz`` tiffs into a cache outside the dataset (the dataset is never written to),
by default in::

    <root>/../.anomalib_hypergraph_cache/<root name>/<category>/<split>/<label>/depth/NNN.png

(``cache_dir`` replaces ``<root>/../.anomalib_hypergraph_cache``; see :mod:`~anomalib_hypergraph.data.depth_cache`).
So ``anomalib predict --data <cache>/<root name>/<category>/test/<label>/depth`` feeds a model exactly the pixels it
was tested on, and :class:`~anomalib_hypergraph.data.XYZFolder` renders identical pixels. When a ground-truth mask's
size differs from its depth image's (``depth_size`` set), a nearest-neighbour resized copy is cached beside it
(``<label>/gt/NNN.png``), so masks always have the image's resolution.
"""

from pathlib import Path
from typing import Literal, get_args

import pandas as pd
from anomalib.data import AnomalibDataModule
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from PIL import Image
from torchvision.transforms.v2 import Transform

from anomalib_hypergraph.data.cross_domain import CrossDomainDataModule
from anomalib_hypergraph.data.depth import XYZ_EXTENSIONS
from anomalib_hypergraph.data.depth_cache import DepthCache, category_cache_dir
from anomalib_hypergraph.data.few_shot import ShotSelection
from anomalib_hypergraph.data.image_files import FullRangeImageDataset, check_images

Domain = Literal["rgb", "depth"]
NORMAL_LABEL = "good"


def check_domain(domain: str, argument: str) -> None:
    """Raise ``ValueError`` unless ``domain`` is ``"rgb"`` or ``"depth"``; ``argument`` names it in the message."""
    if domain not in get_args(Domain):
        msg = f"{argument} must be one of {get_args(Domain)}, got {domain!r}."
        raise ValueError(msg)


def _require_folder(path: Path, what: str, expected: str) -> None:
    """Raise ``FileNotFoundError`` (missing) or ``NotADirectoryError`` (a file) unless ``path`` is a folder."""
    if path.is_dir():
        return
    if path.exists():
        msg = f"{what} '{path}' is a file, not a folder (expected {expected})."
        raise NotADirectoryError(msg)
    msg = f"{what} '{path}' does not exist (expected {expected})."
    raise FileNotFoundError(msg)


def list_categories(root: Path) -> list[str]:
    """Sub-folders of an MVTec 3D-AD root that look like categories (they hold a ``train`` or ``test`` folder)."""
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and ((entry / "train").is_dir() or (entry / "test").is_dir())
    )


def check_mvtec3d_category(root: str | Path, category: str) -> Path:
    """Return the category folder ``root/category`` after checking it exists.

    Raises:
        FileNotFoundError: ``root`` is missing, or ``category`` is not in it (the message lists the categories found).
        NotADirectoryError: ``root`` or ``root/category`` is a file.

    """
    root = Path(root)
    _require_folder(root, "MVTec 3D-AD root folder", "a folder <root>/<category>/train/good/...")
    category_folder = root / category
    if category_folder.exists() and not category_folder.is_dir():
        msg = f"MVTec 3D-AD category '{category_folder}' is a file, not a folder (expected <category>/train/good/...)."
        raise NotADirectoryError(msg)
    if not category_folder.is_dir():
        msg = f"Category '{category}' not found in '{root}'; categories found: {list_categories(root)}."
        raise FileNotFoundError(msg)
    return category_folder


def make_mvtec3d_domain_samples(
    category_folder: Path, split: str, domain: Domain, cache: DepthCache | None = None
) -> pd.DataFrame:
    """Build the samples DataFrame of one split of an MVTec 3D-AD category, seen in one domain.

    Every ``<split>/<label>/`` folder is read: ``rgb/*.png`` for the RGB domain, ``xyz/*.tiff`` (rendered through
    ``cache``) for the depth domain. ``label_index`` is 0 for ``good`` and 1 otherwise. ``mask_path`` is
    ``<label>/gt/<stem>.png`` when that file exists (resized through ``cache`` to the depth image's size if needed);
    it is ``""`` for normal training images and for normal images without a mask file (anomalib gives normal images
    an all-zero mask and never reads their mask file).

    Raises:
        FileNotFoundError: The split folder is missing, a label folder has no images of the domain, or an anomalous
            image has no mask (the message names the expected file).
        NotADirectoryError: The split folder is a file.
        XYZFormatError: A point cloud is not valid (the message names the file).

    """
    split_folder = category_folder / split
    _require_folder(split_folder, "MVTec 3D-AD split folder", "a folder <split>/<label>/{rgb,xyz,gt}")
    image_folder_name = "rgb" if domain == "rgb" else "xyz"
    extensions = (".png",) if domain == "rgb" else XYZ_EXTENSIONS
    rows = []
    for label_folder in sorted(entry for entry in split_folder.iterdir() if entry.is_dir()):
        image_folder = label_folder / image_folder_name
        files = sorted(path for path in image_folder.glob("*") if path.suffix.lower() in extensions)
        if not files:
            msg = f"No {domain} images ({'/'.join(extensions)}) found in '{image_folder}'."
            raise FileNotFoundError(msg)
        label = label_folder.name
        label_index = LabelName.NORMAL if label == NORMAL_LABEL else LabelName.ABNORMAL
        for source_path in files:
            image_path = source_path
            if domain == "depth":
                if cache is None:
                    msg = "The depth domain needs a DepthCache to render the xyz point clouds into."
                    raise ValueError(msg)
                image_path = cache.depth_image(source_path, f"{split}/{label}/depth/{source_path.stem}.png")
            mask_path = label_folder / "gt" / f"{source_path.stem}.png"
            if label_index == LabelName.NORMAL and split == Split.TRAIN.value:
                mask = ""  # normal training images have no mask in anomalib (it never reads one for label 0)
            elif mask_path.is_file():
                if cache is not None:
                    with Image.open(image_path) as image:
                        image_size = image.size
                    mask_path = cache.mask_of_size(mask_path, image_size, f"{split}/{label}/gt/{source_path.stem}.png")
                mask = str(mask_path)
            elif label_index == LabelName.NORMAL:
                mask = ""
            else:
                msg = f"Ground-truth mask '{mask_path}' of the anomalous image '{source_path}' does not exist."
                raise FileNotFoundError(msg)
            rows.append(
                {
                    "path": str(category_folder),
                    "split": split,
                    "label": label,
                    "image_path": str(image_path),
                    "mask_path": mask,
                    "label_index": int(label_index),
                    "source_path": str(source_path),
                }
            )
    if cache is not None:
        cache.flush()
    if not rows:
        msg = f"No image folders found in '{split_folder}' (expected <label>/{image_folder_name}/...)."
        raise FileNotFoundError(msg)
    samples = pd.DataFrame(rows)
    # MVTec 3D-AD gives every anomalous image a mask (checked above): the task is segmentation on every split.
    samples.attrs["task"] = "segmentation"
    return samples


class MVTec3DDomainDataset(FullRangeImageDataset):
    """One split of an MVTec 3D-AD category in one domain (RGB images, or depth images rendered from ``xyz``).

    The samples DataFrame has anomalib's columns (``image_path``, ``mask_path``, ``label_index``, ``split``, ...) plus
    ``source_path`` (the rgb png or xyz tiff the image comes from); depth ``image_path`` values are cached PNGs. Every
    image and mask is decoded once when the dataset is built; 16-bit images are read at full range (see
    :mod:`~anomalib_hypergraph.data.image_files`).

    Args:
        root: Dataset root (``<root>/<category>/<split>/<label>/{rgb,xyz,gt}``).
        category: Category folder name.
        domain: ``"rgb"`` or ``"depth"``.
        split: ``"train"`` or ``"test"`` (or any split folder, e.g. ``"validation"``).
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render depth with background-plane removal.
        cache_dir: Base folder of the depth cache (``None``: next to ``root``; see
            :func:`~anomalib_hypergraph.data.depth_cache.category_cache_dir`).
        augmentations: anomalib augmentations.

    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        domain: Domain,
        split: str | Split,
        *,
        depth_size: int | None = None,
        remove_background: bool = False,
        cache_dir: str | Path | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        check_domain(domain, "domain")
        split = split.value if isinstance(split, Split) else split
        category_folder = check_mvtec3d_category(root, category)
        cache = (
            DepthCache(category_cache_dir(root, category, cache_dir), depth_size, remove_background, protected=root)
            if domain == "depth"
            else None
        )
        self.root = Path(root)
        self.domain = domain
        self.split = split
        self.category = category
        self.samples = make_mvtec3d_domain_samples(category_folder, split, domain, cache)
        check_images({f"{split} {domain}": self})


class MVTec3DDomain(AnomalibDataModule):
    """One domain of an MVTec 3D-AD category as a plain anomalib datamodule (train = train/good, test = test/*).

    Usable on its own (e.g. ``FewShot(MVTec3DDomain(domain="depth"))`` or a depth-only baseline) and as either side
    of :class:`MVTec3DCrossDomain`. ``name`` is the root folder's name (e.g. ``MVTec3D``), as for anomalib's own
    ``MVTec3D``: anomalib finds it in the image paths to give visualisations unique file names.

    Args:
        root: Dataset root.
        category: Category folder name.
        domain: ``"rgb"`` or ``"depth"``.
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render depth with background-plane removal.
        cache_dir: Base folder of the depth cache (``None``: ``<root>/../.anomalib_hypergraph_cache``).
        train_batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: Loader workers.
        train_augmentations: Augmentations of the training images.
        val_augmentations: Augmentations of the validation images.
        test_augmentations: Augmentations of the test images.
        augmentations: Augmentations of any split without its own.
        val_split_mode: As anomalib (default: the test set, as anomalib's ``MVTec3D``).
        val_split_ratio: As anomalib.
        seed: Seed of anomalib's random splits.

    """

    def __init__(
        self,
        root: str | Path = "./datasets/MVTec3D",
        category: str = "bagel",
        *,
        domain: Domain = "depth",
        depth_size: int | None = None,
        remove_background: bool = False,
        cache_dir: str | Path | None = None,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        check_domain(domain, "domain")
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=TestSplitMode.FROM_DIR,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.root = Path(root)
        self.category = category
        self.domain = domain
        self.depth_size = depth_size
        self.remove_background = remove_background
        self.cache_dir = cache_dir

    @property
    def name(self) -> str:
        """The dataset root folder's name (it appears in every image path, cached depth images included)."""
        return self.root.resolve().name

    def make_dataset(self, split: Split) -> MVTec3DDomainDataset:
        """Read (and for depth, render) one split of the category in this datamodule's domain."""
        return MVTec3DDomainDataset(
            root=self.root,
            category=self.category,
            domain=self.domain,
            split=split,
            depth_size=self.depth_size,
            remove_background=self.remove_background,
            cache_dir=self.cache_dir,
        )

    def _setup(self, _stage: str | None = None) -> None:
        """Read (and for depth, render) the train and test splits."""
        self.train_data = self.make_dataset(Split.TRAIN)
        self.test_data = self.make_dataset(Split.TEST)


class MVTec3DCrossDomain(CrossDomainDataModule):
    """Cross-domain few-shot on an MVTec 3D-AD category (REFERENCES 1.4): e.g. RGB source, k depth shots.

    Source: every ``train/good`` image in ``source_domain``; target: k ``train/good`` shots in ``target_domain``;
    validation/test: the ``test`` split in ``target_domain`` with its ground-truth masks. Works on the real dataset and
    on :func:`~anomalib_hypergraph.data.synthetic.generate_synthetic_mvtec3d` output. Depth images are cached outside
    the dataset (see the module docstring). The ``validation`` folder (normal images only) is not used. Every sample
    of MVTec 3D-AD holds both sensors (``rgb/NNN.png`` and ``xyz/NNN.tiff``, pixel-aligned), so by default each target
    shot comes with the same sample's image in the source domain (``pair_shots``, see
    :class:`~anomalib_hypergraph.data.CrossDomainDataModule`).

    Args:
        root: Dataset root (``<root>/<category>/{train,validation,test}/<label>/{rgb,xyz,gt}``).
        category: Category folder name.
        source_domain: ``"rgb"`` or ``"depth"``.
        target_domain: ``"rgb"`` or ``"depth"``, not ``source_domain``.
        k_shot: Number of target shots.
        shot_selection: ``"first"`` (first k sorted, the paper's protocol) or ``"random"`` (seeded).
        seed: Seed of the shot selection and of anomalib's random validation splits.
        pair_shots: Give every target shot the same sample's source-domain image (``PAIRED_SOURCE`` loader).
        depth_size: Side of the rendered depth images (``None``: the tiff's resolution).
        remove_background: Render depth with background-plane removal.
        cache_dir: Base folder of the depth cache (``None``: ``<root>/../.anomalib_hypergraph_cache``).
        train_batch_size: Batch size of the training loaders.
        eval_batch_size: Validation/test batch size.
        num_workers: Loader workers.
        val_split_mode: As anomalib (default: the test set, as anomalib's ``MVTec3D``).
        val_split_ratio: As anomalib.

    Raises:
        ValueError: A domain is not ``"rgb"``/``"depth"``, or both domains are the same.

    """

    def __init__(
        self,
        root: str | Path = "./datasets/MVTec3D",
        category: str = "bagel",
        *,
        source_domain: Domain = "rgb",
        target_domain: Domain = "depth",
        k_shot: int = 1,
        shot_selection: ShotSelection = "first",
        seed: int = 0,
        pair_shots: bool = True,
        depth_size: int | None = None,
        remove_background: bool = False,
        cache_dir: str | Path | None = None,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
    ) -> None:
        check_domain(source_domain, "source_domain")
        check_domain(target_domain, "target_domain")
        if source_domain == target_domain:
            msg = (
                f"source_domain and target_domain are both {source_domain!r}; a cross-domain pair needs two domains "
                "(e.g. source_domain='rgb', target_domain='depth'). For one domain, use "
                f"FewShot(MVTec3DDomain(domain={target_domain!r}))."
            )
            raise ValueError(msg)
        shared = {
            "root": root,
            "category": category,
            "depth_size": depth_size,
            "remove_background": remove_background,
            "cache_dir": cache_dir,
            "train_batch_size": train_batch_size,
            "eval_batch_size": eval_batch_size,
            "num_workers": num_workers,
            "seed": seed,
        }
        super().__init__(
            source=MVTec3DDomain(domain=source_domain, val_split_mode=ValSplitMode.NONE, **shared),
            target=MVTec3DDomain(
                domain=target_domain, val_split_mode=val_split_mode, val_split_ratio=val_split_ratio, **shared
            ),
            k_shot=k_shot,
            shot_selection=shot_selection,
            seed=seed,
            pair_shots=pair_shots,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
        )
        self.root = Path(root)
        self.source_domain = source_domain
        self.target_domain = target_domain

    def _setup_source(self, stage: str | None) -> None:
        """Read only the source domain's training split (its test split is never used, so never rendered)."""
        del stage  # the source split is read the same way whatever the stage
        self.source.train_data = self.source.make_dataset(Split.TRAIN)
