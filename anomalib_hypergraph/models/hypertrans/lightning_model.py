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

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_hypergraph.backbones import backbone_data_config
from anomalib_hypergraph.data.domains import SOURCE, TARGET, CrossDomainPreProcessor, split_domains
from anomalib_hypergraph.models.checkpoints import CheckpointGuard, CheckpointSpec
from anomalib_hypergraph.models.run_guard import RunGuard
from anomalib_hypergraph.models.smoothing import check_blur_fits

from .torch_model import HyperTransModel, flatten_patches

logger = logging.getLogger(__name__)

PATCH_INDEX_BITS = 15
VIEW_INDEX_BITS = 4

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
            "domain_weighting",  # sets the source weight, a buffer the checkpoint holds
        }
    ),
    derived_state_keys=("model.scorer.blur.kernel",),  # the 2-D blur kernel older checkpoints hold
)


class HyperTrans(RunGuard, CheckpointGuard, AnomalibModule):
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
        shot_augmentation: ``"dihedral"`` (ours, default): the target bank also holds the 90-degree rotations and
            mirror images of every shot; ``"none"``: the shots as they are (the paper).
        sigma: Gaussian smoothing of the anomaly map (paper: 4).
        chunk_size: rows per block in distance computations.
        search_backend: bank search, ``"exact"`` (default), ``"faiss_flat"`` (exact), ``"faiss_ivf"`` or
            ``"faiss_hnsw"`` (approximate, huge banks; ``pip install "anomalib-hypergraph[faiss]"``).
        use_domain_perturbation: ablation switch for DP (Table 3).
        use_rectification: ablation switch for HDR (Table 3).
        use_cross_domain_scoring: ablation switch for CDS (Table 3).
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
        shot_augmentation: str = "dihedral",
        sigma: float = 4.0,
        chunk_size: int = 2048,
        search_backend: str = "exact",
        use_domain_perturbation: bool = True,
        use_rectification: bool = True,
        use_cross_domain_scoring: bool = True,
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
            sigma=sigma,
            chunk_size=chunk_size,
            search_backend=search_backend,
            use_domain_perturbation=use_domain_perturbation,
            use_rectification=use_rectification,
            use_cross_domain_scoring=use_cross_domain_scoring,
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

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Anomalib's default one-class post-processing (normalisation and adaptive thresholds from validation)."""
        return PostProcessor()

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No trainer overrides: the user's ``--trainer.*`` flags are honoured as given."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """``ONE_CLASS``: trained on normal images only and (unlike ``FEW_SHOT``) really trained by ``Engine.fit``."""
        return LearningType.ONE_CLASS

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
            for domain, domain_batch in ((SOURCE, source), (TARGET, target)):
                if domain_batch is None:
                    continue
                views = [domain_batch.image] if domain == SOURCE else self.model.shot_views(domain_batch.image)
                for view_index, view in enumerate(views):
                    features = self.model.extract(view)
                    patches_per_image = features.shape[-2] * features.shape[-1]
                    keys = patch_keys(domain_batch.image_path, patches_per_image, features.device, view=view_index)
                    self.model.memory_bank.add(domain, flatten_patches(features), keys)
                self._staged_domains.add(domain)
        # Count the bank step as a training step (Patchcore does so with a dummy loss): no gradients exist, so no
        # weight moves, but the global step advances and the checkpoint of this epoch is not skipped as "already saved".
        optimizer = self.optimizers()
        optimizer.zero_grad()
        optimizer.step()
        if batch_idx == self.trainer.num_training_batches - 1:
            self._finish_fit()
        return None

    def _finish_fit(self) -> None:
        """Finalise the banks, run stage 2 (HDR) and store what inference needs (``fit_banks``); then stop training."""
        memory = self.model.memory_bank
        memory.finalize(TARGET, coreset_ratio=None, seed=self.seed)
        if SOURCE in self._staged_domains:
            memory.finalize(SOURCE, coreset_ratio=self.coreset_sampling_ratio, seed=self.seed)
        elif self.model.rectifier is not None:
            logger.warning("No source-domain images: hypergraph domain rectification needs two domains and is skipped.")
        report = self.model.fit_banks(
            iterations=self.epochs_rectification, lr=self.lr_rectification, on_iteration=self._log_rectification
        )
        logger.info(
            "HyperTrans banks: %d target patches, %d source patches (coreset); kernel scale %.4g; source weight %.3f "
            "in Eq. 18-19; %s of the vertices took their pseudo feature (Eq. 10) from the nearest other-domain vertex.",
            report.target_rows,
            report.source_rows,
            report.kernel_scale,
            report.source_weight,
            "none" if report.fallback_share != report.fallback_share else f"{report.fallback_share:.1%}",
        )
        self.log("train/target_bank_size", float(report.target_rows))
        self.log("train/source_bank_size", float(report.source_rows))
        self.log("train/source_weight", report.source_weight)
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


def patch_keys(image_paths: Sequence[str], patches_per_image: int, device: torch.device, view: int = 0) -> torch.Tensor:
    """Stable int64 key per patch: 44 bits of the image path's SHA-1, the view index (4 bits), the patch index.

    Keys let the memory bank drop the duplicates that DDP padding and cycled target loaders produce, and give the bank
    a row order that does not depend on how images were spread over ranks. ``view`` tells the augmented views of one
    target shot apart (see ``HyperTransModel.shot_views``).
    """
    if patches_per_image >= 2**PATCH_INDEX_BITS:
        msg = f"{patches_per_image} patches per image exceed the {2**PATCH_INDEX_BITS} that patch keys can index."
        raise ValueError(msg)
    if not 0 <= view < 2**VIEW_INDEX_BITS:
        msg = f"view must be in [0, {2**VIEW_INDEX_BITS}), got {view}."
        raise ValueError(msg)
    image_keys = torch.tensor(
        [int(hashlib.sha1(str(path).encode()).hexdigest()[:11], 16) for path in image_paths],
        dtype=torch.long,
        device=device,
    )
    patch_index = torch.arange(patches_per_image, dtype=torch.long, device=device)
    prefix = ((image_keys << VIEW_INDEX_BITS) | view) << PATCH_INDEX_BITS
    return (prefix[:, None] | patch_index[None, :]).reshape(-1)


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
