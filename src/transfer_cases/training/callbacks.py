"""Callbacks of `transfer-train`: `FreezeGuard` (a run fails loudly if its frozen prefix changes or
leaves eval mode), `NonFiniteGuard` (a diverged run fails instead of reporting NaN as "ok"),
`MetricsHistory` (a resumed run keeps its metrics history) and `LastCheckpoint` (last.ckpt for
resuming, at a bounded cost)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from transfer_cases.training.loggers import HistoryCSVLogger
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.digest import tensor_digest
from transfer_cases.utils.errors import ConfigError
from transfer_cases.utils.validate import number


def frozen_digest(module: TransferModule) -> str:
    """SHA-256 of every parameter and buffer of the frozen prefix (BatchNorm statistics included)."""
    return tensor_digest(module.backbone.frozen_state().items())


class FreezeGuard(L.Callback):
    """Checks the frozen-means-frozen invariants during fit, on every rank.

    At each training step the frozen stages must be in eval mode; at epoch ends (at most every
    `check_interval_s` seconds: a digest of the body can cost more than an epoch of a head on
    cached features), before every checkpoint and when training ends, their weights and BatchNorm
    statistics must be bit-identical to those at the start of training: taken in
    `on_train_start`, after every strategy has restored a resumed run's checkpoint (some, such as
    FSDP and DeepSpeed, restore it after `on_fit_start`). Under DDP it also
    checks that DDP was not asked to look for unused parameters (frozen ones are excluded up front).
    Each fit checks its own frozen prefix: LP-FT's probe phase the whole body, the fine-tuning phase
    the case's prefix. With `bn_mode: eval`, every BatchNorm layer of the body must stay in eval mode.
    With `report_dir`, each rank writes `freeze_guard_rank<N>.json` with its digests, for tests
    (`freeze_guard_probe_rank<N>.json` for the probe phase).
    """

    def __init__(self, report_dir: str | None = None, check_interval_s: float = 0.0) -> None:
        self.report_dir = report_dir
        self.check_interval_s = float(check_interval_s)
        self.start_digest = ""
        self.find_unused: bool | None = None
        self._checked_at = time.monotonic()
        self._frozen_modules: list[torch.nn.Module] = []
        self._body_bn: list[torch.nn.Module] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, TransferModule)
        self.start_digest = frozen_digest(pl_module)
        self._checked_at = time.monotonic()
        # Listed once: walking the module tree every step costs more than a head's step on features.
        body = pl_module.backbone
        self._frozen_modules = [m for stage in body.stages[: body.num_frozen] for m in stage.modules()]
        bn = torch.nn.modules.batchnorm._BatchNorm
        self._body_bn = [m for m in body.modules() if isinstance(m, bn)] if body.bn_eval else []
        wrapped = trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            self.find_unused = bool(wrapped.find_unused_parameters)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if any(m.training for m in self._frozen_modules):
            raise RuntimeError(
                "FreezeGuard: a frozen stage is in train mode; its BatchNorm statistics would move"
            )
        if any(m.training for m in self._body_bn):
            raise RuntimeError("FreezeGuard: bn_mode=eval but a BatchNorm layer of the body is in train mode")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        # Every rank checks its own copy, so ranks need not agree on when.
        if time.monotonic() - self._checked_at >= self.check_interval_s:
            self._check(pl_module, f"during epoch {trainer.current_epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._check(pl_module, f"by the end of training (epoch {trainer.current_epoch - 1} or earlier)")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Whatever the interval, no checkpoint is written with a changed frozen body.
        if self.start_digest and trainer.training:
            self._check(pl_module, f"by epoch {trainer.current_epoch} (found before writing a checkpoint)")

    def _check(self, pl_module: Any, when: str) -> None:
        if frozen_digest(pl_module) != self.start_digest:
            raise RuntimeError(
                f"FreezeGuard: the frozen stages changed {when} (weights or BatchNorm statistics)"
            )
        self._checked_at = time.monotonic()

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self.report_dir:
            return
        out = Path(self.report_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "start": self.start_digest,
            "end": frozen_digest(pl_module),
            "find_unused_parameters": self.find_unused,
            "epochs": trainer.current_epoch,
            "phase": pl_module.phase,
            "frozen_stages": pl_module.backbone.num_frozen,
        }
        name = "" if pl_module.phase == "fit" else f"{pl_module.phase}_"
        (out / f"freeze_guard_{name}rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=2))


class NonFiniteGuard(L.Callback):
    """A NaN or infinite loss or weight stops the run with one error naming the likely setting.

    A diverged run otherwise trains on, validates NaN logits, writes (and marks best) checkpoints of
    NaN weights and ends with status "ok". The training loss is flagged on the device at every step
    (no host sync per step); the flag and the trainable weights are checked before every validation
    and every checkpoint (checkpoint callbacks run after this one), and at every epoch's end. The
    validation loss is checked when validation ends, before `ModelCheckpoint` ranks the epoch.
    """

    def __init__(self) -> None:
        self._bad_loss: torch.Tensor | None = None
        self._bad_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bad_loss, self._bad_step = None, -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        # On one CPU process the check is free: stop at once. Under DDP every rank must stop at the
        # same point (a rank that left would leave the others waiting in a collective), so the flag
        # waits for the next check, which all ranks reach.
        if loss.device.type == "cpu" and trainer.world_size == 1 and bool(bad):
            self._bad_step = trainer.global_step
            self._check(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training and not trainer.sanity_checking:
            self._check(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.training:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            raise ConfigError(_diverged(trainer, pl_module, f"the validation loss is {float(loss)}"))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.training:
            self._check(trainer, pl_module)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bad_loss = self._bad_loss is not None and bool(self._bad_loss)
        if trainer.strategy.reduce_boolean_decision(bad_loss, all=False):  # any rank's loss
            at = f" (step {self._bad_step})" if self._bad_step >= 0 else ""
            raise ConfigError(_diverged(trainer, pl_module, f"the training loss is not finite{at}"))
        trained = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        bad = None
        if trained:  # one host sync for all of them, then the name of the first bad one
            device = trained[0][1].device
            flags = torch.stack([p.detach().isfinite().all().to(device) for _, p in trained])
            if not bool(flags.all()):
                bad = trained[int((~flags).nonzero()[0])][0]
        if trainer.strategy.reduce_boolean_decision(bad is not None, all=False):  # sharded weights too
            what = f"the weights {bad}" if bad else "weights (on another process)"
            raise ConfigError(_diverged(trainer, pl_module, f"{what} are not finite"))


def _diverged(trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> str:
    """The message of a diverged run: what is not finite, when, and the settings that make it so."""
    optimizer = dict(getattr(pl_module, "hparams", {}).get("optimizer") or {})
    lr, decay = optimizer.get("lr"), optimizer.get("weight_decay")
    precision = str(trainer.precision)
    suspects = []
    if precision.startswith("16") or precision.startswith("bf16-true"):
        cpu = " on the CPU" if trainer.strategy.root_device.type == "cpu" else ""
        suspects.append(f"trainer.precision={precision}{cpu} (use 32-true, or 16-mixed on a GPU)")
    if decay is not None and not _finite_number(decay):
        suspects.insert(0, f"model.optimizer.weight_decay={decay} (e.g. 1e-4)")
    if lr is not None and not _finite_number(lr):
        suspects.insert(0, f"model.optimizer.lr={lr} (e.g. 1e-3)")
    if not suspects:
        suspects = [
            f"a lower learning rate model.optimizer.lr (now {lr})",
            f"model.optimizer.weight_decay (now {decay})",
            f"trainer.precision (now {precision})",
        ]
    return (
        f"training diverged at epoch {trainer.current_epoch}: {what}, so no checkpoint of these "
        f"weights is kept as best; check {', or '.join(suspects)}"
    )


def _finite_number(value: Any) -> bool:
    try:
        return bool(torch.isfinite(torch.tensor(float(value))))
    except (TypeError, ValueError):
        return False


class MetricsHistory(L.Callback):
    """A run resumed into its own folder keeps its metrics history, each epoch once.

    When training starts (after a checkpoint is restored), the earlier rows of the epochs this run
    is about to redo are dropped from every `HistoryCSVLogger`; the rows of finished epochs stay.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, HistoryCSVLogger):
                dropped = logger.drop_rows_from(trainer.global_step, trainer.current_epoch)
                if dropped:
                    rank_zero_info(
                        f"{logger.log_dir}/metrics.csv: dropped {dropped} earlier rows of epochs "
                        f">= {trainer.current_epoch}, which this run redoes"
                    )


