"""H2VLR as an anomalib model: few-shot prompt and hypergraph learning on the k support shots, inside Lightning.

Paper: "H2VLR: heterogeneous hypergraph vision-language reasoning for few-shot anomaly detection" (arXiv 2604.14507).

How the stock ``Engine`` / ``anomalib train`` drives it:

- ``learning_type`` is ``ONE_CLASS`` so that ``Engine.fit`` really runs ``trainer.fit`` (anomalib skips training for
  ``FEW_SHOT`` models, and H2VLR must learn its prompts, mapper, hypergraph layers and heads).
- Shots. With ``k_shot`` set, ``setup("fit")`` keeps k seeded normal images of the datamodule's training set
  (``few_shot_subset``: ``shot_selection="random"`` with ``seed``, or ``"first"``) and logs their paths; the other
  training images are not used. A datamodule that already selected its shots (``FewShot``, the cross-domain
  datamodules) must agree with ``k_shot``, or ``k_shot`` is left at None.
- The support set is read once at fit start from the training dataset (through the pre-processor): support gallery,
  global support feature G_s and the shots' tokens go into the torch model's buffers.
- One trainer epoch is one pass over the shots (the paper's batch is the whole support set; anomalib's default train
  batch size of 32 holds it); each step adds a Perlin synthetic-anomaly copy of every shot, minimises Eq. 8 with SGD
  (lr 2e-3) and logs every loss term. The model stops the trainer after ``epochs`` (paper: 100) epochs.
- Cross-domain datamodules: the ``target`` batches are the shots, ``source`` batches are ignored, and an epoch ends
  after one pass over the target shots.

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
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_hypergraph.backbones import register_open_clip_config
from anomalib_hypergraph.data import few_shot_subset
from anomalib_hypergraph.data.domains import TARGET, CrossDomainPreProcessor, split_domains
from anomalib_hypergraph.data.few_shot import ShotSelection, check_shot_arguments, normal_positions
from anomalib_hypergraph.models.checkpoints import CheckpointGuard, CheckpointSpec
from anomalib_hypergraph.models.run_guard import RunGuard

from .losses import LossConfig
from .prompts import PROMPT_GROUPS
from .synthesis import SupportAnomalySynthesizer
from .torch_model import DEFAULT_CLASS_NAME, H2VLRModel

logger = logging.getLogger(__name__)

MANY_SHOTS = 16  # above this many training images H2VLR warns that it is a few-shot model
SUPPORT_CHUNK = 16  # support images read and resized per chunk
SEED_STRIDE = 1_000_003  # separates the per-step seeds of different ``seed`` values
CHECKPOINT_KEY = "h2vlr"
BACKBONE_PREFIX = "model.backbone.clip."

# How H2VLR's options relate to its checkpoints (see anomalib_hypergraph.models.checkpoints). Options not listed
# (alpha, eta, sigma, text_temperature, K of both hyperedge kinds) change a loaded model's scores and are warned about.
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
            "use_sghm",
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
            "lr",
            "momentum",
            "weight_decay",
            "anomalies_per_shot",
            "anomaly_source_path",
            "residual_scale",
            "image_head_init",
            "use_hsr",
            "lambda_str",
            "lambda_seg",
            "lambda_image",
            "laplacian_weight",
            "focal_gamma",
            "eam_margin",
            "triplet_margin",
            "leave_one_out",
            "chunk_size",
            "save_backbone_weights",
        }
    ),
    derived_state_keys=("model.blur.kernel",),  # the 2-D blur kernel older checkpoints hold
)


class H2VLR(RunGuard, CheckpointGuard, AnomalibModule):
    """H2VLR: few-shot anomaly detection by heterogeneous hypergraph vision-language reasoning.

    Args:
        backbone: open_clip architecture (paper: ``ViT-B-16-plus-240``).
        pretrained: load the pretrained CLIP weights ``pretrained_tag`` (hub); False = random weights (tests).
        pretrained_tag: open_clip pretrained tag (paper: ``laion400m_e32``).
        pretrained_weights: local state dict of the whole CLIP model, for machines without hub access.
        backbone_config: open_clip model config (dict) for an architecture open_clip does not ship.
        class_name: object class named in the prompts; None = the datamodule's category (``"object"`` without one).
        k_shot: number of normal training images kept as the support set; None = all of the datamodule's training
            images (use with ``FewShot`` or the cross-domain datamodules).
        shot_selection: ``"random"`` (seeded) or ``"first"`` (first k in sorted path order).
        seed: seed of everything random: the shot selection, the initialisation (random CLIP weights, prompt
            vectors, hypergraph layers, heads) and the synthetic anomalies (one draw per step from ``seed`` and the
            step number, the same on every rank); private generators, so torch's global seed does not matter.
        epochs: training epochs = optimisation steps over the whole support set (paper: 100).
        lr: SGD learning rate (paper: 2e-3).
        momentum: SGD momentum (ours: 0.9).
        weight_decay: SGD weight decay (ours: 0).
        anomalies_per_shot: Perlin synthetic-anomaly copies of each shot per step.
        anomaly_source_path: optional texture folder for the synthetic anomalies (None: Perlin noise textures).
        image_size: model input size; None = the backbone's (240 for ``ViT-B-16-plus-240``); must match it.
        token_source: text-aligned patch tokens from the value-value ``"surgery"`` stream or the ``"final"`` tokens.
        surgery_depth: blocks of the value-value stream (None: half of the blocks).
        gallery_layers: 0-based blocks whose tokens form the visual support gallery (paper: 2 and 7).
        context_init: words initialising the learnable prompt context.
        context_length: context vectors per prompt when ``context_init`` is None.
        prompt_groups: abnormal prompt groups, subset of ``("global", "special", "local")``.
        num_local_prompts: Local prompts.
        local_prompt_tokens: learnable anomaly tokens per Local prompt.
        num_neighbors: K of the structural hyperedges (paper: 8).
        num_semantic_neighbors: K of the semantic hyperedges (paper: 8).
        num_layers: hypergraph layers L (paper: 2).
        head_reduction: hidden size of the anomaly head = D / ``head_reduction``.
        alpha: text-map weight of the base map, Eq. 5 (paper: 0.5).
        eta: residual-correction weight, Eq. 7 (paper: 0.4).
        residual_scale: initial learnable beta of Eq. 6.
        histogram_bins: soft-histogram bins of the image head.
        image_head_hidden: hidden units of the image-head MLP.
        image_head_init: ``"tail"`` (starts increasing in the histogram's upper tail) or ``"random"`` initialisation.
        text_temperature: logit scale of text similarities (None: CLIP's own).
        sigma: Gaussian smoothing of the anomaly map (0: none).
        use_dsi: Table 4 ablation switch, Dynamic Semantic Induction (support conditioning, Eq. 1).
        use_sghm: Table 4 ablation switch, semantic-guided hypergraph module (Eq. 3-4, 6-7).
        use_hsr: Table 4 ablation switch, hypergraph structural regularisation L_str (Eq. 10).
        lambda_str: weight of L_str, Eq. 8 (paper: 0.02).
        lambda_seg: weight of L_seg, Eq. 8 (paper: 1.0).
        lambda_image: weight of the image-head BCE (ours).
        laplacian_weight: xi, weight of the Laplacian smoothness inside L_str (ours: 1).
        focal_gamma: focusing parameter of the focal losses (ours: 2).
        eam_margin: gamma of the explicit anomaly margin, Eq. 9 (ours: 0.1).
        triplet_margin: margin of the triplet term (ours: 0.1).
        leave_one_out: training images are matched against the other shots' gallery.
        chunk_size: block size of the cosine top-k searches.
        save_backbone_weights: keep the frozen CLIP weights (~830 MB for ``ViT-B-16-plus-240``) in checkpoints. None:
            only random weights (``pretrained=False``), which nothing else can reproduce; weights from the hub or a
            file are rebuilt from their source when the checkpoint loads and checked against a SHA-256 fingerprint.
        pre_processor: pre-processor or True for the resize to the backbone's size (no normalisation: the model
            normalises itself, the synthetic anomalies need [0, 1] images).
        post_processor: post-processor or True for anomalib's default.
        evaluator: evaluator or True for anomalib's default metrics.
        visualizer: visualizer or True for anomalib's default.

    """

    checkpoint_spec = CHECKPOINT_SPEC

    def __init__(
        self,
        *,
        backbone: str = "ViT-B-16-plus-240",
        pretrained: bool = True,
        pretrained_tag: str = "laion400m_e32",
        pretrained_weights: str | Path | None = None,
        backbone_config: dict[str, Any] | None = None,
        class_name: str | None = None,
        k_shot: int | None = None,
        shot_selection: ShotSelection = "random",
        seed: int = 0,
        epochs: int = 100,
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        anomalies_per_shot: int = 1,
        anomaly_source_path: str | Path | None = None,
        image_size: tuple[int, int] | None = None,
        token_source: str = "surgery",
        surgery_depth: int | None = None,
        gallery_layers: Sequence[int] = (2, 7),
        context_init: str | None = "a photo of a",
        context_length: int = 4,
        prompt_groups: Sequence[str] = PROMPT_GROUPS,
        num_local_prompts: int = 4,
        local_prompt_tokens: int = 2,
        num_neighbors: int = 8,
        num_semantic_neighbors: int = 8,
        num_layers: int = 2,
        head_reduction: int = 4,
        alpha: float = 0.5,
        eta: float = 0.4,
        residual_scale: float = 1.0,
        histogram_bins: int = 16,
        image_head_hidden: int = 32,
        image_head_init: str = "tail",
        text_temperature: float | None = None,
        sigma: float = 4.0,
        use_dsi: bool = True,
        use_sghm: bool = True,
        use_hsr: bool = True,
        lambda_str: float = 0.02,
        lambda_seg: float = 1.0,
        lambda_image: float = 1.0,
        laplacian_weight: float = 1.0,
        focal_gamma: float = 2.0,
        eam_margin: float = 0.1,
        triplet_margin: float = 0.1,
        leave_one_out: bool = True,
        chunk_size: int = 4096,
        save_backbone_weights: bool | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if k_shot is not None:
            check_shot_arguments(k_shot, shot_selection)
        if epochs < 1:
            msg = f"epochs must be >= 1, got {epochs}."
            raise ValueError(msg)
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
        self.model = H2VLRModel(
            backbone=backbone,
            pretrained=pretrained,
            pretrained_tag=pretrained_tag,
            pretrained_weights=pretrained_weights,
            backbone_config=backbone_config,
            class_name=class_name,
            token_source=token_source,
            surgery_depth=surgery_depth,
            gallery_layers=gallery_layers,
            context_init=context_init,
            context_length=context_length,
            prompt_groups=prompt_groups,
            num_local_prompts=num_local_prompts,
            local_prompt_tokens=local_prompt_tokens,
            num_neighbors=num_neighbors,
            num_semantic_neighbors=num_semantic_neighbors,
            num_layers=num_layers,
            head_reduction=head_reduction,
            alpha=alpha,
            eta=eta,
            residual_scale=residual_scale,
            histogram_bins=histogram_bins,
            image_head_hidden=image_head_hidden,
            image_head_init=image_head_init,
            text_temperature=text_temperature,
            sigma=sigma,
            use_dsi=use_dsi,
            use_sghm=use_sghm,
            use_hsr=use_hsr,
            loss_config=LossConfig(
                lambda_str=lambda_str,
                lambda_seg=lambda_seg,
                lambda_image=lambda_image,
                laplacian_weight=laplacian_weight,
                focal_gamma=focal_gamma,
                eam_margin=eam_margin,
                triplet_margin=triplet_margin,
            ),
            leave_one_out=leave_one_out,
            chunk_size=chunk_size,
            seed=seed,
        )
        self.synthesizer = SupportAnomalySynthesizer(anomalies_per_shot, anomaly_source_path)
        self.class_name = class_name
        self.k_shot = k_shot
        self.shot_selection = shot_selection
        self.seed = seed
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.automatic_optimization = False
        self.save_backbone_weights = (
            save_backbone_weights if save_backbone_weights is not None else not (pretrained or pretrained_weights)
        )
        self.backbone_source = str(pretrained_weights) if pretrained_weights else f"{backbone} / {pretrained_tag}"
        self._backbone_fingerprint: str | None = None
        self.shots: list[str] = []
        self._inference_state_stale = False
        self._batches_per_epoch: int | None = None

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

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Anomalib's default post-processing (normalisation and adaptive thresholds from validation)."""
        return PostProcessor()

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No trainer overrides: the user's ``--trainer.*`` flags are honoured as given."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """``ONE_CLASS``: trained on normal shots only and (unlike ``FEW_SHOT``) really trained by ``Engine.fit``."""
        return LearningType.ONE_CLASS

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD over the learnable parts (prompt contexts, Local tokens, Psi, hypergraph layers and weights, heads)."""
        return torch.optim.SGD(
            self.model.learnable_parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    # -------------------------------------------------------------------------------------------------- data
    def setup(self, stage: str) -> None:
        """Before fitting: name the object class after the datamodule's category and keep the k seeded shots."""
        super().setup(stage)  # CheckpointGuard: checkpoint files that cannot be read are named in the error
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.class_name is None:
            category = str(getattr(datamodule, "category", "") or "")
            class_name = category or DEFAULT_CLASS_NAME
            logger.info("H2VLR prompts name the object class '%s' (from the datamodule's category).", class_name)
            self.model.set_class_name(class_name)
        if self.k_shot is not None:
            self._keep_shots(datamodule)

    def _keep_shots(self, datamodule: Any) -> None:
        """Reduce the datamodule's training set to ``k_shot`` seeded normal shots (see the module docstring)."""
        if datamodule is None or not hasattr(datamodule, "train_data"):
            msg = (
                f"H2VLR k_shot={self.k_shot} selects shots from a datamodule's training set, but training runs on "
                "plain dataloaders: pass a datamodule, or pass exactly the shots and leave k_shot=None."
            )
            raise ValueError(msg)
        datamodule_shots = getattr(datamodule, "k_shot", None)
        if datamodule_shots is not None and datamodule_shots != self.k_shot:
            msg = (
                f"The datamodule {type(datamodule).__name__} already selects k_shot={datamodule_shots} shots, but "
                f"H2VLR has k_shot={self.k_shot}: set the same value on both, or leave the model's k_shot=None."
            )
            raise ValueError(msg)
        train_data = datamodule.train_data
        if len(train_data) == self.k_shot and len(normal_positions(train_data)) == self.k_shot:
            return
        subset = few_shot_subset(train_data, self.k_shot, strategy=self.shot_selection, seed=self.seed)
        logger.info(
            "H2VLR k_shot=%d: training on %d of the %d training images of %s; the others are not used.",
            self.k_shot,
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
        self._inference_state_stale = False
        logger.info(
            "H2VLR: %d learnable parameters (%d prompts for class '%s').",
            self.model.num_learnable_parameters(),
            self.model.prompts.num_prompts,
            self.model.class_name,
        )

    def on_train_start(self) -> None:
        """Read the support set without a datamodule; plan epoch lengths; warn when the last epoch is not validated."""
        if not self.model.is_fitted:
            self._load_support()
        loader = self.trainer.train_dataloader  # Lightning returns the iterables: a dict for cross-domain data
        if isinstance(loader, CombinedLoader):
            loader = loader.iterables
        self._batches_per_epoch = len(loader[TARGET]) if isinstance(loader, Mapping) else None
        final_epoch = min(self.epochs, self.trainer.max_epochs) if self.trainer.max_epochs else self.epochs
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
        """End a cross-domain epoch after one pass over the target shots (Lightning skips the rest on -1)."""
        if self._batches_per_epoch is not None and batch_idx >= self._batches_per_epoch:
            return -1
        return None

    def training_step(self, batch: Batch | dict[str, Batch], batch_idx: int) -> STEP_OUTPUT:
        """One SGD step on Eq. 8 over the shots of the batch and their synthetic-anomaly copies."""
        del batch_idx
        _, shots = split_domains(batch)  # cross-domain batches: only the target shots are used
        shot_index = self._shot_index(shots.image_path)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # Perlin draws: seeded per step, identical on every rank
            torch.manual_seed(self.seed * SEED_STRIDE + self.global_step)
            synthetic = self.synthesizer(shots.image, shot_index)
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
        return {"loss": losses.total.detach()}

    def _shot_index(self, paths: Sequence[str]) -> torch.Tensor:
        """Position of each batch image in the support set (by path)."""
        positions = {path: index for index, path in enumerate(self.shots)}
        missing = [str(path) for path in paths if str(path) not in positions]
        if missing:
            msg = f"Training images outside the support set read at fit start: {missing[:3]}."
            raise RuntimeError(msg)
        return torch.tensor([positions[str(path)] for path in paths], device=self.device)

    def on_train_epoch_end(self) -> None:
        """Log progress; stop the trainer after ``epochs`` epochs."""
        epoch = self.current_epoch + 1
        metrics = self.trainer.callback_metrics
        if epoch == 1 or epoch % 10 == 0 or epoch >= self.epochs:
            loss = metrics.get("train/loss")
            logger.info(
                "H2VLR epoch %d/%d: L = %s", epoch, self.epochs, f"{float(loss):.5f}" if loss is not None else "n/a"
            )
        if epoch >= self.epochs:
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
