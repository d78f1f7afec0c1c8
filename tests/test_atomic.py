"""A full disk mid-write leaves no truncated checkpoint or summary, and ends with one clear message."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
import torch
from omegaconf import DictConfig

from tests.test_configs import TINY_OVERRIDES, cli_env
from transfer_cases.commands.train import train
from transfer_cases.training.summary import read_summary, write_summary
from transfer_cases.utils.atomic import AtomicCheckpointIO
from transfer_cases.utils.errors import OutputError


def save_until_full(obj: object, f: IO[bytes], *args: object, **kwargs: object) -> None:
    """torch.save on a disk that fills up after the first kilobyte."""
    f.write(b"PK\x03\x04" + b"\0" * 1020)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_previous_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(
        OutputError, match=r"cannot write the checkpoint .*last\.ckpt: no space left on device"
    ):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left behind


def test_full_disk_at_the_first_checkpoint_of_a_run(
    compose_train: Callable[..., DictConfig], image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_train(*TINY_OVERRIDES, f"data.root={image_folder}", "trainer.max_epochs=2", "test=false")
    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(OutputError) as err:
        train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    assert os.listdir(folder) == []  # no truncated epoch00.ckpt, no temporary file
    message = str(err.value)
    assert f"cannot write the checkpoint {folder}" in message and "no space left on device" in message
    assert "no checkpoint of this run was written yet: free some space, then start the run again" in message


def test_full_disk_keeps_the_previous_summary(
    compose_train: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_train(*TINY_OVERRIDES)
    path = write_summary(cfg, "ok", {"epochs": 3})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        OutputError, match=r"cannot write the run summary .*summary\.json: no space left on device"
    ):
        write_summary(cfg, "failed", error="boom")
    assert read_summary(path.parent)["status"] == "ok"
    assert sorted(os.listdir(path.parent)) == ["summary.json"]


def train_with_patch(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`transfer-train args` in a fresh interpreter that runs `script` (a patch, then main) first."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # a fresh interpreter: the patch must precede the imports
def test_cli_full_disk_is_one_message_not_a_chained_traceback(tmp_path: Path, image_folder: Path) -> None:
    """The real command line, with torch.save failing as on a full disk."""
    script = (
        "import errno, sys, torch\n"
        "def full(obj, f, *a, **k):\n"
        "    f.write(b'PK' + bytes(100))\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "torch.save = full\n"
        "from transfer_cases.commands.train import main\n"
        "sys.argv = ['transfer-train'] + sys.argv[1:]\n"
        "main()\n"
    )
    run = tmp_path / "run"
    args = (*TINY_OVERRIDES, f"data.root={image_folder}", "callbacks.progress_bar.refresh_rate=0")
    proc = train_with_patch(script, *args, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert "error: cannot write the checkpoint" in proc.stderr and "no space left on device" in proc.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "no space left on device" in summary["error"]


@pytest.mark.slow  # a fresh interpreter (the patch must precede Hydra)
def test_cli_full_disk_in_hydras_config_save_is_one_message(tmp_path: Path) -> None:
    """Hydra writes .hydra/config.yaml before the task starts: a full disk there is our one line too."""
    script = (
        "import errno, sys, hydra.core.utils as u\n"
        "def full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "u._save_config = full\n"
        "from transfer_cases.commands.train import main\n"
        "sys.argv = ['transfer-train'] + sys.argv[1:]\n"
        "main()\n"
    )
    proc = train_with_patch(script, *TINY_OVERRIDES, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    assert "error: cannot write the run folder" in proc.stderr and "no space left on device" in proc.stderr


def test_atomic_write_never_changes_the_process_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the umask means setting it for every thread: another thread would create world-writable
    files in that window. The file still gets the mode a plain open gives under the current umask."""
    from transfer_cases.utils.atomic import atomic_write_text

    def no_umask(mask: int) -> int:
        raise AssertionError(f"os.umask({mask:#o}) called: the umask changes for every thread")

    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        atomic_write_text(tmp_path / "a.json", "{}", what="run summary")
        atomic_write_text(tmp_path / "a.json", "{}", what="run summary")  # over an existing file
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["a.json"]
