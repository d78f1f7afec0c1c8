"""`OptunaPruning`: a Lightning callback that reports the monitored metric of each validation to the
job's Optuna trial and stops the fit when the study's pruner says the trial is behind.

The job finds its trial in the environment the sweeper sets (sweeper.py), so the same callback works
whichever launcher ran the job (in-process, joblib, submitit on SLURM); outside an Optuna search, or
with an in-memory study, it does nothing. The fit stops as an early stop does (the best checkpoint so
far is the job's result) and the trial is marked, so the sweeper tells it to Optuna as pruned.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)


class OptunaPruning(Callback):
    """Args:
    monitor: the metric reported after each validation (the search's `optimized_metric`).
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self._trial: Any = None

    def _find_trial(self) -> Any:
        from transfer_cases.sweeps.study import uncached
        from transfer_cases.sweeps.sweeper import ENV_STORAGE, ENV_STUDY, ENV_TRIAL

        if self._trial is None and all(k in os.environ for k in (ENV_STORAGE, ENV_STUDY, ENV_TRIAL)):
            import optuna

            study = optuna.load_study(
                study_name=os.environ[ENV_STUDY], storage=os.environ[ENV_STORAGE], pruner=_pruner()
            )
            self._trial = optuna.trial.Trial(uncached(study), int(os.environ[ENV_TRIAL]))
        return self._trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # not the sanity check, nor the validation of the best checkpoint after the fit
        prune = False
        if trainer.is_global_zero and self.monitor in trainer.callback_metrics:
            trial = self._find_trial()
            if trial is not None:
                prune = self._report(trial, float(trainer.callback_metrics[self.monitor]))
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True

    def _report(self, trial: Any, value: float) -> bool:
        from transfer_cases.sweeps.study import PRUNED_AT

        storage = trial.study._storage
        step = len(storage.get_trial(trial._trial_id).intermediate_values)
        trial.report(value, step)
        if not trial.should_prune():
            return False
        storage.set_trial_system_attr(trial._trial_id, PRUNED_AT, step)
        log.info("Optuna pruned trial %d after report %d (%s=%.4f)", trial.number, step, self.monitor, value)
        return True


def _pruner() -> Any:
    """The search's pruner, built from the sweeper's config the job carries; None without one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    if not HydraConfig.initialized():
        return None
    config = HydraConfig.get().sweeper.get("pruner")
    return instantiate(config) if config is not None else None
