"""A CSV logger that keeps a run's metrics history across resumes (`csv/metrics.csv`)."""

from __future__ import annotations

import csv
import io
from typing import IO, Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from transfer_cases.utils.atomic import atomic_write

# Logged by `TransferModule.on_fit_start` at every fit, resumed or not: an older copy is redundant.
_REPEATED_PREFIX = "params/"


class HistoryCSVLogger(CSVLogger):
    """Lightning's `CSVLogger`, except that a run resumed into the same folder keeps the rows of
    the epochs it finished.

    Lightning's logger deletes an existing `metrics.csv` when it starts. Here the old rows stay and
    new rows are appended; `callbacks.MetricsHistory` calls `drop_rows_from` when training starts
    (after the checkpoint is restored), so rows of the epochs a resumed run redoes appear once.
    Rows are written after every logging call (`flush_logs_every_n_steps=1`), so a killed run
    keeps the rows of the epochs it finished.
    """

    def __init__(self, *args: Any, flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def drop_rows_from(self, step: int, epoch: int) -> int:
        """Drop the earlier runs' rows of `epoch` and later (and of `step` and later); returns how many."""
        return self.experiment.drop_old_rows(step, epoch)


class HistoryWriter(ExperimentWriter):
    """The experiment writer behind `HistoryCSVLogger`: appends to an existing file, never deletes it."""

    def _check_log_dir_exists(self) -> None:
        # Called by the base __init__ in place of its check, which deletes the file.
        self.old_rows = 0
        if self._fs.isfile(self.metrics_file_path):
            fields, rows = self._read()
            self.metrics_keys = [k for k in fields if k]
            self.old_rows = len(rows)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place when a new metric appears; a kill mid-rewrite would
        # lose the history, so write it atomically.
        self._write(fieldnames, self._read()[1])

    def _write(self, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
        def write(f: IO[bytes]) -> None:
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            writer = csv.DictWriter(text, fieldnames=fieldnames, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            text.flush()
            text.detach()

        atomic_write(self.metrics_file_path, write, what="metrics log")

    def drop_old_rows(self, step: int, epoch: int) -> int:
        """Drop rows written before this run that belong to `epoch` or later, or to `step` or later
        when they carry no epoch (learning-rate rows); this run's rows are kept."""
        self.save()
        if not self.old_rows or not self._fs.isfile(self.metrics_file_path):
            return 0
        fields, rows = self._read()
        old, new = rows[: self.old_rows], rows[self.old_rows :]
        kept = [row for row in old if not _redone(row, step, epoch)]
        if len(kept) < len(old):
            self._write(fields, kept + new)
        dropped, self.old_rows = len(old) - len(kept), len(kept)
        return dropped


def _redone(row: dict[str, str], step: int, epoch: int) -> bool:
    if row.get("epoch"):
        return float(row["epoch"]) >= epoch
    values = [k for k, v in row.items() if v and k != "step"]
    if values and all(k.startswith(_REPEATED_PREFIX) for k in values):
        return True
    return bool(row.get("step")) and float(row["step"]) >= step
