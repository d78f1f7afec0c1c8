"""Atomic file writes: a reader (or a resume after a crash) sees the old file or the whole new one.

A checkpoint or summary written in place and cut short (full disk, `kill -9`) is a truncated
file that cannot be loaded. Here every file is written to a temporary file in the same folder,
flushed to disk, then renamed over the target with `os.replace` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import errno
import io
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transfer_cases.utils.errors import OutputError, TransferCasesError

# What a user can fix by pointing the output elsewhere or freeing space.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


@contextmanager
def atomic_file(
    path: str | Path, *, what: str, space_hint: str = "", setting: str = "paths.output_dir"
) -> Iterator[IO[bytes]]:
    """A temporary file next to `path` to write in, renamed to `path` when the block ends.

    On any failure the temporary file is removed and `path` is left as it was; an `OSError` such
    as a full disk becomes one `OutputError` naming the file, the reason and what to do: free space
    (`space_hint`) or write elsewhere with `setting` (`--out`, `paths.cache_dir`, ...).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as e:
        raise output_error(e, path, what, space_hint, setting) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, TransferCasesError):
            raise output_error(e, path, what, space_hint, setting) from None
        raise


def atomic_write(
    path: str | Path,
    write: Callable[[IO[bytes]], None],
    *,
    what: str,
    space_hint: str = "",
    setting: str = "paths.output_dir",
) -> None:
    """Call `write(file)` on a temporary file next to `path`, then rename it to `path` (see `atomic_file`)."""
    with atomic_file(path, what=what, space_hint=space_hint, setting=setting) as f:
        write(f)


@contextmanager
def atomic_text(path: str | Path, *, what: str, setting: str = "paths.output_dir") -> Iterator[IO[str]]:
    """`atomic_file` as UTF-8 text (newlines as written, as the csv module wants). A file or class
    name that is not valid UTF-8 reaches Python as a str with surrogate escapes (PEP 383); with
    `errors="surrogateescape"` it is written back as its original bytes instead of raising halfway
    through the file."""
    with atomic_file(path, what=what, setting=setting) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        try:
            yield text
            text.flush()
        finally:
            text.detach()


@contextmanager
def atomic_pieces(path: str | Path, *, what: str, setting: str) -> Iterator[Callable[[str], None]]:
    """Yields `commit(text)`, which appends a whole piece (a batch of CSV rows) to a temporary file
    next to `path`; the file is renamed to `path` when the block ends, and also when it is interrupted
    or the disk fills, cut back to the last whole piece: `path` never holds a row cut mid-line, and
    what was finished is kept. Text is UTF-8 with surrogate escapes written as their original bytes
    (see `atomic_text`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as e:
        raise output_error(e, path, what, setting=setting) from None
    done = 0

    def commit(text: str) -> None:
        nonlocal done
        data = text.encode("utf-8", "surrogateescape")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        done += len(data)

    try:
        yield commit
        os.fsync(fd)
    except BaseException as e:
        try:
            os.ftruncate(fd, done)
            os.close(fd)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, TransferCasesError):
            raise output_error(e, path, what, setting=setting) from None
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(e, path, what, setting=setting) from None


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


def atomic_write_text(path: str | Path, text: str, *, what: str, setting: str = "paths.output_dir") -> None:
    with atomic_text(path, what=what, setting=setting) as f:
        f.write(text)


def output_error(
    error: OSError, path: str | Path, what: str, space_hint: str = "", setting: str = "paths.output_dir"
) -> OutputError:
    """One readable message for a failed write: the file, the reason, and what to do, naming the
    `setting` that moves this output (`--out` only for commands that have it)."""
    reason = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
    }.get(error.errno or 0, (error.strerror or str(error)).lower())
    if setting.startswith("--"):
        elsewhere = f"pass {setting} with a location you can write"
    elif setting == "paths.output_dir":
        elsewhere = f"{setting}=/path/to/folder (or hydra.run.dir=...)"
    else:
        elsewhere = f"{setting}=/path/to/folder"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = space_hint or f"free some space, or write elsewhere: {elsewhere}"
    else:
        hint = f"choose a writable location: {elsewhere}"
    return OutputError(f"cannot write the {what} {path}: {reason}; {hint}")


def is_local_path(path: Any) -> bool:
    """A path on this machine's file system (no `s3://`-style protocol other than `file://`)."""
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, but a local checkpoint is written atomically in its own folder.

    Lightning's own "atomic" save stages the file in the system temp folder and moves it, which is a
    copy (and a truncated checkpoint when the disk fills) when that folder is on another device.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not is_local_path(path):
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
