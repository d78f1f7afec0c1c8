"""The study a search runs in: where it is stored, which of its trials count, what becomes of a trial
whose worker died. Plain Optuna, no Hydra: the sweeper (sweeper.py) and the tests use it alike.

A trial is asked by one sweeper process ("worker") and stamped with it (host:pid). A RUNNING trial
whose worker is gone (a `kill -9`, a lost node) would stay RUNNING for ever and hold a slot of
`n_trials`; `recover_interrupted` fails it, marks it interrupted (so it does not count) and queues its
parameters again, so no point of the search is lost and none runs twice to completion. A dead worker
is seen at once on its own host (its pid is gone) and, from any other host, when its heartbeat is
older than the storage's grace period.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

WORKER = "transfer_cases:worker"  # host:pid of the sweeper that asked the trial
INTERRUPTED = "transfer_cases:interrupted"  # its worker died: failed, not counted, parameters queued again
SURPLUS = "transfer_cases:surplus"  # asked after other workers had filled n_trials: failed, never run
PRUNED_AT = "transfer_cases:pruned_at"  # the report step at which the job's pruning callback stopped it
OUTPUT_DIR = "transfer_cases:output_dir"  # the trial's job folder
SEARCH = "transfer_cases:search"  # study attribute: the search space and directions it was started with


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def absolute_url(storage: str | None) -> str | None:
    """A relative SQLite path made absolute, so that jobs started elsewhere (submitit) open the same file."""
    if storage and storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(storage[len("sqlite:///") :]).resolve())
    return storage


def open_storage(url: str | None, heartbeat_interval: int | None = 60) -> optuna.storages.BaseStorage:
    """The study's storage: None is in memory (lost with the process); an SQLite file (its folder made by
    `creation_lock`) waits up to a minute for a lock another worker holds; other RDB URLs (postgresql://,
    mysql://) are passed to Optuna as they are."""
    if url is None:
        return optuna.storages.InMemoryStorage()
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval
        )


def uncached(study: optuna.Study) -> optuna.Study:
    """The study reading its storage directly. Optuna wraps an RDB storage in a cache that keeps the
    trials this process asked as it last wrote them: what a job (another storage object, maybe another
    process) reported to them, or another worker did, would not be seen."""
    study._storage = getattr(study._storage, "_backend", study._storage)
    return study


@contextlib.contextmanager
def creation_lock(url: str | None) -> Iterator[None]:
    """Held while a worker opens an SQLite study: two workers starting together would both create its
    tables ("table already exists") or the study itself. Other databases serialise this themselves."""
    if not (url and url.startswith("sqlite:///")):
        yield
        return
    path = Path(url[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def counted(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that take a slot of `n_trials`: finished or running, not interrupted or surplus
    (a queued, WAITING trial takes its slot when it is asked)."""
    return [
        t
        for t in trials
        if t.state != TrialState.WAITING and not (INTERRUPTED in t.system_attrs or SURPLUS in t.system_attrs)
    ]


def slots_left(study: optuna.Study, n_trials: int) -> int:
    return n_trials - len(counted(study.get_trials(deepcopy=False)))


def is_surplus(study: optuna.Study, trial_number: int, n_trials: int) -> bool:
    """Whether `trial_number` came after n_trials counted trials: two workers that both saw a free slot
    asked at once. Every worker orders trials by number, so exactly n_trials run."""
    before = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial_number]
    return len(before) >= n_trials


def _pid_gone(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True  # a trial stamped with our pid that we did not ask: an earlier process's, reused pid
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _stale_ids(study: optuna.Study) -> set[int]:
    storage = study._storage
    backend = getattr(storage, "_backend", storage)  # _CachedStorage wraps the RDB storage
    if not isinstance(backend, optuna.storages.RDBStorage) or backend.heartbeat_interval is None:
        return set()
    return set(backend._get_stale_trial_ids(study._study_id))


def recover_interrupted(study: optuna.Study, mine: Iterable[int] = ()) -> list[int]:
    """Fail each RUNNING trial whose worker is gone, mark it interrupted and queue its parameters again;
    returns their numbers. `mine`: trial ids this process runs now (never touched)."""
    stale, own = _stale_ids(study), set(mine)
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial._trial_id in own:
            continue
        worker = trial.system_attrs.get(WORKER)
        if not ((worker and _pid_gone(worker)) or trial._trial_id in stale):
            continue
        try:
            study._storage.set_trial_system_attr(trial._trial_id, INTERRUPTED, True)
            if not study._storage.set_trial_state(trial._trial_id, TrialState.FAIL):
                continue
        except RuntimeError:  # another worker finished it first
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.enqueue_trial(dict(trial.params))
        recovered.append(trial.number)
        log.warning(
            "trial %d of study %s was interrupted (worker %s gone): marked failed, its parameters run again",
            trial.number, study.study_name, worker or "unknown",
        )  # fmt: skip
    return recovered


class Heartbeat:
    """Records the heartbeat of the trials this worker runs, in a thread, while their jobs run: a
    worker on another host sees them alive, and sees them interrupted when the beats stop."""

    def __init__(self, study: optuna.Study, trial_ids: list[int]) -> None:
        backend = getattr(study._storage, "_backend", study._storage)
        self.backend = backend if isinstance(backend, optuna.storages.RDBStorage) else None
        self.interval = (self.backend.heartbeat_interval if self.backend else None) or 0
        self.trial_ids = trial_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="optuna-heartbeat")

    def _run(self) -> None:
        while True:
            for trial_id in self.trial_ids:
                try:
                    self.backend.record_heartbeat(trial_id)  # type: ignore[union-attr]
                except Exception as err:  # a busy database must not end the search
                    log.debug("heartbeat of trial %d not recorded: %s", trial_id, err)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        if self.backend is not None and self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
