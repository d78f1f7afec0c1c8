"""Settings no one listed before (issue 24) stop with one line through the command line, before any
work: no hang, no traceback, no silently wrong run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers.cli import run_console_script
from tests.test_configs import TINY_OVERRIDES, cli_env
from transfer_cases.utils.config import instantiate_list
from transfer_cases.utils.errors import ConfigError


def train_cli(*overrides: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`transfer-train` on the tiny backbone, killed after `timeout` seconds (a hang fails the test)."""
    exe = Path(sys.executable).with_name("transfer-train")
    argv = [str(exe), *TINY_OVERRIDES, f"hydra.run.dir={cwd / 'run'}", *overrides]
    try:
        return run_console_script(argv, cwd=cwd, env=cli_env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"transfer-train {' '.join(overrides)} still ran after {timeout} s:\n{e.stderr}")


def one_line_error(run: subprocess.CompletedProcess[str]) -> str:
    """The `error: ...` line of a run that stopped with status 2 and no traceback."""
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, run.stderr[-3000:]
    return lines[0]


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""

    def expire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- 1. an error of ours raised inside Hydra's instantiate -----------------------------------------


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_bad_last_checkpoint_interval_stops_with_one_line(tmp_path: Path, value: str) -> None:
    """It used to spin forever: the unwrapped error's chain is a cycle (see `exception_chain`)."""
    run = train_cli(f"callbacks.last_checkpoint.min_interval_s={value}", cwd=tmp_path, timeout=60)
    line = one_line_error(run)
    assert f"callbacks.last_checkpoint.min_interval_s={value}" in line.replace("'", "")
    assert "e.g. callbacks.last_checkpoint.min_interval_s=10" in line


def test_an_error_raised_inside_instantiate_comes_out_as_itself() -> None:
    callbacks = OmegaConf.create(
        {
            "last_checkpoint": {
                "_target_": "transfer_cases.training.callbacks.LastCheckpoint",
                "dirpath": "checkpoints",
                "min_interval_s": "abc",
            }
        }
    )
    with deadline(30), pytest.raises(ConfigError, match=r"min_interval_s='abc' must be a number >= 0"):
        instantiate_list(callbacks)


# --- 2. booleans: yes/no, on/off, true/false; never a truthy string ---------------------------------


