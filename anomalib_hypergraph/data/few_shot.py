r"""Few-shot sampling of normal training images, for any anomalib dataset or datamodule.

The few-shot protocol of the papers (REFERENCES 1.4): the k shots of a category are its first k normal training
files in sorted path order. Seeded random sampling is our option for reporting means over several shot draws
(REFERENCES 3).

- :func:`select_shots` picks k indices from a list of image paths,
- :func:`few_shot_subset` applies it to the normal images of an :class:`~anomalib.data.AnomalibDataset`,
- :class:`FewShot` wraps any anomalib datamodule (``MVTecAD``, ``Visa``, ``Folder``, ...) so that its training set
  is the k shots while validation and test stay those of the wrapped datamodule. It gives its seed to a wrapped
  datamodule that has none (so the wrapped datamodule's random splits repeat), decodes every image it will read once
  at setup and reads 16-bit images at full range (:mod:`.image_files`). From the anomalib command line::

      anomalib fit --model ... --data anomalib_hypergraph.data.FewShot --data.k_shot 2 \
          --data.datamodule anomalib.data.MVTecAD --data.datamodule.root ./datasets/MVTecAD \
          --data.datamodule.category bottle
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName
from anomalib.utils.path import generate_output_filename

from anomalib_hypergraph.data.image_files import check_images, common_folder, reads_full_range

logger = logging.getLogger(__name__)

ShotSelection = Literal["first", "random"]


def check_shot_arguments(k_shot: int, strategy: str) -> None:
    """Validate a shot count and a selection strategy (shared by the samplers and the datamodules' constructors).

    Raises:
        ValueError: ``k_shot`` is not an int >= 1, or ``strategy`` is not one of ``"first"``, ``"random"``.

    """
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 1:
        msg = f"k_shot must be an int >= 1 (the number of normal shots), got {k_shot!r}."
        raise ValueError(msg)
    if strategy not in get_args(ShotSelection):
        msg = f"shot selection strategy must be one of {get_args(ShotSelection)}, got {strategy!r}."
        raise ValueError(msg)


def select_shots(
    image_paths: Sequence[str],
    k_shot: int,
    *,
    strategy: ShotSelection = "first",
    seed: int | None = 0,
    location: str | None = None,
) -> list[int]:
    """Choose ``k_shot`` of ``image_paths`` as the few-shot training images.

    Args:
        image_paths: Paths of the candidate (normal) images.
        k_shot: Number of shots to choose.
        strategy: ``"first"``: the first ``k_shot`` paths in sorted order (the papers' protocol). ``"random"``: a
            uniform sample without replacement drawn with ``seed`` from the sorted paths, so the same seed gives the
            same shots whatever the order of ``image_paths``.
        seed: Seed of the ``"random"`` strategy (``None``: a fresh, non-reproducible draw). Unused by ``"first"``.
        location: Where the images were looked for, for the error message (default: their common folder).

    Returns:
        Indices into ``image_paths`` of the chosen images, ordered by their paths.

    Raises:
        ValueError: ``k_shot`` < 1, unknown ``strategy``, or fewer than ``k_shot`` images (the message says how many
            were found and where).

    """
    check_shot_arguments(k_shot, strategy)
    paths = [str(path) for path in image_paths]
    if k_shot > len(paths):
        where = location or common_folder(paths)
        msg = f"k_shot={k_shot} normal shots were requested, but only {len(paths)} normal images were found in {where}."
        raise ValueError(msg)
    sorted_indices = sorted(range(len(paths)), key=lambda index: paths[index])
    if strategy == "first":
        return sorted_indices[:k_shot]
    rng = np.random.default_rng(seed)
    positions = rng.choice(len(sorted_indices), size=k_shot, replace=False)
    return [sorted_indices[position] for position in sorted(positions.tolist())]


def dataset_location(dataset: AnomalibDataset) -> str:
    """Describe where a dataset is for error messages: its name and the common folder of the user's files.

    The user's files are the images, or for datasets that read derived images (the depth images our MVTec 3D-AD
    datasets render into a cache) the files they were made from (the ``source_path`` column).
    """
    samples = dataset.samples
    column = "source_path" if "source_path" in samples.columns else "image_path"
    paths = samples[column].astype(str).tolist() if len(samples) else []
    return f"the {dataset.name} dataset under '{common_folder(paths)}'"


def normal_positions(dataset: AnomalibDataset) -> np.ndarray:
    """Return the row positions of the normal (label 0) samples of ``dataset``.

    Raises:
        ValueError: The samples have no ``label_index`` column (labels unknown, e.g. a prediction folder).

    """
    if "label_index" not in dataset.samples.columns:
        msg = f"Cannot pick normal images from {dataset_location(dataset)}: its samples have no 'label_index' column."
        raise ValueError(msg)
    return np.flatnonzero(dataset.samples["label_index"].to_numpy() == LabelName.NORMAL)


def few_shot_subset(
    dataset: AnomalibDataset,
    k_shot: int,
    *,
    strategy: ShotSelection = "first",
    seed: int | None = 0,
) -> AnomalibDataset:
    """Copy ``dataset`` keeping only ``k_shot`` of its normal (label 0) images.

    The subset is made with ``dataset.subsample``, so it is of the dataset's own class and keeps its task and
    augmentations. The chosen files are logged (``logger.info``); the subset's ``samples["image_path"]`` lists them
    (sorted by path, as anomalib sorts samples), which is what :attr:`FewShot.shots` reports.

    Args:
        dataset: Dataset whose normal images are the candidates.
        k_shot: Number of shots.
        strategy: See :func:`select_shots`.
        seed: See :func:`select_shots`.

    Returns:
        The subset of the ``k_shot`` chosen normal images.

    Raises:
        ValueError: Bad ``k_shot``/``strategy``, no labels, or fewer than ``k_shot`` normal images.

    """
    positions = normal_positions(dataset)
    candidate_paths = dataset.samples["image_path"].iloc[positions].astype(str).tolist()
    chosen = select_shots(candidate_paths, k_shot, strategy=strategy, seed=seed, location=dataset_location(dataset))
    subset = dataset.subsample([int(positions[index]) for index in chosen])
    logger.info(
        "Few-shot training set (%d-shot, %s selection, seed %s) of %s: %s",
        k_shot,
        strategy,
        seed,
        dataset_location(dataset),
        ", ".join(subset.samples["image_path"].astype(str)),
    )
    return subset


def describe_datamodule(datamodule: AnomalibDataModule) -> str:
    """'Where' of a datamodule for messages: class, root and category when it has them."""
    details = [f"{key}='{value}'" for key in ("root", "category") if (value := getattr(datamodule, key, None))]
    return f"{type(datamodule).__name__}({', '.join(details)})"


def share_seed(datamodule: AnomalibDataModule, seed: int, role: str) -> None:
    """Give a wrapped datamodule without a seed (``seed=None``) the wrapper's seed, for its own random splits.

    anomalib datamodules split with ``seed``: e.g. a ``Folder`` without normal test images moves a random part of its
    normal training images into the test set. With ``seed=None`` that part changes on every run, and with it the shots
    and the test set; a seed set on the wrapped datamodule itself is kept.
    """
    if getattr(datamodule, "seed", None) is None:
        datamodule.seed = seed
        logger.info(
            "The %s datamodule %s has no seed: its random splits use seed %d, so they are the same on every run.",
            role,
            describe_datamodule(datamodule),
            seed,
        )


def warn_about_shared_output_files(dataset: AnomalibDataset, name: str, category: str | None) -> None:
    """Warn when anomalib would write the visualisations of two of the ``dataset``'s images to one file.

    anomalib's visualizer (``generate_output_filename``) keeps an image's path below the first folder named like the
    datamodule (``name``, then ``category``); without such a folder it keeps the image's last folder only, so images of
    equal names in different sub-folders would overwrite each other's visualisation.
    """
    seen: dict[Path, str] = {}
    for image_path in dataset.samples["image_path"].astype(str):
        output = generate_output_filename(image_path, "", name, category, mkdir=False)
        if output in seen:
            logger.warning(
                "anomalib would write the visualisations of '%s' and '%s' to the same file '%s': the images lie below "
                "no folder named like the datamodule ('%s'). Give the datamodule the name of a folder of its image "
                "paths to keep them apart.",
                seen[output],
                image_path,
                output,
                name,
            )
            return
        seen[output] = image_path


class FewShot(AnomalibDataModule):
    """Any anomalib datamodule, with its training set reduced to k normal shots.

    Validation and test data are the wrapped datamodule's, split as the wrapped datamodule splits them (its
    ``val_split_mode`` etc. apply); batch sizes, workers and augmentations are the wrapped datamodule's too. ``name``
    and ``category`` are forwarded, so results and visualisations land where the wrapped datamodule would put them.
    At setup every image (and mask) the shots, validation and test sets hold is decoded once: an unreadable or
    truncated file fails there, with its name; 16-bit images are read at full range (see
    :mod:`~anomalib_hypergraph.data.image_files`).

    Args:
        datamodule: The datamodule to take the shots from.
        k_shot: Number of normal training images kept.
        shot_selection: ``"first"`` (first k in sorted path order, the papers' protocol) or ``"random"`` (seeded).
        seed: Seed of the ``"random"`` selection, and of the wrapped datamodule's own random splits when it has no
            seed (``seed=None``), so that the same arguments and seed give the same shots and test set on every run.

    Attributes:
        shots: Paths of the chosen training images (after ``setup``), sorted.

    """

    wrapped_role = "wrapped"

    def __init__(
        self,
        datamodule: AnomalibDataModule,
        k_shot: int = 1,
        shot_selection: ShotSelection = "first",
        seed: int = 0,
    ) -> None:
        check_shot_arguments(k_shot, shot_selection)
        super().__init__(
            train_batch_size=datamodule.train_batch_size,
            eval_batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            train_augmentations=datamodule.train_augmentations,
            val_augmentations=datamodule.val_augmentations,
            test_augmentations=datamodule.test_augmentations,
            seed=seed,
        )
        share_seed(datamodule, seed, self.wrapped_role)
        self.datamodule = datamodule
        self.k_shot = k_shot
        self.shot_selection = shot_selection
        self.shots: list[str] = []

    @property
    def name(self) -> str:
        """Name of the wrapped datamodule (anomalib derives result and visualisation paths from it)."""
        return self.datamodule.name

    @property
    def category(self) -> str:
        """Category of the wrapped datamodule."""
        return self.datamodule.category

    @category.setter
    def category(self, category: str) -> None:
        self.datamodule.category = category

    def prepare_data(self) -> None:
        """Let the wrapped datamodule prepare (e.g. download) its data."""
        self.datamodule.prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        """Set up the wrapped datamodule, keep k shots of its training set, check every image that will be read."""
        self.datamodule.setup(_stage)
        train_data = self.datamodule.train_data
        if len(normal_positions(train_data)) == 0:
            msg = (
                f"The {self.wrapped_role} datamodule {describe_datamodule(self.datamodule)} has no normal training "
                f"images to take shots from ({dataset_location(train_data)})."
            )
            raise ValueError(msg)
        self.train_data = few_shot_subset(train_data, self.k_shot, strategy=self.shot_selection, seed=self.seed)
        self.shots = self.train_data.samples["image_path"].astype(str).tolist()
        self.test_data = self.datamodule.test_data
        if hasattr(self.datamodule, "val_data"):
            self.val_data = self.datamodule.val_data
        # Our own datasets (MVTec 3D-AD, XYZ) check their files when they are built.
        check_images(
            {role: dataset for role, dataset in self.datasets_to_read().items() if not reads_full_range(dataset)}
        )
        warn_about_shared_output_files(self.test_data, self.name, self.category)

    def datasets_to_read(self) -> dict[str, AnomalibDataset | None]:
        """Return the datasets this datamodule's loaders read, by role (``None``: absent)."""
        return {"train": self.train_data, "test": self.test_data, "val": getattr(self, "val_data", None)}

    def _create_test_split(self) -> None:
        """Nothing to do: the wrapped datamodule has made its test split in its own ``setup``."""

    def _create_val_split(self) -> None:
        """Nothing to do: the wrapped datamodule has made its validation split in its own ``setup``."""
