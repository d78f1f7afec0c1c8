"""Hydra instantiates sweepers only from the `hydra_plugins` namespace and imports every module in it at
start-up: this shim is that entry, light to import; the work is in `transfer_cases.sweeps.sweeper`."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaStudySweeper(Sweeper):
    """A resumable, shareable Optuna search (configs/hydra/sweeper/optuna_study.yaml)."""

    def __init__(self, **settings: Any) -> None:
        from transfer_cases.sweeps.sweeper import OptunaStudySweeperImpl as Impl

        self.sweeper = Impl(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
