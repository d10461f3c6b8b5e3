"""HyperTrans as an anomalib model: two-stage training (Algorithm 1) inside Lightning.

Paper: "HyperTrans: Hypergraph domain transfer for cross-domain few-shot anomaly detection" (IJCAI 2025).

How the stock ``Engine`` / ``anomalib train`` drives it. ``learning_type`` is ``ONE_CLASS`` so that ``Engine.fit``
really runs ``trainer.fit`` (anomalib skips training for ``FEW_SHOT`` models, and HyperTrans must train its adapters
and its residual HGNN). The trainer epochs are used as follows:

1. epochs ``0 .. epochs_perturbation-1``: stage 1, domain perturbation (Eq. 3-7) on the source images (on the target
   shots when the datamodule has no source domain); only the adapters learn;
2. the next epoch: one pass of the adapted backbone over the training data fills the source and target banks
   (gathered across ranks under DDP); at its last batch the banks are finalised (source coreset), stage 2 trains the
   residual HGNN for ``epochs_rectification`` full-graph iterations (Eq. 8-11), the rectified banks are stored, and
   the trainer is asked to stop.

Nothing is put into ``trainer_arguments``: the user's ``--trainer.*`` flags stand. When ``max_epochs`` leaves fewer
epochs than stage 1 asks for, stage 1 is shortened (with a warning) so that the bank epoch still runs. Validation before
the banks exist (the sanity check, or the end of a stage-1 epoch) scores against the k target shots only, through the
current adapters: a cheap, honest progress signal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_hypergraph.backbones import backbone_data_config
from anomalib_hypergraph.data.domains import (
    PAIRED_SOURCE,
    SOURCE,
    TARGET,
    CrossDomainPreProcessor,
    paired_source,
    split_domains,
)
from anomalib_hypergraph.hypergraph import HypergraphMemoryBank, greedy_coreset
from anomalib_hypergraph.models.checkpoints import CheckpointGuard, CheckpointSpec
from anomalib_hypergraph.models.module_defaults import TrainedFewShotDefaults
from anomalib_hypergraph.models.run_guard import RunGuard
from anomalib_hypergraph.models.smoothing import check_blur_fits

from .denoising import DenoisingReport, NoiseStatistics
from .sensor_map import DEFAULT_RIDGE_CANDIDATES
from .torch_model import (
    VIEW_PROBE_IMAGES,
    BankReport,
    HyperTransModel,
    PairedShots,
    TestViews,
    ViewReport,
    flatten_patches,
    image_key,
    image_root,
    view_probe_split,
)

logger = logging.getLogger(__name__)

PATCH_INDEX_BITS = 15
VIEW_INDEX_BITS = 4
IMAGE_KEY_BITS = 44  # image_key: an 11-hex-digit SHA-1 prefix
VIEW_PROBE = "view_probe"  # staging domain: probe source images in every candidate view (choose_shot_views)

# How HyperTrans's options relate to its checkpoints (see anomalib_hypergraph.models.checkpoints); options not listed
# change the scores of a loaded model (beta, sigma, kernel, K, alpha, CDS switch) and are warned about.
CHECKPOINT_SPEC = CheckpointSpec(
    model_name="HyperTrans",
    required_state_keys=("model.memory_bank.target_bank", "model.rectified_target"),
    architecture_hparams=frozenset(
        {
            "backbone",
            "layers",
            "model_kwargs",
            "perturbed_stages",
            "adapter_reduction",
            "use_domain_perturbation",
            "use_rectification",
        }
    ),
    restored_hparams=frozenset({"image_size"}),
    inert_hparams=frozenset(
        {
            "pretrained",
            "pretrained_weights",
            "noise_mean",
            "noise_std",
            "epochs_perturbation",
            "epochs_rectification",
            "lr_perturbation",
            "lr_rectification",
            "coreset_sampling_ratio",
            "dropout",
            "chunk_size",
            "search_backend",  # memory/speed; the approximate backends (IVF, HNSW) may move scores by missed neighbours
            "seed",
            "shot_augmentation",  # shapes the banks, which the checkpoint holds
            "view_min_share",  # chooses the shot views at fit time (the banks hold the result)
            "test_view_tolerance",  # decides at fit time whether "auto" reads test views (a buffer holds the result)
            "target_denoising",  # chooses the target filter at fit time (a buffer holds the kernel)
            "target_denoising_min_gain",
            "use_paired_shots",  # translates the source bank at fit time (the banks hold the result)
            "translation_ridge",
            "pair_registration",  # decides at fit time how the pairs are read (the map the checkpoint holds)
            "translation_direction",  # decides at fit time which map the checkpoint holds
            "rectify_translated_source",  # decides at fit time whether the stored banks are rectified
            "source_fusion",  # sets the fusion buffers the checkpoint holds
            "domain_weighting",  # sets the source weight, a buffer the checkpoint holds
        }
    ),
    derived_state_keys=("model.scorer.blur.kernel",),  # the 2-D blur kernel older checkpoints hold
)


class HyperTrans(TrainedFewShotDefaults, RunGuard, CheckpointGuard, AnomalibModule):
    """HyperTrans: cross-domain few-shot anomaly detection with hypergraph domain transfer.

    Args:
        backbone: timm backbone (paper: ``vit_base_patch8_224.dino``; offline real weights: ``tf_efficientnet_lite0``).
        layers: backbone stages that form the patch descriptors (``None``: the backbone's default).
        pretrained: load pretrained weights (hub when online, the offline weight packages, or ``pretrained_weights``).
        pretrained_weights: local weights file for the backbone, for machines without hub access.
        image_size: model input size (``None``: the backbone's, from timm's ``pretrained_cfg`` or ``model_kwargs``).
        perturbed_stages: 0-based stages followed by perturbation and an adapter (``None``: paper's layers 3..10).
        noise_mean: mean of the Perlin channel factors (paper: 0).
        noise_std: standard deviation of the Perlin channel factors (paper: 0.75).
        adapter_reduction: bottleneck reduction of the residual adapters (our choice).
        epochs_perturbation: epochs of stage 1, epochsP (paper: 3).
        epochs_rectification: full-graph iterations of stage 2, epochsR (paper: 100).
        lr_perturbation: Adam learning rate of the adapters (the paper does not give one; our choice).
        lr_rectification: Adam learning rate of the residual HGNN (our choice).
        coreset_sampling_ratio: fraction of source patches kept by greedy coreset (paper: 0.1).
        num_neighbors: K, the bank vertices in each vertex's hyperedge (our choice: 10; a bank vertex counts itself).
        incidence_kernel: ``"reciprocal"`` 1/(1+d/s) or ``"gaussian"`` exp(-(d/s)^2/2), s = the bank's mean k-NN
            distance (scale-free; fitted when the banks are built).
        alpha: residual weight of the HGNN branch, Eq. 9 (paper: 0.3).
        dropout: dropout in the residual HGNN (paper: 0.5).
        beta: weight of the source sub-hypergraph, Eq. 18-19 (paper: 0.6).
        domain_weighting: ``"evidence"`` (ours, default): beta times the share of target vertices in a cross-domain
            hyperedge, so a source domain that never meets the target gets no weight; ``"fixed"``: beta (the paper).
        image_score: psi of Eq. 12-13 / 15-16: ``"top_mean"`` (ours, default) the mean of the highest
            ``top_fraction`` of an image's patch scores, or ``"max"`` (the paper).
        top_fraction: share of the patches averaged by ``"top_mean"`` (default 1 %).
        shot_augmentation: which views of the shots enter the target bank: ``"auto"`` (ours, default) the dihedral
            views (90-degree rotations and mirror images) that explain held-out source images, decided at fit time and
            logged; ``"dihedral"``: all of them; ``"none"``: the shots as they are (the paper).
        view_min_share: ``"auto"`` keeps a view whose share of held-out source patches' nearest neighbours is at least
            this fraction of the share it would have if the part looked the same in every view (default 0.25).
        test_views: score each test image in every shot view kept at fit time and average the per-view distances,
            mapped back onto the image (ours). ``"auto"`` (default): only when turned source images stay as close to
            the other source images as unturned ones (within ``test_view_tolerance``), decided at fit time and
            logged; ``true`` / ``false``: always / never. One backbone pass and search per view read.
        test_view_tolerance: how much farther (relative median patch distance) turned normal images may lie from the
            other normal images than unturned ones for ``test_views="auto"`` to read the views (default 0.1).
        target_denoising: low-pass filter of every target-sensor image (ours): ``"auto"`` a Gaussian blur of 0 to 3
            pixels chosen from the shots at fit time (their noise level and Stein's unbiased risk estimate; logged), a
            number a fixed blur sigma in pixels, 0 none, as the paper. Default ``"auto"``.
        target_denoising_min_gain: ``"auto"`` filters only when the best blur removes at least this share of the
            noise energy (default 0.5).
        sigma: Gaussian smoothing of the anomaly map (paper: 4).
        chunk_size: rows per block in distance computations.
        search_backend: bank search, ``"exact"`` (default), ``"faiss_flat"`` (exact), ``"faiss_ivf"`` or
            ``"faiss_hnsw"`` (approximate, huge banks; ``pip install "anomalib-hypergraph[faiss]"``).
        use_domain_perturbation: ablation switch for DP (Table 3).
        use_rectification: ablation switch for HDR (Table 3).
        use_cross_domain_scoring: ablation switch for CDS (Table 3).
        use_paired_shots: when the datamodule pairs each shot with its source-sensor capture (``pair_shots``), learn a
            map from source to target features on the pairs and translate the source bank with it (ours).
        translation_ridge: relative ridge strengths the map chooses from by cross-validation over the shots (or views).
        pair_registration: largest displacement, in patches, by which each view's paired source captures may be
            moved (offset along each axis, zoom at the grid's corners) to line up with the shots before the map is
            fitted (ours; half-patch steps chosen at fit time by the map's residual, logged and stored; pairs that no
            alignment explains 1 % better are used as they are; 0 takes the pairs as they are).
        translation_direction: ``"bank"`` (default, ours): translate the source bank into the target space;
            ``"query"``: map each query into the source space (for a new sensor that keeps the old one's detail);
            ``"auto"``: whichever the shots' held-out pairs fit more tightly (logged, stored; see the model README).
        rectify_translated_source: run HDR also on a translated source bank (default ``False``, ours: the translation,
            fitted on the pairs themselves, replaces the rectification; without pairs HDR runs as in the paper).
        source_fusion: ``"auto"`` (default): a translated source bank joins the target bank as a calibrated union (the
            sub-hypergraph that explains a patch best, distances in held-out units fitted on the shots), an untranslated
            one through Eq. 18-19 (``domain_weighting``); ``"union"`` or ``"weighted"`` force one.
        seed: seed of everything random in training: adapter and HGNN initialisation, Perlin draws, the order of the
            training images, the coreset, stage-2 dropout (private generators, identical on every rank under DDP).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (tiny test backbones).
        pre_processor: pre-processor or ``True`` for the backbone's resize + normalisation.
        post_processor: post-processor or ``True`` for anomalib's default.
        evaluator: evaluator or ``True`` for anomalib's default metrics.
        visualizer: visualizer or ``True`` for anomalib's default.

    """

    checkpoint_spec = CHECKPOINT_SPEC

    def __init__(
        self,
        *,
        backbone: str = "vit_base_patch8_224.dino",
        layers: Sequence[str] | None = None,
        pretrained: bool = True,
        pretrained_weights: str | Path | None = None,
        image_size: tuple[int, int] | None = None,
        perturbed_stages: Sequence[int] | None = None,
        noise_mean: float = 0.0,
        noise_std: float = 0.75,
        adapter_reduction: int = 4,
        epochs_perturbation: int = 3,
        epochs_rectification: int = 100,
        lr_perturbation: float = 1e-3,
        lr_rectification: float = 1e-3,
        coreset_sampling_ratio: float = 0.1,
        num_neighbors: int = 10,
        incidence_kernel: str = "reciprocal",
        alpha: float = 0.3,
        dropout: float = 0.5,
        beta: float = 0.6,
        domain_weighting: str = "evidence",
        image_score: str = "top_mean",
        top_fraction: float = 0.01,
        shot_augmentation: str = "auto",
        view_min_share: float = 0.25,
        test_views: TestViews = "auto",
        test_view_tolerance: float = 0.1,
        target_denoising: float | str = "auto",
        target_denoising_min_gain: float = 0.5,
        sigma: float = 4.0,
        chunk_size: int = 2048,
        search_backend: str = "exact",
        use_domain_perturbation: bool = True,
        use_rectification: bool = True,
        use_cross_domain_scoring: bool = True,
        use_paired_shots: bool = True,
        translation_ridge: Sequence[float] = DEFAULT_RIDGE_CANDIDATES,
        pair_registration: float = 1.0,
        translation_direction: str = "bank",
        rectify_translated_source: bool = False,
        source_fusion: str = "auto",
        seed: int = 0,
        model_kwargs: dict[str, Any] | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(
                image_size=image_size, backbone=backbone, model_kwargs=model_kwargs
            )
        elif isinstance(pre_processor, nn.Module) and hasattr(pre_processor, "transform"):
            pre_processor = CrossDomainPreProcessor.from_pre_processor(pre_processor)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        check_blur_fits(sigma, self.input_size)  # before the backbone is built
        if epochs_perturbation < 0 or epochs_rectification < 0:
            msg = (
                "epochs_perturbation and epochs_rectification must be >= 0, "
                f"got {epochs_perturbation}, {epochs_rectification}."
            )
            raise ValueError(msg)
        if not 0 < coreset_sampling_ratio <= 1:
            msg = f"coreset_sampling_ratio must be in (0, 1], got {coreset_sampling_ratio}."
            raise ValueError(msg)
        self.model = HyperTransModel(
            backbone=backbone,
            layers=layers,
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            model_kwargs=model_kwargs,
            perturbed_stages=perturbed_stages,
            noise_mean=noise_mean,
            noise_std=noise_std,
            adapter_reduction=adapter_reduction,
            num_neighbors=num_neighbors,
            incidence_kernel=incidence_kernel,
            alpha=alpha,
            dropout=dropout,
            beta=beta,
            domain_weighting=domain_weighting,
            image_score=image_score,
            top_fraction=top_fraction,
            shot_augmentation=shot_augmentation,
            view_min_share=view_min_share,
            test_views=test_views,
            test_view_tolerance=test_view_tolerance,
            target_denoising=target_denoising,
            target_denoising_min_gain=target_denoising_min_gain,
            sigma=sigma,
            chunk_size=chunk_size,
            search_backend=search_backend,
            use_domain_perturbation=use_domain_perturbation,
            use_rectification=use_rectification,
            use_cross_domain_scoring=use_cross_domain_scoring,
            use_paired_shots=use_paired_shots,
            translation_ridge=translation_ridge,
            pair_registration=pair_registration,
            translation_direction=translation_direction,
            rectify_translated_source=rectify_translated_source,
            source_fusion=source_fusion,
            seed=seed,
        )
        self.epochs_perturbation = epochs_perturbation if use_domain_perturbation else 0
        self.epochs_rectification = epochs_rectification
        self.lr_perturbation = lr_perturbation
        self.lr_rectification = lr_rectification
        self.coreset_sampling_ratio = coreset_sampling_ratio
        self.seed = seed
        self.automatic_optimization = False
        self._perturbation_epochs_planned = self.epochs_perturbation
        self._provisional_target_bank: torch.Tensor | None = None
        self._staged_domains: set[str] = set()
        # Shots of the bank epoch as they came (images, paths, paired source captures), embedded once the target
        # filter is chosen from all of them; and the statistics that choice needs, per batch.
        self._staged_shots: list[tuple[list[str], torch.Tensor, torch.Tensor | None]] = []
        self._staged_shot_keys: set[int] = set()
        self._noise_statistics: list[NoiseStatistics] = []
        # Staging of the bank epoch (not in checkpoints): shots and their pairs in every view, the view probes.
        self._stage = HypergraphMemoryBank(domains=(TARGET, PAIRED_SOURCE, VIEW_PROBE), persistent=False)
        self._probe_key_limit = 0
        self._key_roots: dict[str, str | None] = {}
        self._num_views = 1
        self._pair_grid: tuple[int, int] | None = None  # feature grid of the staged shots (whole grids per view)

    # ------------------------------------------------------------------------------------------ anomalib API
    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str = "vit_base_patch8_224.dino",
        model_kwargs: dict[str, Any] | None = None,
    ) -> CrossDomainPreProcessor:
        """Resize to ``image_size`` or the backbone's input size; normalise with the statistics its weights expect."""
        data_config = backbone_data_config(backbone, model_kwargs)  # timm's pretrained_cfg; img_size of model_kwargs
        size = image_size or data_config.input_size
        transform = Compose(
            [Resize(size, antialias=True), Normalize(mean=list(data_config.mean), std=list(data_config.std))]
        )
        return CrossDomainPreProcessor(transform=transform)

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """Adam over the adapters (stage 1). Stage 2's optimiser lives inside the bank epoch, see ``_finish_fit``."""
        if self.model.perturbation is None:
            return None
        return self.model.perturbation_optimizer(self.lr_perturbation)

    # ----------------------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        """Before Lightning wraps the model (DDP): hide the residual HGNN from DDP while stage 1 trains the adapters.

        DDP's reducer expects a gradient for every trainable parameter in each backward; stage 1's loss (Eq. 7) does
        not touch the HGNN, which stage 2 trains in lockstep outside DDP (``train_rectifier`` unfreezes it). Without
        adapters the HGNN stays trainable, so that DDP still has a parameter to wrap.
        """
        super().setup(stage)
        if stage == "fit" and self.model.rectifier is not None and self.model.perturbation is not None:
            self.model.rectifier.requires_grad_(False)

    def on_train_start(self) -> None:
        """Seed the order of the training images; shorten stage 1 when ``max_epochs`` cannot hold it and the banks."""
        seed_shuffling(self.trainer.train_dataloader, self.seed)
        self._probe_key_limit = probe_key_limit(self.trainer.train_dataloader)
        self._key_roots = key_roots(self.trainer.train_dataloader)
        max_epochs = self.trainer.max_epochs
        planned = self.epochs_perturbation
        if max_epochs is not None and max_epochs >= 0 and planned >= max_epochs:
            self._perturbation_epochs_planned = max(max_epochs - 1, 0)
            logger.warning(
                "trainer.max_epochs=%d leaves room for %d of the %d domain-perturbation epochs (one epoch builds the "
                "memory banks). Raise --trainer.max_epochs to %d for the full stage 1.",
                max_epochs,
                self._perturbation_epochs_planned,
                planned,
                planned + 1,
            )
        else:
            self._perturbation_epochs_planned = planned

    @property
    def in_perturbation_stage(self) -> bool:
        """Whether the current trainer epoch belongs to stage 1 (domain perturbation)."""
        return self.current_epoch < self._perturbation_epochs_planned

    def training_step(self, batch: Batch | dict[str, Batch], batch_idx: int) -> STEP_OUTPUT:
        """Stage 1: one adapter step on Eq. 7. Bank epoch: embed the batch into the domain banks."""
        source, target = split_domains(batch)
        if self.in_perturbation_stage:
            images = source.image if source is not None else target.image
            loss = self.model.perturbation_step(images, self.optimizers(), backward=self.manual_backward)  # Eq. 7
            self.log("train/loss_dp", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
            return {"loss": loss}

        with torch.no_grad():
            self._stage_bank_batch(source, target, paired_source(batch))
        # Count the bank step as a training step (Patchcore does so with a dummy loss): no gradients exist, so no
        # weight moves, but the global step advances and the checkpoint of this epoch is not skipped as "already saved".
        optimizer = self.optimizers()
        optimizer.zero_grad()
        optimizer.step()
        if batch_idx == self.trainer.num_training_batches - 1:
            self._finish_fit()
        return None

    def _stage_views(self, domain: str, images: torch.Tensor, paths: Sequence[str], root: str | None) -> None:
        """Stage the patch rows of ``images`` in every candidate view, keyed by ``paths`` (below ``root``) and view."""
        views = self.model.candidate_views(images)
        self._num_views = max(self._num_views, len(views))
        for view_index, view in enumerate(views):
            features = self.model.extract(view)
            if domain == TARGET:
                self._pair_grid = (features.shape[-2], features.shape[-1])
            keys = patch_keys(paths, features.shape[-2] * features.shape[-1], features.device, view_index, root)
            self._stage.add(domain, flatten_patches(features), keys)

    def _stage_bank_batch(self, source: Batch | None, target: Batch, pairs: Batch | None) -> None:
        """Bank epoch: stage source rows, view probes, the shots in every candidate view and their paired captures.

        Source images go to the memory bank as they are; those among the first source images by key (a hash of the
        path, see :func:`~.torch_model.view_probe_split`) are also seen in every view, for the choice of shot views.
        Shots and their paired source captures are kept as images until :meth:`_finish_fit` has chosen the target
        filter from all shots (:meth:`_stage_shots`). Which views enter the target bank is decided there too.
        """
        source_root = self._key_roots.get(SOURCE)
        if source is not None:
            features = self.model.extract(source.image)
            patches = features.shape[-2] * features.shape[-1]
            keys = patch_keys(source.image_path, patches, features.device, root=source_root)
            self.model.memory_bank.add(SOURCE, flatten_patches(features), keys)
            probes = [
                index
                for index, path in enumerate(source.image_path)
                if image_key(path, source_root) < self._probe_key_limit
            ]
            if probes:
                probe_paths = [source.image_path[index] for index in probes]
                self._stage_views(VIEW_PROBE, source.image[probes], probe_paths, source_root)
            self._staged_domains.add(SOURCE)
        # Each shot once per rank (the target loader is cycled beside a longer source loader).
        keys = [image_key(path, self._key_roots.get(TARGET)) for path in target.image_path]
        new = [index for index, key in enumerate(keys) if key not in self._staged_shot_keys]
        self._staged_shot_keys.update(keys)
        if new:
            images = target.image[new]
            self._staged_shots.append(
                ([target.image_path[index] for index in new], images, pairs.image[new] if pairs is not None else None)
            )
            if self.model.denoiser.option == "auto":
                self._noise_statistics.append(
                    NoiseStatistics.of(images, self.model.denoiser.candidates, torch.tensor([keys[i] for i in new]))
                )

    def _stage_shots(self) -> DenoisingReport | None:
        """Choose the target filter from every shot (all ranks), then stage the filtered shots and their pairs.

        Shots and their paired source captures are staged in every candidate view under the *shot's* keys, so that
        after sorting by key row ``i`` of one is the pair of row ``i`` of the other.
        """
        auto = self.model.denoiser.option == "auto"
        report = self.model.fit_target_denoising(NoiseStatistics.combined(self._noise_statistics) if auto else None)
        target_root = self._key_roots.get(TARGET)
        for paths, images, pairs in self._staged_shots:
            self._stage_views(TARGET, self.model.denoiser(images), paths, target_root)
            self._staged_domains.add(TARGET)
            if pairs is not None:
                self._stage_views(PAIRED_SOURCE, pairs, paths, target_root)
                self._staged_domains.add(PAIRED_SOURCE)
        self._staged_shots.clear()
        self._staged_shot_keys.clear()
        self._noise_statistics.clear()
        return report

    def _finish_fit(self) -> None:
        """Choose the shot views, finalise the banks, run stage 2 (HDR), store what inference needs; stop training."""
        denoising = self._stage_shots()
        memory, stage = self.model.memory_bank, self._stage
        channels = self.model.feature_extractor.feature_dim
        target_rows, target_keys = stage.collect(TARGET)
        if SOURCE in self._staged_domains:
            source_rows, source_keys = memory.collect(SOURCE)
            probe_rows, probe_keys = stage.collect(VIEW_PROBE, channels=channels)
            source_images = torch.unique(key_image(source_keys)).tolist()
            probes, held_out = view_probe_split(source_images)
            probe_images = torch.tensor([source_images[position] for position in probes], dtype=torch.long)
            held_images = torch.tensor([source_images[position] for position in held_out], dtype=torch.long)
            chosen = torch.isin(key_image(probe_keys), probe_images.to(probe_keys.device))
            probe_views = [probe_rows[chosen & (key_view(probe_keys) == view)] for view in range(self._num_views)]
            held_rows = source_rows[torch.isin(key_image(source_keys), held_images.to(source_keys.device))]
            memory.set(SOURCE, greedy_coreset(source_rows, self.coreset_sampling_ratio, seed=self.seed))
        else:  # single domain: the views are judged on the shots themselves (one probe shot, the others held out)
            if self.model.rectifier is not None:
                logger.warning("No source-domain images: hypergraph domain rectification needs two domains; skipped.")
            shots = torch.unique(key_image(target_keys))
            probe = key_image(target_keys) == shots[0]
            probe_views = [target_rows[probe & (key_view(target_keys) == view)] for view in range(self._num_views)]
            held_rows = target_rows[~probe & (key_view(target_keys) == 0)]
        views = self.model.choose_shot_views(probe_views, held_rows, from_source=SOURCE in self._staged_domains)
        kept = torch.isin(key_view(target_keys), torch.tensor(views.kept, device=target_keys.device))
        memory.set(TARGET, target_rows[kept])
        pairs = None
        if PAIRED_SOURCE in self._staged_domains:
            paired_rows, paired_keys = stage.collect(PAIRED_SOURCE)
            if not torch.equal(paired_keys, target_keys):
                msg = "Paired shots: the paired source captures do not match the target shots one to one."
                raise RuntimeError(msg)
            _, shot = torch.unique(key_image(target_keys), return_inverse=True)
            pairs = PairedShots(
                source=paired_rows, target=target_rows, shot=shot, view=key_view(target_keys), grid=self._pair_grid
            )
        report = self.model.fit_banks(
            iterations=self.epochs_rectification,
            lr=self.lr_rectification,
            on_iteration=self._log_rectification,
            pairs=pairs,
        )
        sigma = float(self.model.denoiser.sigma)
        fixed = f"fixed blur sigma {sigma:g} px (target_denoising)" if sigma > 0 else "none (target_denoising=0)"
        logger.info("HyperTrans target filter: %s.", denoising or fixed)
        logger.info(
            "HyperTrans shot views: kept %s of %d%s; test images are read %s.",
            views.kept,
            self._num_views,
            f" (share of held-out source patches per view: {views.shares})" if views.shares else "",
            _describe_test_views(self.model.test_views, views),
        )
        if report.translation is not None:
            logger.info(
                "HyperTrans paired shots: %d patch pairs in %d groups, read at (dy, dx, zoom) %s (per view); %s "
                "(ridge %.0e chosen from %s by cross-validation; held-out median distance per direction: %s); %s.",
                report.translation.pairs,
                report.translation.groups,
                report.pair_alignment or "as they are",
                "the source bank is translated into the target feature space"
                if report.direction == "bank"
                else "queries are mapped into the source feature space",
                report.translation.ridge,
                list(report.translation.candidates),
                {name: round(value, 4) for name, value in report.direction_evidence.items()} or "not measured",
                "HDR rectifies the translated banks"
                if report.losses
                else "HDR left out (rectify_translated_source=False or use_rectification=False)",
            )
        logger.info(
            "HyperTrans banks: %d target patches, %d source patches (coreset); kernel scale %.4g; fusion of the "
            "sub-hypergraphs: %s; %s of the vertices took their pseudo feature (Eq. 10) from the nearest other-domain "
            "vertex.",
            report.target_rows,
            report.source_rows,
            report.kernel_scale,
            _describe_fusion(report),
            "none" if report.fallback_share != report.fallback_share else f"{report.fallback_share:.1%}",
        )
        self.log("train/target_bank_size", float(report.target_rows))
        self.log("train/source_bank_size", float(report.source_rows))
        self.log("train/source_weight", report.source_weight)
        self.log("train/shot_views", float(len(views.kept)))
        self.log("train/test_views", float(self.model.reads_test_views))
        self.log("train/target_blur_sigma", float(self.model.denoiser.sigma))
        if report.losses:
            self.log("train/loss_dr_first", report.losses[0])
            self.log("train/loss_dr", report.losses[-1], prog_bar=True)
        self._provisional_target_bank = None
        self._staged_domains.clear()
        self.trainer.should_stop = True

    def _log_rectification(self, iteration: int, loss: float) -> None:
        """Stage-2 progress: every iteration to the logger, every tenth to the log."""
        if self.logger is not None:
            self.logger.log_metrics({"train/loss_dr": loss}, step=iteration)
        if iteration == 0 or (iteration + 1) % 10 == 0 or iteration + 1 == self.epochs_rectification:
            logger.info("HDR stage 2: iteration %d/%d, L_dr = %.6f", iteration + 1, self.epochs_rectification, loss)

    def on_train_end(self) -> None:
        """Warn when training ended before the bank epoch completed (the model then cannot score)."""
        if not self.model.is_fitted:
            logger.warning(
                "Training stopped before HyperTrans built its memory banks; test/predict will fail. "
                "Allow at least one more epoch (--trainer.max_epochs)."
            )

    # --------------------------------------------------------------------------------------------- evaluation
    def on_validation_start(self) -> None:
        """Before the banks exist, embed the target shots once for a provisional target-only score."""
        if self.model.is_fitted:
            return
        features = [self.model.embed(images) for images in self._target_shot_images()]
        self._provisional_target_bank = torch.cat(features) if features else None

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch: the full model once trained, the provisional target-only score before."""
        del args, kwargs
        if self.model.is_fitted or self._provisional_target_bank is None:
            predictions = self.model(batch.image)
        else:
            predictions = self.model.score_against_bank(batch.image, self._provisional_target_bank)
        return batch.update(**predictions._asdict())

    def _target_shot_images(self) -> Iterator[torch.Tensor]:
        """Pre-processed target-shot images from the training data (dict loaders: the ``target`` one)."""
        loader = None
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            loader = datamodule.train_dataloader()
        elif self.trainer.train_dataloader is not None:
            loader = self.trainer.train_dataloader
        if isinstance(loader, dict):
            loader = loader.get(TARGET)
        if loader is None:
            return
        with torch.no_grad():
            for batch in loader:
                images = batch.image.to(self.device)
                if self.pre_processor is not None and getattr(self.pre_processor, "transform", None) is not None:
                    images = self.pre_processor.transform(images)
                yield images


def patch_keys(
    image_paths: Sequence[str], patches_per_image: int, device: torch.device, view: int = 0, root: str | None = None
) -> torch.Tensor:
    """Stable int64 key per patch: 44 bits of the image path's SHA-1, the view index (4 bits), the patch index.

    Keys let the memory bank drop the duplicates that DDP padding and cycled target loaders produce, and give the bank
    a row order that does not depend on how images were spread over ranks. ``view`` tells the augmented views of one
    target shot apart (see ``HyperTransModel.shot_views``). ``root``: the data set's folder; paths are hashed relative
    to it (:func:`~.torch_model.image_key`), so keys and the view probes they pick do not depend on where it lies.
    """
    if patches_per_image >= 2**PATCH_INDEX_BITS:
        msg = f"{patches_per_image} patches per image exceed the {2**PATCH_INDEX_BITS} that patch keys can index."
        raise ValueError(msg)
    if not 0 <= view < 2**VIEW_INDEX_BITS:
        msg = f"view must be in [0, {2**VIEW_INDEX_BITS}), got {view}."
        raise ValueError(msg)
    image_keys = torch.tensor([image_key(path, root) for path in image_paths], dtype=torch.long, device=device)
    patch_index = torch.arange(patches_per_image, dtype=torch.long, device=device)
    prefix = ((image_keys << VIEW_INDEX_BITS) | view) << PATCH_INDEX_BITS
    return (prefix[:, None] | patch_index[None, :]).reshape(-1)


def loaders_by_domain(loaders: object) -> dict[str, object]:
    """Return the training loaders by domain from ``trainer.train_dataloader`` (a single loader: the target's)."""
    iterables = getattr(loaders, "iterables", loaders)
    return iterables if isinstance(iterables, dict) else {TARGET: iterables}


def probe_key_limit(loaders: object) -> int:
    """Image keys below this limit are view-probe candidates: about three times :data:`VIEW_PROBE_IMAGES` images.

    :func:`~.torch_model.image_key` values are uniform hashes, so the candidates are the first images in key order,
    the probes of :func:`~.torch_model.view_probe_split` among them; only these are seen in every view while the banks
    are filled. 0 without a source loader.
    """
    source = loaders_by_domain(loaders).get(SOURCE)
    if source is None:
        return 0
    count = len(source.dataset)
    return int(min(1.0, 3 * VIEW_PROBE_IMAGES / max(count, 1)) * 2**IMAGE_KEY_BITS)


def key_roots(loaders: object) -> dict[str, str | None]:
    """Return the folder of each domain's training images (:func:`~.torch_model.image_root`): its image keys' root.

    Read from the datasets behind the loaders, which every rank holds whole, so all ranks agree. A domain whose
    dataset lists no image paths gets None (its keys hash the whole path).
    """
    by_domain = loaders_by_domain(loaders)
    roots: dict[str, str | None] = {}
    for domain in (SOURCE, TARGET):
        samples = getattr(getattr(by_domain.get(domain), "dataset", None), "samples", None)
        paths = samples["image_path"].tolist() if samples is not None and "image_path" in samples else []
        roots[domain] = image_root(paths)
    return roots


def _describe_fusion(report: BankReport) -> str:
    """Describe the fusion of a :class:`~.torch_model.BankReport` in words, for the log."""
    if report.fusion == "union":
        target_unit, source_unit = report.units
        return f"calibrated union (held-out units: target {target_unit:.4g}, source {source_unit:.4g})"
    if report.fusion == "weighted":
        return f"Eq. 18-19 with source weight {report.source_weight:.3f}"
    return "target bank only"


def _describe_test_views(option: TestViews, views: ViewReport) -> str:
    """Describe how test images are read (``test_views`` and the fit-time evidence), for the log."""
    if option != "auto":
        return "in the kept views (test_views=true)" if option else "as they are (test_views=false)"
    if views.view_distance_ratio is None:
        return "as they are (test_views=auto: no source images, no second kept view or nothing held out to judge by)"
    verdict = "in the kept views" if views.test_views else "as they are"
    return (
        f"{verdict} (test_views=auto: turned probe images {views.view_distance_ratio:.3f}x as far from held-out images)"
    )


def key_image(keys: torch.Tensor) -> torch.Tensor:
    """Return the image part of patch keys (:func:`patch_keys`): the :func:`~.torch_model.image_key` of its path."""
    return keys >> (VIEW_INDEX_BITS + PATCH_INDEX_BITS)


def key_view(keys: torch.Tensor) -> torch.Tensor:
    """Return the view part of patch keys (:func:`patch_keys`)."""
    return (keys >> PATCH_INDEX_BITS) & (2**VIEW_INDEX_BITS - 1)


def seed_shuffling(loaders: object, seed: int) -> None:
    """Give every shuffling ``RandomSampler`` among ``loaders`` a private generator seeded with ``seed``.

    anomalib's datamodules shuffle their training loaders with the global random state, which the ``anomalib`` command
    never seeds, so the order of the stage-1 batches (and with it the adapters) would change from run to run. A sampler
    that already has a generator (the user chose one) is left alone; DDP's ``DistributedSampler`` is seeded already.

    Args:
        loaders: a ``DataLoader``, or a (nested) dict / list / tuple of them, as ``trainer.train_dataloader`` returns.
        seed: seed of the samplers' generators.

    """
    if isinstance(loaders, dict):
        for loader in loaders.values():
            seed_shuffling(loader, seed)
    elif isinstance(loaders, list | tuple):
        for loader in loaders:
            seed_shuffling(loader, seed)
    elif isinstance(loaders, DataLoader):
        sampler = loaders.sampler
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            sampler.generator = torch.Generator().manual_seed(seed)
