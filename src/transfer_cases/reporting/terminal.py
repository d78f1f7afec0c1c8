"""What a run prints, readable in a terminal and in a log file alike.

- Progress bars only on a terminal: a piped or logged run gets a line every `interval_s` seconds
  and one per epoch instead of hundreds of carriage-return frames.
- Upstream noise that no user setting can silence is filtered by its exact message, each with the
  reason: a changed message shows again, so nothing new is hidden by a broad pattern.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)

# (exact message, category, why it is filtered)
UPSTREAM_WARNINGS = (
    (
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
        "treespec.is_leaf()` instead.",
        FutureWarning,
        "torch deprecated LeafSpec; Lightning's own _pytree module still uses it at every fit",
    ),
)
# Lightning's advertisements for its cloud products, logged at every Trainer.
UPSTREAM_LOG_PREFIXES = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]",
)
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(UPSTREAM_LOG_PREFIXES)


_DROP = _DropMessages()


def quiet_upstream_noise() -> None:
    """Filter the upstream warnings and log lines above (idempotent; call once per process)."""
    for message, category, _why in UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP not in logger.filters:
            logger.addFilter(_DROP)


class TerminalProgressBar(TQDMProgressBar):
    """Lightning's tqdm bars on a terminal; elsewhere (a pipe, a log file, a batch job) a log line
    every `interval_s` seconds of training and one at the end of each epoch.

    Args:
        refresh_rate: batches between bar updates (on a terminal); 0 disables bars and lines.
        interval_s: seconds between progress lines when not on a terminal.
        terminal: force (True/False) instead of asking whether stdout (the bars' stream) is one.
    """

    def __init__(self, refresh_rate: int = 1, interval_s: float = 30.0, terminal: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.interval_s = interval_s
        self.terminal = terminal
        self._last = 0.0

    def on_terminal(self) -> bool:
        return self.terminal if self.terminal is not None else sys.stdout.isatty()  # where the bars go

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._lines = self.refresh_rate > 0 and not self.on_terminal()
        if self._lines:
            self.disable()
        self._last = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self._lines and time.monotonic() - self._last >= self.interval_s and trainer.is_global_zero:
            self._last = time.monotonic()
            batch = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            log.info(
                "epoch %d, batch %d/%s %s",
                trainer.current_epoch,
                batch,
                self.total_train_batches,
                _metrics(self.get_metrics(trainer, pl_module)),
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._lines and trainer.is_global_zero:
            self._last = time.monotonic()
            metrics = {k: v for k, v in trainer.callback_metrics.items() if "/" in k}
            log.info("epoch %d/%d done %s", trainer.current_epoch + 1, trainer.max_epochs, _metrics(metrics))


def _metrics(values: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(values.items()):
        try:
            parts.append(f"{key}={float(value):.4g}")
        except (TypeError, ValueError):
            continue
    return " ".join(parts)
