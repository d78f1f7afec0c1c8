"""Callbacks of `transfer-train`: `FreezeGuard` (a run fails loudly if its frozen prefix changes or
leaves eval mode) and `MetricsHistory` (a resumed run keeps its metrics history)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from transfer_cases.loggers import HistoryCSVLogger
from transfer_cases.module import TransferModule


def frozen_digest(module: TransferModule) -> str:
    """SHA-256 of every parameter and buffer of the frozen prefix (BatchNorm statistics included)."""
    h = hashlib.sha256()
    for name, tensor in module.backbone.frozen_state().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FreezeGuard(L.Callback):
    """Checks the frozen-means-frozen invariants during fit, on every rank.

    At each training step the frozen stages must be in eval mode; at each epoch end their weights
    and BatchNorm statistics must be bit-identical to those at the start of training: taken in
    `on_train_start`, after every strategy has restored a resumed run's checkpoint (some, such as
    FSDP and DeepSpeed, restore it after `on_fit_start`). Under DDP it also
    checks that DDP was not asked to look for unused parameters (frozen ones are excluded up front).
    With `report_dir`, each rank writes `freeze_guard_rank<N>.json` with its digests, for tests.
    """

    def __init__(self, report_dir: str | None = None) -> None:
        self.report_dir = report_dir
        self.start_digest = ""
        self.find_unused: bool | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, TransferModule)
        self.start_digest = frozen_digest(pl_module)
        wrapped = trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            self.find_unused = bool(wrapped.find_unused_parameters)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        body = pl_module.backbone
        if any(m.training for stage in body.stages[: body.num_frozen] for m in stage.modules()):
            raise RuntimeError(
                "FreezeGuard: a frozen stage is in train mode; its BatchNorm statistics would move"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if frozen_digest(pl_module) != self.start_digest:
            raise RuntimeError(
                f"FreezeGuard: the frozen stages changed during epoch {trainer.current_epoch} "
                "(weights or BatchNorm statistics)"
            )

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
        }
        (out / f"freeze_guard_rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=2))


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
