"""Atomic file writes: a reader (or a resume after a crash) sees the old file or the whole new one.

A checkpoint or summary written in place and cut short (full disk, `kill -9`) is a truncated
file that cannot be loaded. Here every file is written to a temporary file in the same folder,
flushed to disk, then renamed over the target with `os.replace` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transfer_cases.errors import OutputError, TransferCasesError

# What a user can fix by pointing the output elsewhere or freeing space.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], None], *, what: str, space_hint: str = ""
) -> None:
    """Call `write(file)` on a temporary file next to `path`, then rename it to `path`.

    On any failure the temporary file is removed and `path` is left as it was; an `OSError` such
    as a full disk becomes one `OutputError` naming the file, the reason and what to do
    (`space_hint` when the disk is full).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as e:
        raise output_error(e, path, what, space_hint) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, TransferCasesError):
            raise output_error(e, path, what, space_hint) from None
        raise


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, exclusive temporary file next to `path`, created with mode 0666 so that the kernel
    applies the umask (and any default ACL) as for a plain `open`: the final file gets the usual mode.

    Unlike `tempfile.mkstemp` (0600, then a chmod that needs the umask), this never calls `os.umask`,
    which can only be read by changing it for the whole process, and so for every other thread.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(path.parent))


def atomic_write_text(path: str | Path, text: str, *, what: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), what=what)


def output_error(error: OSError, path: str | Path, what: str, space_hint: str = "") -> OutputError:
    """One readable message for a failed write: the file, the reason, and what to do."""
    reason = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
    }.get(error.errno or 0, (error.strerror or str(error)).lower())
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = space_hint or "free some space, or write elsewhere: paths.output_dir=/path/on/another/disk"
    else:
        hint = "choose a writable folder: paths.output_dir=/path/to/folder (or hydra.run.dir=...)"
    return OutputError(f"cannot write the {what} {path}: {reason}; {hint}")


def find_user_error(error: BaseException) -> BaseException:
    """The error to show for `error`: the first of ours in its chain (an error raised while Lightning
    was handling ours hides it in `__context__`), a write failure made readable, or `error` itself."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TransferCasesError):
            return current
        current = current.__cause__ or current.__context__
    if isinstance(error, OSError) and error.errno in _OUTPUT_ERRNOS and error.filename:
        return output_error(error, error.filename, "file")
    return error


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, but a local checkpoint is written atomically in its own folder.

    Lightning's own "atomic" save stages the file in the system temp folder and moves it, which is a
    copy (and a truncated checkpoint when the disk fills) when that folder is on another device.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        last = Path(path).parent / "last.ckpt"
        if last.is_file():
            hint = (
                "the checkpoints written before are intact: free some space (or set paths.output_dir to "
                f"another disk), then resume with ckpt_path={last}"
            )
        else:
            hint = "no checkpoint of this run was written yet: free some space, then start the run again"
        atomic_write(path, lambda f: torch.save(checkpoint, f), what="checkpoint", space_hint=hint)
