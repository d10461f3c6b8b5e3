"""Cross-domain few-shot datamodule (REFERENCES 1): plenty of source-domain normals, k target-domain shots.

:class:`CrossDomainDataModule` pairs any two anomalib datamodules (e.g. two ``Folder`` datamodules: images of the old
camera as source, of the new camera as target). It is a :class:`~anomalib_hypergraph.data.FewShot` of the target
datamodule (shots, validation and test, ``name``/``category``, seed sharing, image checks) with a source datamodule
beside it. Training batches follow the contract of :mod:`~anomalib_hypergraph.data.domains`: a dict
``{SOURCE: DataLoader, TARGET: DataLoader}``; validation, test and prediction batches are the target domain's test
images with their masks. :class:`~anomalib_hypergraph.data.MVTec3DCrossDomain` is the MVTec 3D-AD special case.

Paired shots (``pair_shots=True``): in a sensor upgrade the first parts are usually captured by both sensors, and a
model can learn from such pairs how the new sensor sees what the old one saw. Each target shot is then paired with
the source training image at the same relative path (relative to the common folder of each datamodule's normal
training images, e.g. ``new_camera/good/007.png`` with ``old_camera/good/007.png``), and ``train_dataloader()`` adds
the ``PAIRED_SOURCE`` loader of :mod:`~anomalib_hypergraph.data.domains`.
"""

import logging
import os
from collections.abc import Mapping, Sequence

from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.utils.attrs import get_nested_attr
from torch.utils.data import DataLoader

from anomalib_hypergraph.data.domains import PAIRED_SOURCE, SOURCE, TARGET
from anomalib_hypergraph.data.few_shot import (
    FewShot,
    ShotSelection,
    dataset_location,
    describe_datamodule,
    normal_positions,
    share_seed,
)
from anomalib_hypergraph.data.image_files import common_folder

logger = logging.getLogger(__name__)


def relative_keys(paths: Sequence[str], folder: str) -> list[str]:
    """Each path relative to ``folder``, with ``/`` separators: the key that pairs images of two sensors."""
    return [os.path.relpath(os.path.abspath(path), folder).replace(os.sep, "/") for path in paths]


def pair_positions(
    target_paths: Sequence[str], target_folder: str, source_paths: Sequence[str], source_folder: str
) -> list[int]:
    """Position in ``source_paths`` of the image paired with each of ``target_paths`` (same path below its folder).

    Raises:
        ValueError: A target image has no source image at the same relative path (the message names them all).

    """
    source_by_key = {key: position for position, key in enumerate(relative_keys(source_paths, source_folder))}
    target_keys = relative_keys(target_paths, target_folder)
    unmatched = [
        f"{path} (looked for '{key}')"
        for path, key in zip(target_paths, target_keys, strict=True)
        if key not in source_by_key
    ]
    if unmatched:
        msg = (
            f"pair_shots=True, but {len(unmatched)} target shot(s) have no source training image at the same path "
            f"below '{source_folder}': {', '.join(unmatched)}. Pairs are matched by the path below the common folder "
            f"of each datamodule's normal training images (target: '{target_folder}'); give the paired captures the "
            "same file names and sub-folders, or set pair_shots=False."
        )
        raise ValueError(msg)
    return [source_by_key[key] for key in target_keys]


