"""Hydra callbacks of the commands: settings Hydra itself would crash on, checked before it acts on them.

They run inside Hydra, outside the task function and its `friendly_errors` (Hydra turns a callback's
exception into a warning), so they stop the same way: one `error:` line and status 2."""

from __future__ import annotations

import numbers
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from transfer_cases.commands.cli import exit_with_error
from transfer_cases.utils.errors import TransferCasesError
from transfer_cases.utils.folders import check_creatable_dir


class OutputFolderCheck(HydraCallback):
    """Hydra callback: a run or sweep folder that cannot be written stops with one message, before
    Hydra tries to create it (Hydra itself would end with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(check_creatable_dir, config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(check_creatable_dir, config.hydra.sweep.dir, "hydra.sweep.dir")


def _exit_on_error(check: Any, *args: Any) -> None:
    # Runs inside Hydra, outside the task function and its `friendly_errors`: same output, same status.
    try:
        check(*args)
    except TransferCasesError as e:
        exit_with_error(str(e))


class OptunaSweepCheck(HydraCallback):
    """Hydra callback of the Optuna presets: settings the sweeper would crash on stop with one line.

    Before the sweep, `n_trials` and `n_jobs` must be whole numbers >= 1 (`n_trials=0` ends in a
    traceback, "No trials are completed yet"), `max_failure_rate` a number in [0, 1]. A failed trial
    is told to Optuna as failed (`train._main` returns None for it) and the others run; when every
    trial failed, Optuna has no best trial and would end in the same traceback, so the last trial's end
    says so instead, and where to read the errors. A study in shared `storage` may hold completed
    trials of earlier sweeps, so there the sweeper decides.
    """

    def __init__(self) -> None:
        self.trials = 0
        self.failed: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        for key in ("n_trials", "n_jobs"):
            value = sweeper.get(key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                exit_with_error(
                    f"hydra.sweeper.{key}={value!r} is not a whole number >= 1 (the number of "
                    f"{'trials the search runs' if key == 'n_trials' else 'trials run at once'}); "
                    f"e.g. hydra.sweeper.{key}={12 if key == 'n_trials' else 1}"
                )
        metric, direction = config.get("optimized_metric"), sweeper.get("direction")
        wanted = "minimize" if isinstance(metric, str) and "loss" in metric.rpartition("/")[2] else "maximize"
        if isinstance(direction, str) and direction != wanted:
            exit_with_error(
                f"hydra.sweeper.direction={direction} with optimized_metric={metric}: the search would look "
                f"for the worst trials; e.g. hydra.sweeper.direction={wanted}"
            )
        rate = sweeper.get("max_failure_rate", 0.0)
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
            exit_with_error(
                f"hydra.sweeper.max_failure_rate={rate!r} is not a number in [0, 1] (the share of "
                "failed trials of a batch that ends the search); e.g. hydra.sweeper.max_failure_rate=1"
            )

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.trials += 1
        if job_return.status != JobStatus.COMPLETED or job_return.return_value is None:
            self.failed.append(str(config.hydra.runtime.output_dir))
        sweeper = config.hydra.sweeper
        if sweeper.get("storage") or self.trials < sweeper.n_trials or len(self.failed) < self.trials:
            return
        exit_with_error(
            f"all {self.trials} trials of the search failed, so it has no best parameters; each "
            f"trial's error is in its summary.json (e.g. {self.failed[0]}/summary.json)"
        )
