"""Resumable, shared Optuna studies: interrupted trials are failed and queued again, n_trials is the
study's total across re-runs and workers, pruning stops a trial from inside its job, and the cluster
launcher's code path (submitit) runs a sweep here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import optuna
import pytest
import yaml
from lightning.pytorch.trainer.states import TrainerFn
from optuna.trial import TrialState

from tests.test_configs import TINY_OVERRIDES, cli_env, run_cli
from transfer_cases.sweeps import study as studies
from transfer_cases.sweeps.pruning import OptunaPruning
from transfer_cases.sweeps.sweeper import ENV_STORAGE, ENV_STUDY, ENV_TRIAL

optuna.logging.set_verbosity(optuna.logging.WARNING)
QUIET = (*TINY_OVERRIDES, "debug=fdr", "callbacks.progress_bar.refresh_rate=0")


def open_study(tmp_path: Path, name: str = "s") -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with studies.creation_lock(url):
        study = optuna.create_study(
            study_name=name, storage=studies.open_storage(url), direction="maximize", load_if_exists=True
        )
    return studies.uncached(study)


def dead_pid() -> int:
    """A pid no process has: above the kernel's largest, else that of a child that has exited."""
    pid_max = Path("/proc/sys/kernel/pid_max")
    if pid_max.is_file():
        return int(pid_max.read_text()) + 1
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- study.py: which trials count, what an interrupted trial becomes (no training) -------------------


def test_a_trial_of_a_dead_worker_is_failed_marked_and_its_parameters_queued(tmp_path: Path) -> None:
    study = open_study(tmp_path)
    done = study.ask()
    done.suggest_float("lr", 0.0, 1.0)
    study.tell(done, 0.5)
    killed, alive = study.ask(), study.ask()
    lr = killed.suggest_float("lr", 0.0, 1.0)
    alive.suggest_float("lr", 0.0, 1.0)
    storage = study._storage
    storage.set_trial_system_attr(killed._trial_id, studies.WORKER, f"{os.uname().nodename}:{dead_pid()}")
    storage.set_trial_system_attr(alive._trial_id, studies.WORKER, f"{os.uname().nodename}:{os.getppid()}")
    assert studies.slots_left(study, 4) == 1  # the done, the killed and the running trial take slots

    assert studies.recover_interrupted(study) == [killed.number]
    assert studies.recover_interrupted(study) == []  # once
    states = {t.number: t.state for t in study.get_trials()}
    assert states[killed.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    assert studies.INTERRUPTED in study.get_trials()[killed.number].system_attrs
    assert studies.slots_left(study, 4) == 2  # the interrupted trial gave its slot back
    retry = study.ask()  # the queued parameters come first
    assert retry.suggest_float("lr", 0.0, 1.0) == lr and retry.number > alive.number


def test_a_trial_asked_after_the_others_filled_n_trials_is_surplus(tmp_path: Path) -> None:
    study = open_study(tmp_path)
    first, second = study.ask(), study.ask()  # two workers saw one free slot at once
    assert not studies.is_surplus(study, first.number, 1)
    assert studies.is_surplus(study, second.number, 1)
    assert not studies.is_surplus(study, second.number, 2)


# --- pruning.py: the job's callback reports to its trial and stops the fit ---------------------------


def fake_trainer(value: float) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        is_global_zero=True,
        callback_metrics={"val/acc": value},
        strategy=SimpleNamespace(broadcast=lambda x, src=0: x),
        should_stop=False,
    )


def test_pruning_reports_each_validation_and_stops_a_trial_the_pruner_prunes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = open_study(tmp_path)
    trial = study.ask()
    monkeypatch.setenv(ENV_STORAGE, f"sqlite:///{tmp_path / 'optuna.db'}")
    monkeypatch.setenv(ENV_STUDY, "s")
    monkeypatch.setenv(ENV_TRIAL, str(trial._trial_id))
    # Without Hydra's config the pruner is Optuna's default (median, 5 startup trials): never prunes here.
    callback = OptunaPruning("val/acc")
    for value in (0.2, 0.3):
        trainer = fake_trainer(value)
        callback.on_validation_end(trainer, L.LightningModule())  # type: ignore[arg-type]
        assert not trainer.should_stop
    assert study.get_trials()[0].intermediate_values == {0: 0.2, 1: 0.3}

    callback._trial.study.pruner = optuna.pruners.ThresholdPruner(lower=0.5)
    trainer = fake_trainer(0.4)
    callback.on_validation_end(trainer, L.LightningModule())  # type: ignore[arg-type]
    assert trainer.should_stop
    assert study.get_trials()[0].system_attrs[studies.PRUNED_AT] == 2


