"""The LightningModule: a case applied to a staged body, plus a new head sized from the data."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from transfer_cases.features.batch import FeatureBatch
from transfer_cases.training.cases import Case
from transfer_cases.training.heads import make_head
from transfer_cases.training.preprocess import Preprocess
from transfer_cases.training.schedule import replan_restored_schedules
from transfer_cases.utils.config import instantiate_clean, to_dict
from transfer_cases.utils.errors import ConfigError

EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training\."


@contextmanager
def frozen_eval_mode_expected() -> Iterator[None]:
    """Around `trainer.fit`: Lightning warns at every fit that modules are in eval mode, which the
    frozen stages are by design (their BatchNorm statistics must not move). The template warns
    itself about trainable modules left in eval mode (`_train_mode_for_training`), so this one
    message, by its exact text, is not shown while the block runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training\."
        )
        yield


DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 1e-4}


class TransferModule(L.LightningModule):
    """Image classifier built from a case, a backbone config and the data's class count.

    Only configuration is saved in checkpoints (plain dicts), never modules, so
    `TransferModule.load_from_checkpoint(path)` needs no extra arguments and the file loads
    with `torch.load(weights_only=True)`.

    Args:
        backbone: backbone config with `_target_` (e.g. `TorchvisionBackbone`, `TinyCNN`).
        case: case config (`name`, `init`, `keep`, `freeze`, `body_lr_scale`).
        num_classes: from the data module.
        class_names: from the data module; stored for prediction.
        head: `make_head` options (`kind`, `hidden`, `dropout`).
        optimizer: `_partial_` optimizer config; called with the param groups.
        scheduler: optional `_partial_` LR-scheduler config; called with the optimizer (stepped per epoch).
        preprocess: the preprocessing of the weights; taken from the backbone when None.
        label_smoothing: cross-entropy label smoothing.
        channels_last: NHWC memory format for weights and inputs (faster convolutions with AMP on GPUs).
        load_pretrained: load the backbone's weights file; turned off in saved checkpoints,
            whose state dict already holds every weight.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        case: dict[str, Any],
        num_classes: int,
        class_names: list[str] | None = None,
        head: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        preprocess: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        load_pretrained: bool = True,
    ) -> None:
        super().__init__()
        # Plain containers only (Hydra passes DictConfigs): hparams must load with weights_only=True.
        backbone, case, head, optimizer, scheduler = map(
            to_dict, (backbone, case, head, optimizer, scheduler)
        )
        self.case = Case.from_config(case)
        body = instantiate_clean(backbone).build(pretrained=self.case.pretrained and load_pretrained)
        self.preprocess = Preprocess.from_dict(preprocess) if preprocess else body.preprocess
        # Cut and freeze here, in __init__: before any optimizer or DDP wrapper sees the parameters.
        self.backbone = self.case.apply(body)
        self.head = make_head(self.backbone.out_features, num_classes, **(head or {}))
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ConfigError(f"{len(self.class_names)} class names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.hparams.update(preprocess=self.preprocess.to_dict(), class_names=self.class_names)
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # Losses averaged over the epoch's samples (weighted by batch size), synced across ranks.
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self._training_before_eval = True  # see on_validation_model_eval
        # "fit", or "probe" during LP-FT's head warm-up (see recipe.py); saved in checkpoints so that
        # a resume restores the phase it was in (`resume_phase`, set by `build`).
        self.phase = "fit"
        self.resume_phase: str | None = None

    # -- forward (timm's names) ----------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) → the kept body's pooled features (N, C)."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, C) → logits."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_cached(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from the frozen body's cached features: (N, C), or (N, V, C) for V augmented views
        of which epoch e uses view e mod V. Only a fully frozen body has features that never change."""
        if not self.backbone.fully_frozen:
            raise RuntimeError("cached features given to a model whose body is not fully frozen")
        if features.ndim == 3:
            features = features[:, self.current_epoch % features.shape[1]]
        return self.forward_head(features)

    def _logits(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """A `FeatureBatch` goes to the head; any other batch holds images and goes through the body."""
        return self.forward_cached(batch[0]) if isinstance(batch, FeatureBatch) else self(batch[0])

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)

    def use_preprocess(self, preprocess: Preprocess) -> None:
        """Store the preprocessing the data module applies (the weights', at `data.image_size` when
        set): the checkpoint must carry what the head was trained and validated with, so that
        eval, predict and export feed images the same way."""
        self.preprocess = preprocess
        self.hparams.update(preprocess=preprocess.to_dict())

    # -- parameters -----------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters only: the head at the base LR, trainable body stages scaled."""
        lr = float((self.hparams.optimizer or DEFAULT_OPTIMIZER).get("lr", DEFAULT_OPTIMIZER["lr"]))
        groups = [
            {"name": "head", "params": [p for p in self.head.parameters() if p.requires_grad], "lr": lr}
        ]
        body = [p for p in self.backbone.parameters() if p.requires_grad]
        if body:
            if self.case.body_lr_scale == 0:
                raise ConfigError(
                    f"case '{self.case.name}' trains {len(body)} body tensors with body_lr_scale=0: "
                    "freeze them instead (case.freeze=all) or give them a learning rate"
                )
            groups.append({"name": "body", "params": body, "lr": lr * self.case.body_lr_scale})
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = instantiate_clean(self.hparams.optimizer or DEFAULT_OPTIMIZER)(self.param_groups())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate_clean(self.hparams.scheduler)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -- loops ----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._train_mode_for_training()
        counts = self.parameter_counts()
        rank_zero_info(
            f"case={self.case.name} body={self.backbone.name} stages kept={self.backbone.depth} "
            f"frozen={self.backbone.num_frozen} | trainable params {counts['trainable']:,} "
            f"| frozen params {counts['frozen']:,}"
        )
        for logger in self.loggers:
            logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path and self.hparams.scheduler:
            replan_restored_schedules(self.trainer.lr_scheduler_configs, self.hparams.scheduler)

    # Around every validation loop Lightning sets eval mode, then restores each module's recorded mode
    # one by one: a walk of the whole body every epoch. The mode to return
    # to is the module's own, which `train()` sets part by part (the frozen prefix stays in eval).
    def on_validation_model_eval(self) -> None:
        self._training_before_eval = self.training
        super().on_validation_model_eval()

    def on_validation_model_train(self) -> None:
        self.trainer.model.train(self._training_before_eval)

    def _train_mode_for_training(self) -> None:
        """Trainable modules train; the frozen prefix stays in eval mode, and only that is silenced.

        Lightning keeps the modes a model comes with and warns about every module in eval mode. Ours
        are the frozen stages, on purpose, so that warning is silenced from here until
        `on_train_start` (it is issued in between) and only for exactly their number. A module in
        eval mode as a whole (as `checkpoint.load_module` returns it) would fine-tune with dropout
        off and BatchNorm statistics stuck: its trainable part is put in train mode, with a warning.
        """
        before = {name: m.training for name, m in self.named_modules()}
        self.train()  # StagedBody.train keeps the frozen prefix in eval mode
        switched = [name for name, m in self.named_modules() if name and m.training and not before[name]]
        if switched:
            modules = dict(self.named_modules())
            outermost = [
                n
                for n in switched
                if n.rpartition(".")[0] not in set(switched) and any(True for _ in modules[n].parameters())
            ]
            rank_zero_warn(
                f"{len(switched)} trainable module(s) were in eval mode at the start of training "
                f"(in {', '.join(outermost)}), as in a module from checkpoint.load_module; put them in "
                "train mode so that dropout and the BatchNorm statistics of the trained layers work "
                "as in training"
            )

    # Epoch metrics are torchmetrics states updated every step and logged once, at the epoch's end:
    # a `self.log` call costs more than a step of a head on cached features (Lightning moves its
    # result collection each call), and torchmetrics syncs the states across DDP ranks on compute.
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        y = batch[1]
        logits = self._logits(batch)
        loss = self.loss(logits, y)
        self.train_acc.update(logits.detach(), y)
        self.train_loss.update(loss.detach(), len(y))
        # The step's loss (this rank's, never synced per step), for the progress bar and the logger:
        # logged on the steps the logger writes (`trainer.log_every_n_steps`), not on every step.
        every = self._trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % every == 0:
            self.log("train/loss_step", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_epoch({"train/loss_epoch": self.train_loss, "train/acc": self.train_acc}, prog_bar=False)

    def _eval_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, loss: MeanMetric
    ) -> None:
        y = batch[1]
        logits = self._logits(batch)
        loss.update(self.loss(logits, y), len(y))
        metrics.update(logits, y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch({"val/loss": self.val_loss, "val/": self.val_metrics})

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self._log_epoch({"test/loss": self.test_loss, "test/": self.test_metrics})

    def _log_epoch(self, states: dict[str, Any], prog_bar: bool = True) -> None:
        """Compute, log and reset epoch metrics (a collection's keys already carry their prefix).

        A state that saw no batch this epoch (validation switched off, a resumed run) is skipped."""
        values: dict[str, torch.Tensor] = {}
        for key, state in states.items():
            members = state.values() if isinstance(state, MetricCollection) else [state]
            if not any(m.update_called for m in members):
                continue
            computed = state.compute()
            values.update(computed if isinstance(computed, dict) else {key: computed})
            state.reset()
        if values:
            # Already synced by torchmetrics; sync_dist only averages equal values (and says so).
            self.log_dict(values, prog_bar=prog_bar, sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).softmax(dim=1)

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The state dict carries every weight: reloading must not need the original weights file
        # (or a download), so the saved config says not to load it.
        checkpoint["hyper_parameters"]["load_pretrained"] = False
        checkpoint["phase"] = self.phase
