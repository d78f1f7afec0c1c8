"""Output folders checked before any work: created if needed and written to once, or one message
naming the setting that moves them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from transfer_cases.utils.errors import OutputError


def check_writable_dir(folder: str | Path, setting: str) -> Path:
    """Create `folder` if needed and write a probe file in it; else one message naming `setting`."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise OutputError(_not_writable(folder, setting, e)) from None
    return folder


def check_creatable_dir(folder: str | Path, setting: str) -> None:
    """Like `check_writable_dir`, but creates nothing: probes the nearest folder that exists."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file, not a folder")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as e:
        raise OutputError(_not_writable(folder, setting, e)) from None


def _not_writable(folder: Path, setting: str, error: OSError) -> str:
    reason = (error.strerror or str(error)).lower()
    return (
        f"cannot write to {setting}={folder}: {reason}; choose a folder you can write to, "
        f"e.g. {setting}=/tmp/runs/my_run"
    )
