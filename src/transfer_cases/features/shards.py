"""One cache key's features on disk: two `.npy` arrays filled shard by shard, memory-mapped when read.

A key's folder holds `features.npy` (N rows of float32) and `labels.npy` (N int64), allocated once
(sparse) at their final size, and one record per shard, `rows-<start>-<stop>.json`. A shard is a
block of whole extraction batches; whoever extracts it writes its rows in place, flushes them to disk
and only then writes its record (atomically) with the SHA-256 of those rows. A record is the only
thing that makes rows count: a rank killed mid-shard leaves rows without a record, which are
extracted again; the shards that have records are kept. Digests are checked by streaming the bytes
from the file (never by mapping or loading the whole array), so checking costs no memory. Training
reads rows by index (`FileRows`); whole-split readers (the advisor, the audit) get the map.

Shards are blocks of whole batches starting at a batch boundary, so every batch holds the same images
however the shards are shared out: one process and W processes compute bit-identical rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from transfer_cases.utils.atomic import atomic_write, output_error
from transfer_cases.utils.errors import OutputError

log = logging.getLogger(__name__)
FORMAT = "transfer-cases-features/3"
MIN_SHARDS = 16  # so that up to this many ranks all get work, even on a small split
MAX_SHARD_BATCHES = 64  # and no shard holds more batches than this (a killed rank loses little)
CHUNK = 8 << 20  # bytes read at a time when checking digests
SMALL_FILE_BYTES = 16 << 20  # a features file this small is held in memory once read
SPACE_HINT = "free some space, or set paths.cache_dir to another disk (or cache.enabled=false)"


@dataclass(frozen=True)
class Shard:
    """Rows `start` to `stop` (exclusive) of a split."""

    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"rows-{self.start:09d}-{self.stop:09d}"


def layout(rows: int, batch_size: int) -> list[Shard]:
    """The shards of a split of `rows` rows extracted in batches of `batch_size`: at least `MIN_SHARDS`
    when there are enough batches, at most `MAX_SHARD_BATCHES` batches each."""
    batches = -(-rows // batch_size)
    per_shard = min(MAX_SHARD_BATCHES, max(1, -(-batches // MIN_SHARDS))) * batch_size
    return [Shard(s, min(s + per_shard, rows)) for s in range(0, rows, per_shard)]


def _header(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """`(offset of the data, shape, dtype)` of an `.npy` file, from its header alone."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError("a Fortran-ordered array")
        return f.tell(), tuple(shape), dtype


