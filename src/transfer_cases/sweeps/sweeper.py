"""`OptunaStudySweeper`: Hydra's Optuna sweeper (hydra-optuna-sweeper), made resumable and shareable.

The plugin's own `sweep()` runs `n_trials` new trials whatever the study already holds, leaves a trial
whose process was killed RUNNING for ever, numbers job folders from 0 in every process (a resumed or
second worker overwrites the first's folders) and has no pruning. This subclass keeps the plugin's
parsing of the search space and changes the loop: `n_trials` is the study's total, counted across runs
and workers (study.py); interrupted trials are failed and their parameters queued again; each trial's
job folder is named by its trial number; each job learns its trial (storage, study, id) through
environment variables, so the pruning callback (pruning.py) can report to it, from any launcher.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

try:
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
    from optuna.trial import TrialState
except ImportError as err:  # the optional extra
    raise ImportError(
        f"the Optuna sweeper needs hydra-optuna-sweeper ({err}); "
        "install it with: pip install 'transfer-cases[optuna]'"
    ) from err

from transfer_cases.sweeps import study as studies

log = logging.getLogger(__name__)

# What a job reads to find its trial (pruning.py): set through hydra.job.env_set, which every launcher
# applies in the job's process.
ENV_STORAGE, ENV_STUDY, ENV_TRIAL = (
    "TRANSFER_OPTUNA_STORAGE",
    "TRANSFER_OPTUNA_STUDY",
    "TRANSFER_OPTUNA_TRIAL_ID",
)


class OptunaStudySweeperImpl(OptunaSweeperImpl):
    """hydra-optuna-sweeper's settings, plus:

    Args:
        pruner: an Optuna pruner (instantiated from its `_target_`) that the jobs' `OptunaPruning`
            callback asks after each validation; None: no trial is stopped early.
        heartbeat_interval: seconds between the heartbeats of running trials in the storage; a trial
            whose beats stopped for twice as long is taken as interrupted by any other worker.
    """

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        search_space: DictConfig | None = None,
        custom_search_space: str | None = None,
        params: DictConfig | None = None,
        pruner: Any = None,
        heartbeat_interval: int = 60,
    ) -> None:
        super().__init__(
            sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
            search_space, custom_search_space, params,
        )  # fmt: skip
        self.storage = studies.absolute_url(storage)
        self.pruner = pruner
        self.heartbeat_interval = heartbeat_interval

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = [*self._parse_sweeper_params_config(), *arguments]
        distributions, fixed = create_params_from_overrides(params_conf)
        if self.search_space_distributions:
            distributions = {**self.search_space_distributions, **distributions}
        for name in fixed:
            distributions.pop(name, None)
        directions = self._get_directions()
        study = self._open_study(directions, sorted(distributions))
        log.info(
            "Study %s in %s: %d trials in total", study.study_name, self.storage or "memory", self.n_trials
        )
        if study.get_trials(deepcopy=False) and hasattr(self.sampler, "reseed_rng"):
            # A seeded sampler in a new process would draw the first run's random start again: trials
            # that repeat earlier ones (or another worker's) instead of new points.
            self.sampler.reseed_rng()
        studies.recover_interrupted(study)
        while (left := studies.slots_left(study, self.n_trials)) > 0:
            trials = [study.ask() for _ in range(min(self.n_jobs, left))]
            for trial in trials:
                study._storage.set_trial_system_attr(trial._trial_id, studies.WORKER, studies.this_worker())
            runnable = [t for t in trials if not self._surplus(study, t)]
            if runnable:
                self._run_batch(study, runnable, distributions, fixed, directions)
            studies.recover_interrupted(study, mine=[])
        self._write_results(study, directions)

    def _open_study(self, directions: list[str], names: list[str]) -> optuna.Study:
        with studies.creation_lock(self.storage):
            study = optuna.create_study(
                study_name=self.study_name,
                storage=studies.open_storage(self.storage, self.heartbeat_interval),
                sampler=self.sampler,
                pruner=self.pruner,
                directions=directions,
                load_if_exists=True,
            )
            studies.uncached(study)
            search = {"params": names, "directions": directions}
            started = study.user_attrs.get(studies.SEARCH)
            if started is None:
                study.set_user_attr(studies.SEARCH, search)
        if started is not None and started != search:
            _exit(
                f"study {study.study_name} in {self.storage} searches {started['params']} "
                f"({', '.join(started['directions'])}), not {names} ({', '.join(directions)}); continue it "
                "with the same search, or start another with hydra.sweeper.study_name=<new name>"
            )
        return study

    def _surplus(self, study: optuna.Study, trial: optuna.trial.Trial) -> bool:
        if not studies.is_surplus(study, trial.number, self.n_trials):
            return False
        study._storage.set_trial_system_attr(trial._trial_id, studies.SURPLUS, True)
        study.tell(trial, state=TrialState.FAIL)
        return True

    def _run_batch(
        self,
        study: optuna.Study,
        trials: list[optuna.trial.Trial],
        distributions: dict[str, Any],
        fixed: dict[str, Any],
        directions: list[str],
    ) -> None:
        overrides = [
            (*params, *self._job_overrides(study, trial))
            for trial, params in zip(
                trials, self._configure_trials(trials, distributions, fixed), strict=True
            )
        ]
        with studies.Heartbeat(study, [t._trial_id for t in trials]):
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        self.job_idx += len(returns)
        failures = 0
        for trial, ret in zip(trials, returns, strict=True):
            study._storage.set_trial_system_attr(
                trial._trial_id, studies.OUTPUT_DIR, str(ret.hydra_cfg.hydra.runtime.output_dir)
            )
            values = _values(ret, len(directions))
            pruned = studies.PRUNED_AT in study._storage.get_trial(trial._trial_id).system_attrs
            if values is None:
                failures += 1
                study.tell(trial, state=TrialState.FAIL)
            elif pruned:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, values)
        if failures / len(returns) > self.max_failure_rate:
            for ret in returns:
                ret.return_value  # noqa: B018 -- raises the failed job's own error, with its traceback

    def _job_overrides(self, study: optuna.Study, trial: optuna.trial.Trial) -> tuple[str, ...]:
        """The trial's identity for its job, and its folder named by trial number (unique across runs
        and workers) instead of the launch index, which starts from 0 in every process."""
        subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)["subdir"]
        found = [
            f"++hydra.job.env_set.{ENV_STUDY}={_quote(study.study_name)}",
            f"++hydra.job.env_set.{ENV_TRIAL}={trial._trial_id}",
        ]
        if self.storage:
            found.append(f"++hydra.job.env_set.{ENV_STORAGE}={_quote(self.storage)}")
        if isinstance(subdir, str) and "${hydra.job.num}" in subdir:
            found.append(f"hydra.sweep.subdir={subdir.replace('${hydra.job.num}', str(trial.number))}")
        return tuple(found)

    def _write_results(self, study: optuna.Study, directions: list[str]) -> None:
        trials = studies.counted(study.get_trials(deepcopy=False))
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            failed = [t for t in trials if t.state == TrialState.FAIL]
            where = next(
                (t.system_attrs[studies.OUTPUT_DIR] for t in failed if studies.OUTPUT_DIR in t.system_attrs),
                None,
            )
            example = f" (e.g. {where}/summary.json)" if where else ""
            pruned = len(trials) - len(failed)
            what = (
                "failed" if not pruned else f"were pruned or failed ({pruned} pruned, {len(failed)} failed)"
            )
            _exit(
                f"all {len(trials)} trials of the search {what}, so it has no best parameters; "
                f"each trial's error is in its summary.json{example}"
            )
        counts = {
            s.name.lower(): sum(t.state == s for t in trials)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": study.study_name,
            "storage": self.storage,
            "trials": counts,
        }
        if len(directions) < 2:
            best = study.best_trial
            results |= {"best_params": best.params, "best_value": best.value, "best_trial": best.number}
            log.info("Best parameters: %s; best value: %s", best.params, best.value)
        else:
            results["solutions"] = [{"params": t.params, "values": t.values} for t in study.best_trials]
        OmegaConf.save(OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml")


def _values(ret: Any, n: int) -> list[float] | None:
    """The job's objective values; None for a failed job (an exception, a None or non-finite return)."""
    try:
        value = ret.return_value
        values = [float(v) for v in (value if n > 1 else [value])]
    except Exception as err:
        log.warning("Failed experiment: %s", err)
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def _exit(message: str) -> None:
    """The sweeper runs outside the task's `friendly_errors`: the same one line and status 2."""
    print(f"\nerror: {message}", file=sys.stderr)
    sys.exit(2)


def _quote(value: str) -> str:
    """A string as one quoted Hydra override value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


__all__: Sequence[str] = ("ENV_STORAGE", "ENV_STUDY", "ENV_TRIAL", "OptunaStudySweeperImpl")