def test_pruning_does_nothing_outside_a_search(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (ENV_STORAGE, ENV_STUDY, ENV_TRIAL):
        monkeypatch.delenv(key, raising=False)
    trainer = fake_trainer(0.1)
    OptunaPruning().on_validation_end(trainer, L.LightningModule())  # type: ignore[arg-type]
    assert not trainer.should_stop


# --- through the command line ------------------------------------------------------------------------


class HangAtSecondFit(L.Callback):
    """Test helper named in a config: the second fit of a search (across processes, counted in a file)
    writes `<count>.hang` and sleeps, so that the test can kill the search mid-trial."""

    def __init__(self, count: str) -> None:
        self.count = Path(count)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fits = len(self.count.read_text().splitlines()) if self.count.exists() else 0
        with self.count.open("a") as f:
            f.write("fit\n")
        if fits == 1:
            Path(f"{self.count}.hang").touch()
            time.sleep(600)


def search_args(sweep: Path, image_folder: Path, *extra: str) -> list[str]:
    return [
        str(Path(sys.executable).with_name("transfer-train")),
        "-m",
        "hparams_search=small_similar_optuna",
        *QUIET,
        f"data.root={image_folder}",
        f"hydra.sweep.dir={sweep}",
        *extra,
    ]


def trials(sweep: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="small_similar", storage=f"sqlite:///{sweep / 'optuna.db'}")
    return study.get_trials()


def params(trial: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted(trial.params.items()))


@pytest.mark.slow
def test_a_search_killed_mid_trial_continues_to_n_trials_with_no_repeat(
    tmp_path: Path, image_folder: Path
) -> None:
    sweep, count = tmp_path / "search", tmp_path / "fits"
    args = search_args(
        sweep,
        image_folder,
        "hydra.sweeper.n_trials=3",
        f"+callbacks.hang._target_={__name__}.HangAtSecondFit",
        f"+callbacks.hang.count={count}",
    )
    first = subprocess.Popen(
        args, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    hang = Path(f"{count}.hang")
    deadline = time.monotonic() + 240
    while not hang.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hang.exists(), first.stderr.read().decode()[-3000:] if first.poll() is not None else "no hang"
    os.kill(first.pid, signal.SIGKILL)  # a real kill -9: nothing of the sweeper runs after it
    first.wait()
    assert [t.state for t in trials(sweep)] == [TrialState.COMPLETE, TrialState.RUNNING]

    again = subprocess.run(args, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    found = trials(sweep)
    complete = [t for t in found if t.state == TrialState.COMPLETE]
    assert len(complete) == 3  # n_trials in total, across the two runs
    assert len({params(t) for t in complete}) == 3  # none repeated
    assert len({t.number for t in found}) == len(found)
    killed = found[1]
    assert killed.state == TrialState.FAIL and studies.INTERRUPTED in killed.system_attrs
    assert params(found[2]) == params(killed)  # the interrupted point ran again, and completed
    # Each trial's folder is named by its trial number: the re-run did not overwrite the first's.
    assert sorted(p.parent.name for p in sweep.glob("*/summary.json")) == [
        f"{n}_small_similar" for n in (0, 2, 3)
    ]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["trials"] == {"complete": 3, "pruned": 0, "fail": 0}

    # Once n_trials completed, the same command runs nothing more.
    done = subprocess.run(args, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(trials(sweep)) == len(found)


@pytest.mark.slow
def test_two_workers_share_one_study_with_no_duplicate_trial_numbers(
    tmp_path: Path, image_folder: Path
) -> None:
    sweep = tmp_path / "search"
    args = search_args(sweep, image_folder, "hydra.sweeper.n_trials=4")
    workers = [
        subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    errors = [w.communicate(timeout=400)[1].decode()[-3000:] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    found = trials(sweep)
    ran = [t for t in found if studies.SURPLUS not in t.system_attrs]
    assert sorted(t.state.name for t in ran) == ["COMPLETE"] * 4, [(t.number, t.state) for t in found]
    assert len({t.number for t in found}) == len(found)
    workers_seen = {t.system_attrs[studies.WORKER] for t in ran}
    assert len(workers_seen) == 2  # both took part
    assert len(list(sweep.glob("*/summary.json"))) == 4


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path: Path, image_folder: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    run = run_cli(
        "transfer-train",
        "-m",
        "hydra/launcher=local",
        "model.optimizer.lr=0.01,0.001",
        *QUIET,
        f"data.root={image_folder}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = sorted(sweep.glob("*/summary.json"))
    assert [p.parent.name for p in jobs] == ["0_small_similar", "1_small_similar"]
    assert all(yaml.safe_load(p.read_text())["status"] == "ok" for p in jobs)
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # each ran as a submitit job


@pytest.mark.slow
def test_a_pruned_trial_stops_early_and_is_told_as_pruned(tmp_path: Path, image_folder: Path) -> None:
    # A pruner that prunes any val/acc below 2: every trial stops after its first epoch of three.
    sweep = tmp_path / "search"
    run = run_cli(
        "transfer-train",
        "-m",
        "hparams_search=small_similar_optuna",
        *TINY_OVERRIDES,
        "debug=limit",
        "trainer.max_epochs=3",
        "callbacks.progress_bar.refresh_rate=0",
        f"data.root={image_folder}",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.n_trials=2",
        "~hydra.sweeper.pruner",
        "+hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.lower=2.0",
        cwd=tmp_path,
        fresh=True,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "error: all 2 trials of the search were pruned or failed (2 pruned, 0 failed)" in run.stderr
    found = trials(sweep)
    assert [t.state for t in found] == [TrialState.PRUNED] * 2
    assert all(t.system_attrs[studies.PRUNED_AT] == 0 and t.value is not None for t in found)
    summaries = [yaml.safe_load(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert [s["epochs"] for s in summaries] == [1, 1]
