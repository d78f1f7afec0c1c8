"""Nothing lost on an interruption: last.ckpt after every epoch, a resume that continues where the run
stopped (and needs no pretrained weights), a metrics history kept whole, frozen state untouched."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from tests.conftest import TINY, case_config, write_image_folder
from tests.helpers.lightning import Interrupted, save_checkpoint, started_epochs
from tests.test_configs import TINY_OVERRIDES, cli_env
from tests.test_lightning import tiny_weights_file
from transfer_cases import build
from transfer_cases.commands.report import collect_runs
from transfer_cases.commands.train import train
from transfer_cases.training.callbacks import LastCheckpoint, frozen_digest
from transfer_cases.training.checkpoint import load_module
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.errors import ConfigError

QUIET = ("callbacks.progress_bar.refresh_rate=0", "callbacks.model_summary=null", "test=false")
# These tests interrupt runs between epochs of a fraction of a second: last.ckpt after every epoch.
EVERY_EPOCH = "callbacks.last_checkpoint.min_interval_s=0"


def overrides(images: Path, *extra: str) -> tuple[str, ...]:
    return (*TINY_OVERRIDES, f"data.root={images}", "data.batch_size=4", *QUIET, EVERY_EPOCH, *extra)


def metric_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def epochs_with(rows: list[dict[str, str]], key: str) -> list[int]:
    return [int(float(r["epoch"])) for r in rows if r.get(key)]


def ckpt_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def test_last_checkpoint_is_every_epochs_even_when_the_metric_never_improves(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    # A learning rate of 1e-12 leaves every prediction, hence val/acc, as after epoch 0.
    cfg = compose_train(*overrides(image_folder, "trainer.max_epochs=3", "model.optimizer.lr=1e-12"))
    result = train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert Path(result["best_checkpoint"]).name == "epoch00.ckpt"  # the metric never improved
    assert ckpt_epoch(checkpoints / "last.ckpt") == 2  # ModelCheckpoint(save_last=True) leaves epoch 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch00.ckpt", "last.ckpt"]


class SaveLog:
    """The epoch of every last.ckpt written (through the public `Trainer.save_checkpoint`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.epochs: list[int] = []
        save = L.Trainer.save_checkpoint

        def spy(trainer: L.Trainer, filepath: Any, *args: Any, **kwargs: Any) -> None:
            if Path(filepath).name == "last.ckpt":
                self.epochs.append(trainer.current_epoch)
            save(trainer, filepath, *args, **kwargs)

        monkeypatch.setattr(L.Trainer, "save_checkpoint", spy)


def test_fast_epochs_save_last_checkpoint_once_at_the_end_and_it_resumes(
    compose_train: Callable[..., DictConfig],
    image_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saves = SaveLog(monkeypatch)
    log = tmp_path / "epochs.txt"
    epoch_log = ("+callbacks.log._target_=tests.helpers.lightning.EpochLog", f"+callbacks.log.path={log}")
    slow = "callbacks.last_checkpoint.min_interval_s=3600"
    train(compose_train(*overrides(image_folder, "trainer.max_epochs=3", slow, *epoch_log)))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert saves.epochs == [3]  # epochs 0 and 1 skipped; the final state written when training ended
    assert ckpt_epoch(last) == 3  # three epochs completed (an epoch-end save would say 2)
    train(
        compose_train(*overrides(image_folder, "trainer.max_epochs=4", slow, *epoch_log, f"ckpt_path={last}"))
    )
    assert started_epochs(log) == [0, 1, 2, 3]  # the resume ran epoch 3 only
    saves.epochs.clear()
    train(compose_train(*overrides(image_folder, "trainer.max_epochs=3")))  # min_interval_s=0
    assert saves.epochs == [0, 1, 2]


def test_last_checkpoint_interval_must_be_seconds() -> None:
    with pytest.raises(ConfigError, match=r"min_interval_s=-1 must be a number >= 0; e\.g\. .*=10"):
        LastCheckpoint(dirpath="checkpoints", min_interval_s=-1)


def test_resume_continues_at_the_next_epoch_and_keeps_the_metrics_history(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    log = tmp_path / "epochs.txt"
    epoch_log = ("+callbacks.log._target_=tests.helpers.lightning.EpochLog", f"+callbacks.log.path={log}")
    stop = ("+callbacks.stop._target_=tests.helpers.lightning.StopAt", "+callbacks.stop.epoch=2")
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(compose_train(*overrides(image_folder, "trainer.max_epochs=4", *epoch_log, *stop)))
    assert ckpt_epoch(run / "checkpoints" / "last.ckpt") == 1
    assert epochs_with(metric_rows(run), "val/acc") == [0, 1]  # flushed before the interruption
    interrupted = started_epochs(log)
    assert interrupted == [0, 1, 2]

    last = run / "checkpoints" / "last.ckpt"
    cfg = compose_train(*overrides(image_folder, "trainer.max_epochs=4", *epoch_log, f"ckpt_path={last}"))
    train(cfg)
    assert started_epochs(log)[len(interrupted) :] == [2, 3]  # epochs 0 and 1 are not redone
    assert ckpt_epoch(last) == 3
    rows = metric_rows(run)
    assert epochs_with(rows, "val/acc") == [0, 1, 2, 3]
    assert epochs_with(rows, "train/loss_epoch") == [0, 1, 2, 3]
    assert len([r for r in rows if r.get("lr-AdamW/head")]) == 4  # epoch 2's first one is dropped
    assert len([r for r in rows if r.get("params/trainable")]) == 1
    # The report's learning curve reads the whole history.
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (row,) = collect_runs(tmp_path)
    assert [epoch for epoch, _ in row["curve"]] == [0, 1, 2, 3]


def test_a_new_run_in_a_used_folder_starts_a_new_history(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    train(compose_train(*overrides(image_folder, "trainer.max_epochs=2")))
    train(compose_train(*overrides(image_folder, "trainer.max_epochs=1")))
    rows = metric_rows(tmp_path / "run")
    assert epochs_with(rows, "val/acc") == [0]
    assert len([r for r in rows if r.get("params/trainable")]) == 1


def test_resume_needs_no_pretrained_weights_and_keeps_their_preprocessing(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    weights = tiny_weights_file(tmp_path / "tiny.pt")
    common = (f"backbone.weights={weights}", "case=small_different", "trainer.max_epochs=2")
    with pytest.raises(Interrupted):
        train(
            compose_train(
                *overrides(image_folder, *common),
                "+callbacks.stop._target_=tests.helpers.lightning.StopAt",
                "+callbacks.stop.epoch=1",
            )
        )
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = load_module(last)
    weights.unlink()
    cfg = compose_train(*overrides(image_folder, *common, f"ckpt_path={last}"))
    module, datamodule = build(cfg)
    assert module.preprocess == before.preprocess and datamodule.preprocess == before.preprocess
    train(cfg)
    after = load_module(last)
    assert ckpt_epoch(last) == 1
    assert frozen_digest(after) == frozen_digest(before)


def test_freeze_guard_snapshots_after_a_late_restore(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    """Some strategies restore the checkpoint after `on_fit_start`; the guard's snapshot must still
    be of the restored weights (which `build` loads before any hook runs)."""
    weights = tiny_weights_file(tmp_path / "tiny.pt")
    common = (f"backbone.weights={weights}", "case=small_different")
    train(compose_train(*overrides(image_folder, *common, "trainer.max_epochs=1")))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trained = frozen_digest(load_module(last))
    cfg = compose_train(
        *overrides(image_folder, *common, "trainer.max_epochs=2", f"ckpt_path={last}"),
        "+trainer.strategy._target_=tests.helpers.lightning.RestoreAfterSetup",
        f"+callbacks.freeze_guard.report_dir={tmp_path / 'guard'}",
    )
    fresh, _ = build(cfg)
    assert frozen_digest(fresh) == trained  # build loads the checkpoint before anything reads the body
    train(cfg)
    report = json.loads((tmp_path / "guard" / "freeze_guard_rank0.json").read_text())
    assert report["start"] == report["end"] == trained


def resume_config(
    compose_train: Callable[..., DictConfig], images: Path, ckpt: Path, *extra: str
) -> DictConfig:
    return compose_train(*overrides(images, f"ckpt_path={ckpt}", *extra))


@pytest.fixture
def small_different_ckpt(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> Path:
    """A checkpoint of case small_different on the tiny CNN, as transfer-train writes it (no training)."""
    module, _ = build(compose_train(*overrides(image_folder, "case=small_different")))
    return save_checkpoint(module, tmp_path / "small_different.ckpt")


def test_resume_from_another_case_names_the_checkpoints_case(
    compose_train: Callable[..., DictConfig], image_folder: Path, small_different_ckpt: Path
) -> None:
    with pytest.raises(
        ConfigError,
        match=r"cannot resume from .*small_different\.ckpt: it was trained as case=small_different "
        r"\(keep=-1, freeze=all\), backbone TinyCNN .*this run builds case=small_similar",
    ):
        build(resume_config(compose_train, image_folder, small_different_ckpt, "case=small_similar"))


def test_resume_from_another_backbone_names_the_checkpoints_backbone(
    compose_train: Callable[..., DictConfig], image_folder: Path, small_different_ckpt: Path
) -> None:
    with pytest.raises(
        ConfigError, match=r"widths \[8, 16, 32\]\).*widths \[8, 32, 32\]\).* is \[16, .* there, \[32, "
    ) as e:
        build(
            resume_config(
                compose_train,
                image_folder,
                small_different_ckpt,
                "case=small_different",
                "backbone.widths=[8,32,32]",
            )
        )
    assert "missing" not in str(e.value).lower()


def test_resume_with_another_head_kind_names_the_head(
    compose_train: Callable[..., DictConfig], image_folder: Path, small_different_ckpt: Path
) -> None:
    """Not "another backbone?": the body is the same, the head setting differs."""
    with pytest.raises(ConfigError, match=r"model\.head\.kind 'linear' there, 'mlp' here") as e:
        build(
            resume_config(
                compose_train,
                image_folder,
                small_different_ckpt,
                "case=small_different",
                "model.head.kind=mlp",
            )
        )
    message = str(e.value)
    assert "another backbone" not in message and "(model.head.kind 'linear' there" in message  # named first


def test_resume_with_other_classes_names_both(
    compose_train: Callable[..., DictConfig], small_different_ckpt: Path, tmp_path: Path
) -> None:
    three = write_image_folder(tmp_path / "three", classes=("a", "b", "c"))
    with pytest.raises(ConfigError, match=r"classes \['a', 'b'\] there, \['a', 'b', 'c'\] here"):
        build(resume_config(compose_train, three, small_different_ckpt, "case=small_different"))


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume(tmp_path: Path, image_folder: Path) -> None:
    """A real `transfer-train` killed with SIGKILL in the middle of an epoch, at a random point after
    epoch k finished, resumes into its own folder from last.ckpt: it starts at epoch k+1, redoes no
    finished epoch, keeps the frozen stages bit-identical and the metrics history complete."""
    rng = random.Random()
    k = rng.choice([1, 2])
    epochs = 5
    run, log, weights = tmp_path / "run", tmp_path / "epochs.txt", tiny_weights_file(tmp_path / "tiny.pt")
    args = [
        str(Path(sys.executable).with_name("transfer-train")),
        *overrides(image_folder, f"backbone.weights={weights}", "case=small_different"),
        f"trainer.max_epochs={epochs}",
        "+callbacks.log._target_=tests.helpers.lightning.EpochLog",
        f"+callbacks.log.path={log}",
        "+callbacks.log.sleep=0.25",  # 3 batches: an epoch takes about a second
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not (last.is_file() and ckpt_epoch(last) >= k and k + 1 in started_epochs(log)):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach the epoch to kill in"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.05, 0.5))  # somewhere inside epoch k+1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    finished = ckpt_epoch(last)  # k, or later if the kill came late; last.ckpt is never half-written
    assert finished >= k and not list(last.parent.glob(".*.tmp"))
    # Killed inside the epoch after the last finished one (or, rarely, in the instant between them).
    assert started_epochs(log)[-1] in (finished + 1, finished)
    before = started_epochs(log)

    resumed = subprocess.run(
        [*args, f"ckpt_path={last}"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert started_epochs(log)[len(before) :] == list(range(finished + 1, epochs))
    assert ckpt_epoch(last) == epochs - 1
    rows = metric_rows(run)
    assert epochs_with(rows, "val/acc") == list(range(epochs))
    assert epochs_with(rows, "train/loss_epoch") == list(range(epochs))
    # As built before any training: the frozen stages hold the pretrained weights, bit for bit.
    start = TransferModule(
        backbone={**TINY, "weights": str(weights)}, case=case_config("small_different"), num_classes=2
    )
    assert frozen_digest(load_module(last)) == frozen_digest(start)