class LastCheckpoint(Checkpoint):
    """`last.ckpt` after finished epochs, whatever the metric did, for `ckpt_path=` resumes.

    `ModelCheckpoint(save_last=True)` rewrites last.ckpt only when its monitored metric improves
    (Lightning 2.6; Lightning-AI/pytorch-lightning#7138 asks for the epoch-wise one), so a resume would
    silently redo epochs. A checkpoint holds the whole model and optimizer, which costs most of the
    time of a head trained on cached features: an epoch's checkpoint is skipped while the previous one
    is less than `min_interval_s` seconds old, and the final state is always written when training
    ends. An interruption then loses at most the unfinished epoch plus `min_interval_s` of training;
    `min_interval_s: 0` writes every epoch. Under DDP every rank follows rank 0's clock, since a save
    is a collective call. A `Checkpoint`, so Lightning runs it after the other callbacks (the best
    `ModelCheckpoint` included): last.ckpt holds their state of the same epoch.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last", min_interval_s: float = 0.0) -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.min_interval_s = number(0, example=10)(
            min_interval_s, "callbacks.last_checkpoint.min_interval_s"
        )
        self._saved_at = time.monotonic()
        self._saved_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_at, self._saved_step = time.monotonic(), trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        recent = time.monotonic() - self._saved_at < self.min_interval_s
        if not trainer.strategy.broadcast(recent, src=0):
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)  # the final state, unless that epoch's was just written

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        trainer.save_checkpoint(self.path)
        self._saved_at, self._saved_step = time.monotonic(), trainer.global_step
