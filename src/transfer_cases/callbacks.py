"""`FreezeGuard`: a run fails loudly if its frozen prefix changes or leaves eval mode."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

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
    and BatchNorm statistics must be bit-identical to those at the start of fit. Under DDP it also
    checks that DDP was not asked to look for unused parameters (frozen ones are excluded up front).
    With `report_dir`, each rank writes `freeze_guard_rank<N>.json` with its digests, for tests.
    """

    def __init__(self, report_dir: str | None = None) -> None:
        self.report_dir = report_dir
        self.start_digest = ""
        self.find_unused: bool | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, TransferModule)
        self.start_digest = frozen_digest(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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