class CrossDomainDataModule(FewShot):
    """Pair of anomalib datamodules: all normal training images of ``source``, k normal shots of ``target``.

    Training: ``train_dataloader()`` returns ``{"source": DataLoader, "target": DataLoader}`` over
    :attr:`source_train_data` (every normal training image of ``source``) and :attr:`target_train_data` (the k shots;
    also ``train_data``). Validation and test are ``target``'s, split as ``target`` splits them. ``name`` and
    ``category`` are ``target``'s. The wrapped datamodules' own batch sizes and worker counts are not used: this
    datamodule's apply to every loader. ``source``'s training augmentations apply to the source images, ``target``'s
    to the rest. A wrapped datamodule without a seed gets ``seed`` for its random splits; every image that will be
    read is decoded once at setup (see :class:`~anomalib_hypergraph.data.FewShot`).

    Args:
        source: Datamodule of the source domain (plenty of normal images).
        target: Datamodule of the target domain (shots from its training set; val/test from it).
        k_shot: Number of target shots.
        shot_selection: ``"first"`` (first k in sorted path order, the papers' protocol) or ``"random"`` (seeded).
        seed: Seed of the ``"random"`` selection (and of the wrapped datamodules' splits when they have none).
        pair_shots: Pair every target shot with the source training image at the same relative path (see the module
            docstring) and add the ``PAIRED_SOURCE`` training loader.
        train_batch_size: Batch size of the training loaders.
        eval_batch_size: Batch size of the validation, test and prediction loaders.
        num_workers: Workers of every loader.

    Attributes:
        shots: Paths of the chosen target images (after ``setup``), sorted.
        paired_source_data: With ``pair_shots``: the source captures of the shots, in the order of the shots.

    Raises:
        ValueError: ``source`` and ``target`` are the same datamodule; at setup, the source training images include
            images of the target (e.g. two datamodules of one folder, see :func:`check_domains_share_no_image`), or
            with ``pair_shots`` a shot has no paired source image.

    """

    wrapped_role = "target"

    def __init__(
        self,
        source: AnomalibDataModule,
        target: AnomalibDataModule,
        *,
        k_shot: int = 1,
        shot_selection: ShotSelection = "first",
        seed: int = 0,
        pair_shots: bool = False,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        if source is target:
            msg = (
                f"source and target are the same datamodule ({describe_datamodule(source)}); a cross-domain pair "
                "needs one datamodule per domain."
            )
            raise ValueError(msg)
        super().__init__(target, k_shot=k_shot, shot_selection=shot_selection, seed=seed)
        self.train_batch_size = train_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        share_seed(source, seed, "source")
        self.source = source
        self.source_augmentations = source.train_augmentations
        self.pair_shots = pair_shots
        self.source_train_data: AnomalibDataset
        self.target_train_data: AnomalibDataset
        self.paired_source_data: AnomalibDataset | None = None

    @property
    def target(self) -> AnomalibDataModule:
        """The target-domain datamodule (the one :class:`FewShot` takes the shots from)."""
        return self.datamodule

    def prepare_data(self) -> None:
        """Let both datamodules prepare (e.g. download) their data."""
        self.source.prepare_data()
        super().prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        """Keep every source normal, then set the target up as :class:`FewShot` does (k shots, val/test)."""
        self._setup_source(_stage)
        source_normals = normal_positions(self.source.train_data)
        if len(source_normals) == 0:
            msg = (
                f"The source datamodule {describe_datamodule(self.source)} has no normal training images "
                f"({dataset_location(self.source.train_data)})."
            )
            raise ValueError(msg)
        self.source_train_data = self.source.train_data.subsample(source_normals.tolist())
        super()._setup(_stage)
        check_domains_share_no_image(self.source, self.source_train_data, self.target, super().datasets_to_read())
        self.target_train_data = self.train_data
        if self.pair_shots:
            self.paired_source_data = self._pair_shots()

    def _pair_shots(self) -> AnomalibDataset:
        """Return the source captures of the target shots, row ``i`` paired with shot ``i`` (same relative path)."""
        target_normals = self.datamodule.train_data.samples["image_path"].iloc[
            normal_positions(self.datamodule.train_data)
        ]
        source_paths = self.source_train_data.samples["image_path"].astype(str).tolist()
        target_folder, source_folder = common_folder(target_normals.astype(str).tolist()), common_folder(source_paths)
        positions = pair_positions(self.shots, target_folder, source_paths, source_folder)
        # anomalib datasets keep their samples sorted by path; below a common folder that is the order of the
        # relative paths, the same for the shots and their captures, so the two unshuffled loaders stay in step.
        paired = self.source_train_data.subsample(positions)
        paired_paths = paired.samples["image_path"].astype(str).tolist()
        if relative_keys(paired_paths, source_folder) != relative_keys(self.shots, target_folder):
            msg = (
                "pair_shots=True: the source captures cannot be put in the order of the target shots "
                f"({self.shots} vs {paired_paths})."
            )
            raise RuntimeError(msg)
        if self.datamodule.train_augmentations is not None or self.source_augmentations is not None:
            logger.warning(
                "pair_shots=True with training augmentations: the paired shots and their source captures are read "
                "without them (random augmentations would break their pixel alignment)."
            )
        logger.info(
            "Paired shots (target <- source): %s",
            ", ".join(f"{t} <- {s}" for t, s in zip(self.shots, paired.samples["image_path"].astype(str), strict=True)),
        )
        return paired

    def _setup_source(self, stage: str | None) -> None:
        """Set up the source datamodule (only its ``train_data`` is used)."""
        self.source.setup(stage)

    def datasets_to_read(self) -> dict[str, AnomalibDataset | None]:
        """Return the source normals, then the target's datasets (see :meth:`FewShot.datasets_to_read`)."""
        return {"source": self.source_train_data, **super().datasets_to_read()}

    def _update_augmentations(self) -> None:
        """Give the source images their augmentations (plus the model's resize) as anomalib does for the others."""
        super()._update_augmentations()
        source_data = getattr(self, "source_train_data", None)
        if source_data is None:
            return
        model_transform = get_nested_attr(self, "trainer.model.pre_processor.transform", None)
        if model_transform:
            self._update_subset_augmentations(source_data, self.source_augmentations, model_transform)
        else:
            source_data.augmentations = self.source_augmentations
        if self.paired_source_data is not None:  # pixel-aligned pairs: no random augmentation on either side
            for dataset in (self.paired_source_data, self.target_train_data):
                if model_transform:
                    self._update_subset_augmentations(dataset, None, model_transform)
                else:
                    dataset.augmentations = None

    def _train_loader(self, dataset: AnomalibDataset, *, shuffle: bool = True) -> DataLoader:
        return DataLoader(
            dataset=dataset,
            shuffle=shuffle,
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or dataset.collate_fn,
        )

    def train_dataloader(self) -> dict[str, DataLoader]:
        """``{"source": all source normals, "target": the k target shots}``, both shuffled.

        With paired shots also ``"paired_source"``: their source captures; then neither the shots nor their pairs are
        shuffled, so that the two loaders stay in step (row ``i`` of one is the pair of row ``i`` of the other).
        """
        if self.paired_source_data is None:
            return {
                SOURCE: self._train_loader(self.source_train_data),
                TARGET: self._train_loader(self.target_train_data),
            }
        return {
            SOURCE: self._train_loader(self.source_train_data),
            TARGET: self._train_loader(self.target_train_data, shuffle=False),
            PAIRED_SOURCE: self._train_loader(self.paired_source_data, shuffle=False),
        }


def check_domains_share_no_image(
    source: AnomalibDataModule,
    source_images: AnomalibDataset,
    target: AnomalibDataModule,
    target_datasets: Mapping[str, AnomalibDataset | None],
) -> None:
    """Refuse a pair whose source training images include target images (the files, resolved, not the objects).

    Two datamodule objects of one folder (what every CLI config of a pair with equal roots makes) pass the identity
    check at construction; they would put the target shots into the source bank and the target's test images too.

    Raises:
        ValueError: a resolved file is both a source training image and a target shot, test or validation image.

    """
    source_files = {os.path.realpath(path) for path in source_images.samples["image_path"].astype(str)}
    for role, dataset in target_datasets.items():
        if dataset is None or len(dataset) == 0:
            continue
        shared = [path for path in dataset.samples["image_path"].astype(str) if os.path.realpath(path) in source_files]
        if shared:
            msg = (
                f"The source {describe_datamodule(source)} and the target {describe_datamodule(target)} read the same "
                f"files: {len(shared)} of the target's {len(dataset)} {role} images are source training images too "
                f"(e.g. '{shared[0]}'). A cross-domain pair needs different images per domain (e.g. one folder per "
                "camera); for one domain only, use FewShot."
            )
            raise ValueError(msg)
