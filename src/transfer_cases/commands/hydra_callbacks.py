"""Hydra callbacks of the commands: settings Hydra itself would crash on, checked before it acts on them.

They run inside Hydra, outside the task function and its `friendly_errors` (Hydra turns a callback's
exception into a warning), so they stop the same way: one `error:` line and status 2."""

from __future__ import annotations

import numbers
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from transfer_cases.commands.cli import exit_with_error
from transfer_cases.utils.errors import ConfigError, TransferCasesError
from transfer_cases.utils.folders import check_creatable_dir
from transfer_cases.utils.validate import whole


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
    traceback, "No trials are completed yet"), `max_failure_rate` a number in [0, 1], and `direction`
    must follow `optimized_metric`. (A failed trial is told to Optuna as failed and the others run;
    a search whose every trial failed is said by the sweeper, transfer_cases.sweeps.)
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        for key, why, example in (
            ("n_trials", "the number of trials the search runs", 12),
            ("n_jobs", "the number of trials run at once", 1),
        ):
            try:
                whole(1, example=example, why=why)(sweeper.get(key), f"hydra.sweeper.{key}")
            except ConfigError as e:
                exit_with_error(str(e))
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