class ShardedArrays:
    """The features and labels of one cache key, in `folder`, filled shard by shard."""

    def __init__(self, folder: Path, key: str, rows: int) -> None:
        self.folder, self.key, self.rows = folder, key, rows
        self.features_path = folder / "features.npy"
        self.labels_path = folder / "labels.npy"

    def record_path(self, shard: Shard) -> Path:
        return self.folder / f"{shard.name}.json"

    def record(self, shard: Shard) -> dict[str, Any] | None:
        """The shard's record, or None when it is missing or is not this key's."""
        try:
            rec = json.loads(self.record_path(shard).read_text())
        except (OSError, ValueError):
            return None
        return rec if rec.get("format") == FORMAT and rec.get("key") == self.key else None

    def drop_if_damaged(self) -> None:
        """A file cut short, or whose header is unreadable, is removed with every record of its rows."""
        with FileLock(str(self.folder / ".allocate.lock")):
            for path in (self.features_path, self.labels_path):
                if path.exists() and _fits(path) is None:
                    log.warning("feature cache file %s is damaged (cut short?); rebuilding it", path)
                    for stale in (self.features_path, self.labels_path, *self.folder.glob("rows-*.json")):
                        stale.unlink(missing_ok=True)

    def _allocate(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
        """The data offset of `path`, created (sparse, full size) unless it already has this shape."""
        with FileLock(str(self.folder / ".allocate.lock")):
            fits = _fits(path)
            if fits is not None and fits[1:] == (shape, dtype):
                return fits[0]

            def create(f: Any) -> None:
                header = {
                    "descr": np.lib.format.dtype_to_descr(dtype),
                    "fortran_order": False,
                    "shape": shape,
                }
                np.lib.format.write_array_header_2_0(f, header)
                f.truncate(f.tell() + _nbytes(shape, dtype))

            atomic_write(
                path, create, what="feature cache file", space_hint=SPACE_HINT, setting="paths.cache_dir"
            )
            for other in self.folder.glob("rows-*.json"):  # records of rows the new file does not hold
                other.unlink(missing_ok=True)
            return _header(path)[0]

    def write(
        self, shard: Shard, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], meta: dict[str, Any]
    ) -> None:
        """Write the shard's rows (from `batches`, exactly its rows in order), flush them, then its record."""
        digests = [hashlib.sha256(), hashlib.sha256()]
        row, fds = shard.start, None
        try:
            for f, y in batches:
                arrays = [
                    np.ascontiguousarray(f.numpy(), np.float32),
                    np.ascontiguousarray(y.numpy(), np.int64),
                ]
                if fds is None:
                    paths = (self.features_path, self.labels_path)
                    places = [
                        (p, self._allocate(p, (self.rows, *a.shape[1:]), a.dtype))
                        for p, a in zip(paths, arrays, strict=True)
                    ]
                    fds = [(os.open(p, os.O_WRONLY), off) for p, off in places]
                for (fd, offset), a, h in zip(fds, arrays, digests, strict=True):
                    data = memoryview(a).cast("B")
                    at, done = offset + row * (a.nbytes // len(a)), 0
                    while done < len(data):  # a write may take less than it was given
                        done += os.pwrite(fd, data[done:], at + done)
                    h.update(data)
                row += len(arrays[0])
            for fd, _ in fds or []:
                os.fsync(fd)
        except OSError as e:  # a full disk mid-shard: the shard has no record, so it does not count
            if isinstance(e, OutputError):
                raise
            raise output_error(
                e, self.features_path, "feature cache file", SPACE_HINT, "paths.cache_dir"
            ) from None
        finally:
            for fd, _ in fds or []:
                os.close(fd)
        if row != shard.stop:
            raise RuntimeError(
                f"shard {shard.name} got {row - shard.start} rows, not {shard.stop - shard.start}"
            )
        record = {"format": FORMAT, "key": self.key, "start": shard.start, "stop": shard.stop, **meta}
        record |= {"features_sha256": digests[0].hexdigest(), "labels_sha256": digests[1].hexdigest()}
        text = json.dumps(record, indent=1)
        atomic_write(
            self.record_path(shard),
            lambda f: f.write(text.encode()),
            what="feature cache record",
            space_hint=SPACE_HINT,
            setting="paths.cache_dir",
        )

    def intact(self, shard: Shard) -> bool:
        """The shard has a record and its rows on disk still have the recorded digests."""
        rec = self.record(shard)
        if rec is None:
            return False
        try:
            for path, name in ((self.features_path, "features_sha256"), (self.labels_path, "labels_sha256")):
                offset, shape, dtype = _header(path)
                row = _nbytes(shape[1:], dtype)
                if (
                    shape[0] != self.rows
                    or _digest(path, offset + shard.start * row, offset + shard.stop * row) != rec[name]
                ):
                    return False
        except (OSError, ValueError):
            return False
        return True

    def discard(self, shard: Shard) -> None:
        self.record_path(shard).unlink(missing_ok=True)

    def open(self) -> tuple[torch.Tensor, torch.Tensor, FileRows]:
        """`(features, labels, rows)`: the features as a tensor over a private map of the file (pages read
        when touched; nothing written back), the labels in memory (8 bytes a row), and a reader of
        feature rows by index that makes only those rows resident (`FileRows`)."""
        offset, shape, dtype = _header(self.features_path)
        with open(self.features_path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        array = np.frombuffer(m, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        offset, shape, dtype = _header(self.labels_path)
        with open(self.labels_path, "rb") as f:
            f.seek(offset)
            labels = np.fromfile(f, dtype=dtype, count=int(np.prod(shape)))
        return torch.from_numpy(array), torch.from_numpy(labels), FileRows(self.features_path)


class FileRows:
    """Rows of an `.npy` file by index, read with positional reads (runs of consecutive rows in one).

    Not through the map: where the kernel keeps a file's page cache in large folios (Linux 6), a fault
    on a mapped file maps the whole folio around the touched row, not one page, so random rows read
    through a map make most of the file resident within a few batches. Read this way, only the batch is.
    A file of at most `SMALL_FILE_BYTES` is read whole at the first batch: a syscall per run of rows
    would cost more than its rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset, self.shape, self.dtype = _header(path)
        self.row_bytes = _nbytes(self.shape[1:], self.dtype)
        self._fd = os.open(path, os.O_RDONLY)
        self._small = path.stat().st_size <= SMALL_FILE_BYTES
        self._whole: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        if self._small:
            if self._whole is None:
                self._whole = torch.from_numpy(
                    np.fromfile(self.path, self.dtype, offset=self.offset).reshape(self.shape)
                )
            return self._whole[index]
        order = index.argsort()
        wanted = index[order].tolist()
        rows = np.empty((len(wanted), *self.shape[1:]), self.dtype)
        start = 0
        for end in range(1, len(wanted) + 1):
            if end == len(wanted) or wanted[end] != wanted[end - 1] + 1:
                view = memoryview(rows[start:end]).cast("B")
                if os.preadv(self._fd, [view], self.offset + wanted[start] * self.row_bytes) != len(view):
                    raise OSError(f"feature cache file {self.path} is shorter than its header says")
                start = end
        out = torch.empty((len(wanted), *self.shape[1:]), dtype=torch.from_numpy(rows[:0]).dtype)
        out[order] = torch.from_numpy(rows)
        return out

    def __del__(self) -> None:
        if hasattr(self, "_fd"):
            os.close(self._fd)


def _fits(path: Path) -> tuple[int, tuple[int, ...], np.dtype] | None:
    """`path`'s header if it reads and the file is as long as it says, else None."""
    try:
        offset, shape, dtype = _header(path)
        return (offset, shape, dtype) if path.stat().st_size >= offset + _nbytes(shape, dtype) else None
    except (OSError, ValueError):
        return None


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _digest(path: Path, start: int, stop: int) -> str:
    h, buf = hashlib.sha256(), bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while start < stop:
            n = f.readinto(memoryview(buf)[: min(CHUNK, stop - start)])
            if not n:
                raise ValueError("file cut short")
            h.update(memoryview(buf)[:n])
            start += n
    return h.hexdigest()


def take(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], rows: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of `batches` that make up the next `rows` rows (shards end on batch boundaries)."""
    while rows > 0:
        f, y = next(batches)
        rows -= len(f)
        yield f, y