@pytest.mark.parametrize("value", ["no", "off", "No"])
def test_a_boolean_written_no_or_off_turns_the_cache_off(
    tmp_path: Path, image_folder: Path, value: str
) -> None:
    run = train_cli(
        f"data.root={image_folder}",
        "case=small_similar",
        "trainer.max_epochs=1",
        f"cache.enabled={value}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["feature_cache"] is None
    assert not list((tmp_path / "cache").rglob("features.npy"))


@pytest.mark.parametrize("value", ["abc", "1.5", "nope"])
def test_a_boolean_that_is_neither_is_refused(tmp_path: Path, image_folder: Path, value: str) -> None:
    run = train_cli(f"data.root={image_folder}", f"cache.enabled={value}", cwd=tmp_path)
    line = one_line_error(run)
    assert re.search(rf"cache\.enabled='?{value}'? is not a boolean: use true or false", line), line
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- 3. a mandatory setting left unset -------------------------------------------------------------


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A `transfer-*` command (`args[0]`) with its arguments, killed after `timeout` seconds."""
    exe = Path(sys.executable).with_name(args[0])
    return run_console_script([str(exe), *args[1:]], cwd=cwd, env=cli_env(), timeout=timeout)


@pytest.mark.parametrize("command", ["transfer-train", "transfer-advise"])
def test_imagefolder_without_a_root_names_data_root(tmp_path: Path, command: str) -> None:
    """`data=imagefolder` inherited the embedded ants/bees root: `???` does not replace a merged value."""
    run = cli(
        command,
        "data=imagefolder",
        "data.root=???",  # as configs/data/imagefolder.yaml has it (a generated project fills in its own)
        *TINY_OVERRIDES,
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    line = one_line_error(run)
    assert line == "error: data.root is not set; give it on the command line, e.g. data.root=/path/to/images"
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "advice.json").exists()


def test_eval_without_a_checkpoint_names_ckpt_path(tmp_path: Path) -> None:
    run = cli("transfer-eval", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert one_line_error(run).startswith(
        "error: ckpt_path is not set; give it on the command line, e.g. ckpt_path="
    )


# --- 4. every other setting: type and range before any work ----------------------------------------

NO_GPU = pytest.mark.skipif(torch.cuda.device_count() > 0, reason="-1 means every GPU where there are GPUs")
WHOLE = r"is not a whole number"
BAD_SETTINGS = {
    "seed=-1": rf"seed=-1 {WHOLE} from 0 to 4294967295; e\.g\. seed=42",
    "seed=abc": rf"seed='abc' {WHOLE} from 0 to 4294967295",
    "seed=99999999999": rf"seed=99999999999 {WHOLE} from 0 to 4294967295",
    "advisor.seed=abc": rf"advisor\.seed='abc' {WHOLE} from 0 to 4294967295; e\.g\. advisor\.seed=42",
    "trainer.log_every_n_steps=0": rf"log_every_n_steps=0 {WHOLE} >= 1; e\.g\. trainer\.log_every_n_steps=4",
    "trainer.check_val_every_n_epoch=0": rf"trainer\.check_val_every_n_epoch=0 {WHOLE} >= 1",
    "+trainer.accumulate_grad_batches=0": rf"trainer\.accumulate_grad_batches=0 {WHOLE} >= 1",
    "+trainer.limit_train_batches=0": r"trainer\.limit_train_batches=0 must be a number of batches >= 1 or a "
    r"fraction in \(0, 1\] \(0 runs no batch",
    "optimized_metric=val/nope": r"optimized_metric='val/nope' is not one of: val/acc, val/f1, val/loss, "
    r"train/acc, train/loss_epoch",
    "data.augment=foo": r"data\.augment='foo' is not a list of transforms \(mappings with a _target_\); "
    r"e\.g\. data\.augment=\[\] for none",
    "backbone.image_size=0": rf"backbone\.image_size=0 {WHOLE} >= 1 or null; e\.g\. backbone\.image_size=224",
    "model.head.dropout=true": r"model\.head\.dropout=True must be a number >= 0 and < 1; e\.g\. "
    r"model\.head\.dropout=0\.2",
    "model.head.dropout=1": r"model\.head\.dropout=1 must be a number >= 0 and < 1",
    "model.head.dropout=2": r"model\.head\.dropout=2 must be a number >= 0 and < 1",
    "model.head.kind=mlp model.head.hidden=0": rf"hidden=0 {WHOLE} >= 1; e\.g\. model\.head\.hidden=256",
    "model.head.kind=mlp model.head.hidden=true": rf"model\.head\.hidden=True {WHOLE} >= 1",
    "model.head.kind=foo": r"head\.kind='foo' is not one of: linear, mlp; e\.g\. model\.head\.kind=linear",
    "trainer.precision=foo": r"precision='foo' is not a precision Lightning knows: 32-true, 16-mixed",
    "trainer.devices=0": r"devices=0 is not a number of devices >= 1 or auto; e\.g\. trainer\.devices=1",
    "trainer.devices=-1": r"trainer\.devices=-1 is not a number of devices >= 1 or auto",
    "trainer.devices=abc": r"trainer\.devices='abc' is not a number of devices >= 1 or auto",
}


@pytest.mark.parametrize(
    "overrides",
    [pytest.param(o, marks=NO_GPU) if o == "trainer.devices=-1" else o for o in BAD_SETTINGS],
)
def test_bad_settings_stop_with_one_line_before_any_work(
    tmp_path: Path, image_folder: Path, overrides: str
) -> None:
    run = train_cli(
        f"data.root={image_folder}",
        "trainer.max_epochs=1",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *overrides.split(),
        cwd=tmp_path,
    )
    line = one_line_error(run)
    assert re.search(BAD_SETTINGS[overrides], line), line
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "cache").exists()


def test_advise_checks_the_settings_before_extracting(tmp_path: Path, image_folder: Path) -> None:
    """transfer-advise composes train.yaml: the same schema, before the advisor's extraction passes."""
    run = cli(
        "transfer-advise",
        *TINY_OVERRIDES,
        f"data.root={image_folder}",
        "advisor.seed=abc",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    line = one_line_error(run)
    assert re.search(r"advisor\.seed='abc' is not a whole number from 0 to 4294967295", line), line
