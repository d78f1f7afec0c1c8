"""Lightning pieces for tests that configs can name, in-process or in a `transfer-train` subprocess
(`+callbacks.log._target_=tests.helpers.lightning.EpochLog`)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy


class EpochLog(L.Callback):
    """Appends each epoch's number to `path` when it starts (flushed at once, so a `kill -9` keeps it);
    `sleep` seconds after every training batch make an epoch long enough to be killed in."""

    def __init__(self, path: str, sleep: float = 0.0) -> None:
        self.path, self.sleep = Path(path), sleep

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch}\n")

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.sleep)


def started_epochs(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.is_file() else []


class Interrupted(Exception):
    """Stands for a crash or a kill in in-process tests."""


class StopAt(L.Callback):
    """Raises `Interrupted` when epoch `epoch` starts: epochs before it are finished and checkpointed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"stopped at the start of epoch {self.epoch}")


class RestoreAfterSetup(SingleDeviceStrategy):
    """A one-device strategy that restores a checkpoint after `on_fit_start`, as FSDP and DeepSpeed do."""

    def __init__(self) -> None:
        super().__init__(device="cpu")

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def save_checkpoint(module: L.LightningModule, path: Path) -> Path:
    """A checkpoint of `module` as transfer-train writes it (no training needed)."""
    trainer = L.Trainer(max_epochs=0, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


class SpoilLastValidation(L.Callback):
    """Zeroes the head before the last epoch's validation: that epoch scores like a constant guess, so
    the best checkpoint is an earlier one and the last epoch's metrics are not the best's."""

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                for p in module.head.parameters():
                    p.zero_()


class SampledIndices(L.Callback):
    """Writes, per rank and epoch, the dataset indices the rank's training sampler yields
    (`<out>/rank<r>_epoch<e>.json`): what Lightning's DistributedSampler gave each process."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        import json

        sampler = trainer.train_dataloader.sampler
        self.out.mkdir(parents=True, exist_ok=True)
        size = len(trainer.train_dataloader.dataset)
        record = {"indices": [int(i) for i in sampler], "dataset": size, "world": trainer.world_size}
        name = f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json"
        (self.out / name).write_text(json.dumps(record))
