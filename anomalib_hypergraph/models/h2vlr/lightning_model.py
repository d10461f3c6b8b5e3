"""H2VLR as an anomalib model: few-shot prompt and hypergraph learning on the k support shots, inside Lightning.

Paper: "H2VLR: heterogeneous hypergraph vision-language reasoning for few-shot anomaly detection" (arXiv 2604.14507).

How the stock ``Engine`` / ``anomalib train`` drives it:

- ``learning_type`` is ``ONE_CLASS`` so that ``Engine.fit`` really runs ``trainer.fit`` (anomalib skips training for
  ``FEW_SHOT`` models, and H2VLR must learn its prompts, mapper, hypergraph layers and heads).
- Shots. With ``k_shot`` set, ``setup("fit")`` keeps k seeded normal images of the datamodule's training set
  (``few_shot_subset``: ``shot_selection="random"`` with ``seed``, or ``"first"``) and logs their paths; the other
  training images are not used. A datamodule that already selected its shots (``FewShot``, the cross-domain
  datamodules) must agree with ``k_shot``, or ``k_shot`` is left at None.
- The support set is read once at fit start from the training dataset (through the pre-processor) and kept: its
  images (for the synthetic anomalies), and in the torch model the support gallery, the global support feature G_s
  and the shots' tokens.
- One trainer epoch is one pass over the support set in optimisation steps of up to ``batch_size`` shots (paper:
  batch size 400, so a k-shot support set is one step); each shot enters with ``anomalies_per_shot`` synthetic-anomaly
  copies drawn from ``(seed, step, shot)``, and each step minimises Eq. 8 with SGD and logs every loss term. The
  steps are built from the stored support set, not from the loader's batches: the loader only paces the epochs (its
  first batch of an epoch runs the epoch's steps, the rest of the epoch is skipped), so its shuffling, its batch size
  and torch's global seed do not change training. The model stops the trainer after ``epochs`` (paper: 100) epochs.
- Cross-domain datamodules: the ``target`` training images are the shots, ``source`` batches are ignored.

Nothing is put into ``trainer_arguments``. Lightning validates after every epoch by default; validation only feeds
anomalib's normalisation and thresholds (nothing is selected on it), so ``--trainer.check_val_every_n_epoch 100``
(with the default 100 epochs) validates once, after the last epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from anomalib.data import Batch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_hypergraph.backbones import register_open_clip_config
from anomalib_hypergraph.data import few_shot_subset
from anomalib_hypergraph.data.domains import TARGET, CrossDomainPreProcessor
from anomalib_hypergraph.data.few_shot import ShotSelection, normal_positions
from anomalib_hypergraph.models.checkpoints import CheckpointGuard, CheckpointSpec
from anomalib_hypergraph.models.module_defaults import TrainedFewShotDefaults
from anomalib_hypergraph.models.run_guard import RunGuard
from anomalib_hypergraph.models.smoothing import check_blur_fits

from .options import (
    PROMPT_GROUPS,
    EdgeWeighting,
    H2VLROptions,
    ImageHeadInit,
    Normalization,
    SingleShotGallery,
    SupportConditioning,
    TokenSource,
    VertexDegree,
    option_fields,
    options_docstring,
)
from .seeding import seeded
from .synthesis import SupportAnomalySynthesizer
from .torch_model import DEFAULT_CLASS_NAME, H2VLRModel

logger = logging.getLogger(__name__)

MANY_SHOTS = 16  # above this many training images H2VLR warns that it is a few-shot model
SUPPORT_CHUNK = 16  # support images read and resized per chunk
CHECKPOINT_KEY = "h2vlr"
BACKBONE_PREFIX = "model.backbone.clip."

# How H2VLR's options relate to its checkpoints (see anomalib_hypergraph.models.checkpoints). Options not listed
# (alpha, eta, sigma, text_temperature, K of both hyperedge kinds, vertex_degree, normalization, prompt_messages,
# residual_update) change a loaded model's scores and are warned about. Inference reads the encoded prompts from the
# checkpoint's buffers, so options that only shape how prompts are learned (support_conditioning) are inert.
CHECKPOINT_SPEC = CheckpointSpec(
    model_name="H2VLR",
    required_state_keys=("model.support_gallery", "model.prompt_embeddings"),
    architecture_hparams=frozenset(
        {
            "backbone",
            "backbone_config",
            "token_source",
            "surgery_depth",
            "gallery_layers",
            "context_init",
            "context_length",
            "prompt_groups",
            "num_local_prompts",
            "local_prompt_tokens",
            "num_layers",
            "head_reduction",
            "histogram_bins",
            "image_head_hidden",
            "use_dsi",
            "use_hsr",
            "use_sghm",
            "edge_weights",
        }
    ),
    restored_hparams=frozenset({"image_size"}),
    inert_hparams=frozenset(
        {
            "pretrained",  # stored weights are loaded; rebuilt ones are checked by their fingerprint
            "pretrained_tag",
            "pretrained_weights",
            "class_name",  # the prompts are rebuilt for the checkpoint's class
            "k_shot",
            "shot_selection",
            "seed",
            "epochs",
            "batch_size",
            "lr",
            "momentum",
            "weight_decay",
            "anomalies_per_shot",
            "anomaly_source_path",
            "leave_one_out",
            "single_shot_gallery",
            "support_conditioning",
            "residual_scale",
            "learnable_histogram",  # the bins are state entries either way
            "image_head_init",
            "use_structural_loss",
            "lambda_str",
            "lambda_seg",
            "lambda_image",
            "laplacian_weight",
            "focal_gamma",
            "eam_margin",
            "triplet_margin",
            "chunk_size",
            "save_backbone_weights",
        }
    ),
    derived_state_keys=("model.blur.kernel",),  # the 2-D blur kernel older checkpoints hold
)


class H2VLR(TrainedFewShotDefaults, RunGuard, CheckpointGuard, AnomalibModule):
    """H2VLR: few-shot anomaly detection by heterogeneous hypergraph vision-language reasoning.

    Every keyword argument but the four anomalib components below is an option of
    :class:`~anomalib_hypergraph.models.h2vlr.options.H2VLROptions`, where its default and documentation live (the
    ``Args`` entries of the options are filled in from there when this module is imported).

    Args:
        pre_processor: pre-processor or True for the resize to the backbone's size (no normalisation: the model
            normalises itself, the synthetic anomalies need [0, 1] images).
        post_processor: post-processor or True for anomalib's default.
        evaluator: evaluator or True for anomalib's default metrics.
        visualizer: visualizer or True for anomalib's default.

    """

    checkpoint_spec = CHECKPOINT_SPEC

    def __init__(  # the option arguments equal H2VLROptions' fields (names, types, defaults; checked by a test)
        self,
        *,
        backbone: str = "ViT-B-16-plus-240",
        pretrained: bool = True,
        pretrained_tag: str = "laion400m_e32",
        pretrained_weights: str | Path | None = None,
        backbone_config: dict[str, Any] | None = None,
        image_size: tuple[int, int] | None = None,
        token_source: TokenSource = "surgery",
        surgery_depth: int | None = None,
        gallery_layers: Sequence[int] = (2, 7),
        save_backbone_weights: bool | None = None,
        k_shot: int | None = None,
        shot_selection: ShotSelection = "random",
        seed: int = 0,
        epochs: int = 100,
        batch_size: int = 400,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        anomalies_per_shot: int = 1,
        anomaly_source_path: str | Path | None = None,
        leave_one_out: bool = True,
        single_shot_gallery: SingleShotGallery = "shifted_view",
        class_name: str | None = None,
        context_init: str | None = "a photo of a",
        context_length: int = 4,
        prompt_groups: Sequence[str] = PROMPT_GROUPS,
        num_local_prompts: int = 4,
        local_prompt_tokens: int = 2,
        use_dsi: bool = True,
        support_conditioning: SupportConditioning = "multiply",
        use_hsr: bool = True,
        use_sghm: bool = True,
        num_neighbors: int = 8,
        num_semantic_neighbors: int = 8,
        num_layers: int = 2,
        edge_weights: EdgeWeighting = "affinity",
        vertex_degree: VertexDegree = "count",
        normalization: Normalization = "one_sided",
        prompt_messages: bool = False,
        residual_update: bool = True,
        head_reduction: int = 4,
        chunk_size: int = 4096,
        alpha: float = 0.5,
        eta: float = 0.4,
        residual_scale: float = 1.0,
        histogram_bins: int = 16,
        learnable_histogram: bool = True,
        image_head_hidden: int = 32,
        image_head_init: ImageHeadInit = "tail",
        text_temperature: float | None = None,
        sigma: float = 4.0,
        use_structural_loss: bool = True,
        lambda_str: float = 0.02,
        lambda_seg: float = 1.0,
        lambda_image: float = 1.0,
        laplacian_weight: float = 1.0,
        focal_gamma: float = 2.0,
        eam_margin: float = 0.1,
        triplet_margin: float = 0.1,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        arguments = locals()
        options = H2VLROptions(**{option.name: arguments[option.name] for option in option_fields()})
        if backbone_config is not None:
            register_open_clip_config(backbone, backbone_config)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size=image_size, backbone=backbone)
        elif isinstance(pre_processor, nn.Module) and hasattr(pre_processor, "transform"):
            pre_processor = CrossDomainPreProcessor.from_pre_processor(pre_processor)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        check_blur_fits(options.sigma, self.input_size)  # before the backbone is built
        self.options = options
        self.model = H2VLRModel(options)
        self.synthesizer = SupportAnomalySynthesizer(anomalies_per_shot, anomaly_source_path, seed=seed)
        self.automatic_optimization = False
        self.save_backbone_weights = (
            save_backbone_weights if save_backbone_weights is not None else not (pretrained or pretrained_weights)
        )
        self.backbone_source = str(pretrained_weights) if pretrained_weights else f"{backbone} / {pretrained_tag}"
        self._backbone_fingerprint: str | None = None
        self.shots: list[str] = []
        self._support_batch: torch.Tensor | None = None
        self._inference_state_stale = False

    # ------------------------------------------------------------------------------------------ anomalib API
    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str = "ViT-B-16-plus-240",
    ) -> CrossDomainPreProcessor:
        """Bicubic resize to the CLIP input size, no normalisation (the torch model normalises with CLIP's statistics).

        Raises:
            ValueError: ``image_size`` differs from the size the backbone's positional embeddings were made for.

        """
        config = open_clip.get_model_config(backbone)
        native = config["vision_cfg"]["image_size"] if config else 240
        native_size = (native, native) if isinstance(native, int) else tuple(native)
        if image_size is not None and tuple(image_size) != native_size:
            msg = f"H2VLR image_size must equal the input size of '{backbone}' {native_size}, got {tuple(image_size)}."
            raise ValueError(msg)
        transform = Compose([Resize(native_size, antialias=True, interpolation=InterpolationMode.BICUBIC)])
        return CrossDomainPreProcessor(transform=transform)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD over the learnable parts (prompt contexts, Local tokens, Psi, hypergraph layers and weights, heads)."""
        options = self.options
        return torch.optim.SGD(
            self.model.learnable_parameters(),
            lr=options.lr,
            momentum=options.momentum,
            weight_decay=options.weight_decay,
        )

    # -------------------------------------------------------------------------------------------------- data
    def setup(self, stage: str) -> None:
        """Before fitting: name the object class after the datamodule's category and keep the k seeded shots."""
        super().setup(stage)  # CheckpointGuard: checkpoint files that cannot be read are named in the error
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.options.class_name is None:
            category = str(getattr(datamodule, "category", "") or "")
            class_name = category or DEFAULT_CLASS_NAME
            logger.info("H2VLR prompts name the object class '%s' (from the datamodule's category).", class_name)
            self.model.set_class_name(class_name)
        if self.options.k_shot is not None:
            self._keep_shots(datamodule)

    def _keep_shots(self, datamodule: Any) -> None:
        """Reduce the datamodule's training set to ``k_shot`` seeded normal shots (see the module docstring)."""
        k_shot, seed = self.options.k_shot, self.options.seed
        if datamodule is None or not hasattr(datamodule, "train_data"):
            msg = (
                f"H2VLR k_shot={k_shot} selects shots from a datamodule's training set, but training runs on "
                "plain dataloaders: pass a datamodule, or pass exactly the shots and leave k_shot=None."
            )
            raise ValueError(msg)
        datamodule_shots = getattr(datamodule, "k_shot", None)
        if datamodule_shots is not None and datamodule_shots != k_shot:
            msg = (
                f"The datamodule {type(datamodule).__name__} already selects k_shot={datamodule_shots} shots, but "
                f"H2VLR has k_shot={k_shot}: set the same value on both, or leave the model's k_shot=None."
            )
            raise ValueError(msg)
        train_data = datamodule.train_data
        if len(train_data) == k_shot and len(normal_positions(train_data)) == k_shot:
            return
        subset = few_shot_subset(train_data, k_shot, strategy=self.options.shot_selection, seed=seed)
        logger.info(
            "H2VLR k_shot=%d: training on %d of the %d training images of %s; the others are not used.",
            k_shot,
            len(subset),
            len(train_data),
            type(datamodule).__name__,
        )
        datamodule.train_data = subset
        if hasattr(datamodule, "target_train_data"):
            datamodule.target_train_data = subset

    def _support_images(self) -> tuple[torch.Tensor, list[str]]:
        """All shots, pre-processed, read from the training dataset (or, without a datamodule, the train loader)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        batches: Iterable[Batch] = []
        if datamodule is not None and getattr(datamodule, "train_data", None) is not None:
            dataset = datamodule.train_data
            batches = (
                dataset.collate_fn([dataset[index] for index in range(start, min(start + SUPPORT_CHUNK, len(dataset)))])
                for start in range(0, len(dataset), SUPPORT_CHUNK)
            )
        elif self.trainer.train_dataloader is not None:
            loader = self.trainer.train_dataloader
            if isinstance(loader, CombinedLoader):
                loader = loader.iterables
            if isinstance(loader, Mapping):
                loader = loader[TARGET]
            batches = loader
        transform = getattr(self.pre_processor, "transform", None)
        images, paths = [], []
        for batch in batches:  # resized chunk by chunk: raw dataset images can be large
            chunk = batch.image.to(self.device)
            images.append(transform(chunk) if transform is not None else chunk)
            paths += [str(path) for path in batch.image_path]
        if not images:
            msg = "H2VLR found no training images (the support shots); check the datamodule's training split."
            raise ValueError(msg)
        return torch.cat(images), paths

    def _check_no_normalisation(self) -> None:
        """Refuse a Normalize: the model normalises by itself and the Perlin anomalies need [0, 1] images."""
        transform = getattr(self.pre_processor, "transform", None)
        if transform is not None and extract_transforms_by_type(transform, Normalize):
            msg = (
                "The pre-processor of H2VLR must not contain Normalize: the model normalises with CLIP's statistics "
                "itself and synthesises anomalies on [0, 1] images. Use H2VLR.configure_pre_processor()."
            )
            raise ValueError(msg)

    # ---------------------------------------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        """Read the support set into the model (before the sanity check, so that validation can score)."""
        self._check_no_normalisation()
        if getattr(self.trainer, "datamodule", None) is not None:
            self._load_support()

    def _load_support(self) -> None:
        support, self.shots = self._support_images()
        if len(self.shots) > MANY_SHOTS:
            logger.warning(
                "H2VLR is a few-shot model but trains on %d images; set k_shot (or use FewShot) for k-shot training.",
                len(self.shots),
            )
        logger.info("H2VLR support set (%d shots): %s", len(self.shots), ", ".join(self.shots))
        self.model.set_support(support)
        self._support_batch = support  # the steps' images (shots and their synthetic anomalies) come from here
        self._inference_state_stale = False
        logger.info(
            "H2VLR: %d learnable parameters (%d prompts for class '%s').",
            self.model.num_learnable_parameters(),
            self.model.prompts.num_prompts,
            self.model.class_name,
        )

    def on_train_start(self) -> None:
        """Read the support set without a datamodule; warn when the last epoch is not validated."""
        if not self.model.is_fitted or self._support_batch is None:
            self._load_support()
        epochs = self.options.epochs
        final_epoch = min(epochs, self.trainer.max_epochs) if self.trainer.max_epochs else epochs
        every = self.trainer.check_val_every_n_epoch
        if self.trainer.enable_validation and every and final_epoch % every:
            logger.warning(
                "With check_val_every_n_epoch=%d, H2VLR's last epoch (%d) is not validated, so anomalib's "
                "normalisation and thresholds come from an earlier epoch (or are missing). Use a divisor of %d.",
                every,
                final_epoch,
                final_epoch,
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Let the first loader batch of an epoch run the epoch's steps; skip the rest of the epoch (-1)."""
        del batch
        return -1 if batch_idx > 0 else None

    def training_step(self, batch: Batch | dict[str, Batch], batch_idx: int) -> STEP_OUTPUT:
        """One epoch: SGD steps on Eq. 8 over the stored support set, ``batch_size`` shots per step.

        The loader's batch is not read (module docstring): the steps, their shots and their synthetic anomalies follow
        from ``seed``, the epoch and the step number alone.
        """
        del batch, batch_idx
        total = None
        for shots in self.epoch_batches(self.current_epoch):
            total = self._optimisation_step(shots)
        return {"loss": total}

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Return the support-set positions of the shots of each step of ``epoch``.

        All shots in one step when they fit ``batch_size``; otherwise a permutation drawn from ``(seed, epoch)``, cut
        into steps of ``batch_size`` (each sorted).
        """
        if self._support_batch is None:
            msg = "H2VLR has no support images: training starts with on_fit_start/on_train_start."
            raise RuntimeError(msg)
        num_shots, batch_size = self._support_batch.shape[0], self.options.batch_size
        if num_shots <= batch_size:
            return [torch.arange(num_shots)]
        with seeded(self.options.seed, "shot order", epoch):
            order = torch.randperm(num_shots)
        return [chunk.sort().values for chunk in order.split(batch_size)]

    def _optimisation_step(self, shot_index: torch.Tensor) -> torch.Tensor:
        """One SGD step on the shots ``shot_index`` and their synthetic anomalies (keyed by seed, step and shot)."""
        shots = self._support_batch[shot_index.to(self._support_batch.device)]
        synthetic = self.synthesizer(shots, shot_index.to(self.device), step=self.global_step)
        losses = self.model.training_losses(synthetic.images, synthetic.masks, synthetic.shot_index, synthetic.clean)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(losses.total)
        optimizer.step()
        self._inference_state_stale = True
        batch_size = synthetic.images.shape[0]
        self.log(
            "train/loss", losses.total.detach(), prog_bar=True, on_step=False, on_epoch=True, batch_size=batch_size
        )
        for name, value in losses._asdict().items():
            if name != "total":
                self.log(f"train/loss_{name}", value.detach(), on_step=False, on_epoch=True, batch_size=batch_size)
        return losses.total.detach()

    def on_train_epoch_end(self) -> None:
        """Log progress; stop the trainer after ``epochs`` epochs."""
        epoch, epochs = self.current_epoch + 1, self.options.epochs
        metrics = self.trainer.callback_metrics
        if epoch == 1 or epoch % 10 == 0 or epoch >= epochs:
            loss = metrics.get("train/loss")
            logger.info("H2VLR epoch %d/%d: L = %s", epoch, epochs, f"{float(loss):.5f}" if loss is not None else "n/a")
        if epoch >= epochs:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        """Bring the inference buffers up to date with the last step."""
        self._refresh_if_stale()

    def _refresh_if_stale(self) -> None:
        if self._inference_state_stale and self.model.support_tokens.numel():
            self.model.refresh_inference_state()
            self._inference_state_stale = False

    # --------------------------------------------------------------------------------------------- evaluation
    def on_validation_start(self) -> None:
        """Score with the current parameters (the encoded prompts are refreshed after training steps)."""
        self._refresh_if_stale()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch with the torch model."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store fresh inference buffers, the prompts' class name and the shots; leave out rebuildable CLIP weights."""
        super().on_save_checkpoint(checkpoint)
        state_dict = checkpoint["state_dict"]
        if self._inference_state_stale and self.model.support_tokens.numel():
            self._refresh_if_stale()
            for name, buffer in self.model.named_buffers():
                key = f"model.{name}"
                if key in state_dict:
                    state_dict[key] = buffer.detach().clone()
        record: dict[str, Any] = {"class_name": self.model.class_name, "shots": list(self.shots)}
        if not self.save_backbone_weights:
            for key in [key for key in state_dict if key.startswith(BACKBONE_PREFIX)]:
                del state_dict[key]
            if self._backbone_fingerprint is None:  # the CLIP weights are frozen: one fingerprint per model
                self._backbone_fingerprint = self.model.backbone.weights_fingerprint()
            record["backbone_fingerprint"] = self._backbone_fingerprint
            record["backbone_source"] = self.backbone_source
        checkpoint[CHECKPOINT_KEY] = record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the prompts for the checkpoint's class and restore left-out CLIP weights, then check the fit.

        The check (:class:`~anomalib_hypergraph.models.checkpoints.CheckpointGuard`) refuses checkpoints of other
        models and of other architecture options, and names every other option that differs.
        """
        record = checkpoint.get(CHECKPOINT_KEY)
        state_dict = checkpoint.get("state_dict")
        if isinstance(record, Mapping) and isinstance(state_dict, dict):
            self.model.set_class_name(record["class_name"])
            self.shots = list(record.get("shots", []))
            self._backbone_fingerprint = None
            if "backbone_fingerprint" in record and not any(key.startswith(BACKBONE_PREFIX) for key in state_dict):
                self._restore_backbone_weights(state_dict, record)
        super().on_load_checkpoint(checkpoint)

    def _restore_backbone_weights(self, state_dict: dict[str, Any], record: Mapping[str, Any]) -> None:
        """Fill the checkpoint's left-out CLIP weights from this model's, after checking they are the same weights."""
        expected = record.get("backbone_fingerprint")
        actual = self.model.backbone.weights_fingerprint()
        if expected != actual:
            msg = (
                f"This H2VLR checkpoint was trained on the CLIP weights of {record.get('backbone_source', '?')} "
                f"(SHA-256 {str(expected)[:12]}...), which it does not contain, but this model was built with other "
                f"weights (SHA-256 {actual[:12]}...). Build it with the same backbone, pretrained_tag and "
                "pretrained_weights as the training run."
            )
            raise ValueError(msg)
        self._backbone_fingerprint = actual
        for name, tensor in self.model.backbone.clip.state_dict().items():
            state_dict[BACKBONE_PREFIX + name] = tensor


# The options' documentation has one source, H2VLROptions: it becomes the Args entries of this class (read by Python's
# help() and by the CLI's --help through jsonargparse).
H2VLR.__doc__ = (H2VLR.__doc__ or "").replace("    Args:\n", "    Args:\n" + options_docstring() + "\n", 1)
