"""Feature files on disk, checked when read: a split's features in shards (`get_or_build_rows`), small
records in one file per key (`get_or_build`).

A split's rows are shared out between the ranks of a distributed run, each extracting its shards into
the key's memory-mapped arrays (`features.shards`); every rank then checks its share of the digests
and maps the whole set. A shard whose digest does not match is extracted again, alone.

A record file holds `{"format", "key", "parts", "features", "labels", "digest"}` (tensors, strings and numbers
only, so it loads with `torch.load(weights_only=True)`). `digest` is a SHA-256 of the tensors: a file that
was truncated, overwritten or damaged is detected on load and rebuilt, never used. Builds are serialised
per key with a file lock, so two runs (a multirun, DDP ranks) never build the same file twice at once
and never read a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from transfer_cases.features.onnx_body import BackendUnavailable
from transfer_cases.features.ranks import meet, world
from transfer_cases.features.shards import FileRows, Shard, ShardedArrays, layout, take
from transfer_cases.utils.atomic import atomic_write
from transfer_cases.utils.digest import tensor_digest
from transfer_cases.utils.errors import ConfigError, OutputError

log = logging.getLogger(__name__)

FORMAT = "transfer-cases-features/1"
# How long past its own share a rank waits for the other ranks' before naming the missing ones.
SYNC_GRACE_S = 600.0
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FeatureSet:
    """Pooled features of one split (and view) with their labels.

    `features` is (N, C), or (N, V, C) for V augmented views of each training image; `extraction`
    names the pass that computed them (set by `cached_features`, not stored: the key holds it).
    `rows`, for features mapped from disk, reads rows by index without making the rest resident.
    """

    features: torch.Tensor
    labels: torch.Tensor
    extraction: str | None = None
    rows: FileRows | None = None

    def digest(self) -> str:
        return tensor_digest([("features", self.features), ("labels", self.labels)])


def cache_key(parts: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of everything that changes the features."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class FeatureStore:
    """A folder of feature files named by their cache key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / f"{key[:32]}.pt"

    def load(self, key: str) -> FeatureSet | None:
        """The stored features for `key`, or None when absent or unusable (then it is rebuilt)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            fs = FeatureSet(obj["features"], obj["labels"])
            ok = obj.get("format") == FORMAT and obj.get("key") == key and obj.get("digest") == fs.digest()
        except Exception as e:  # a truncated zip, a pickle error, a missing field: all mean "rebuild"
            log.warning(
                "feature cache file %s is unreadable (%s: %s); rebuilding it", path, type(e).__name__, e
            )
            return None
        if not ok:
            log.warning("feature cache file %s does not match its key or checksum; rebuilding it", path)
            return None
        return fs

    def save(self, key: str, fs: FeatureSet, parts: dict[str, Any]) -> Path:
        """Write atomically (a temp file in the same folder, then a rename): readers see old or new."""
        path = self.path(key)
        payload = {
            "format": FORMAT,
            "key": key,
            "parts": json.dumps(parts, sort_keys=True, default=str),
            "features": fs.features,
            "labels": fs.labels,
            "digest": fs.digest(),
        }
        atomic_write(
            path,
            lambda f: torch.save(payload, f),
            what="feature cache file",
            space_hint="free some space, or set paths.cache_dir to another disk (or cache.enabled=false)",
            setting="paths.cache_dir",
        )
        return path

    def _not_writable(self, verb: str, error: OSError) -> ConfigError:
        reason = (error.strerror or str(error)).lower()
        return ConfigError(
            f"cannot {verb} the feature cache folder {self.root} ({reason}); set paths.cache_dir (or "
            "cache.dir) to a folder you can write, or turn the cache off with cache.enabled=false"
        )

    def _folder(self, key: str) -> Path:
        """The key's folder, made; a root that cannot be made, or written in, is one clear error."""
        for folder, verb in ((self.root, "create"), (self.root / key[:32], "write to")):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise self._not_writable(verb, e) from None
        return self.root / key[:32]

    def get_or_build_rows(
        self,
        parts: dict[str, Any],
        rows: int,
        batch_size: int,
        build: Callable[[list[Shard]], Batches],
        label: str = "features",
    ) -> tuple[FeatureSet, bool, Path | None]:
        """`(features, hit, folder)` of a split of `rows` rows: this rank extracts its shards of the
        split (`build(shards)` yields their batches, in order), all ranks meet, check their share of
        the digests, and map the whole set. `hit` is True when no rank extracted anything; `folder`
        is None when the features could not be stored (then every rank holds them in memory)."""
        key = cache_key(parts)
        arrays = ShardedArrays(self._folder(key), key, rows)
        shards = layout(rows, batch_size)
        rank, size = world()
        built = 0
        try:
            arrays.drop_if_damaged()
            for _ in range(2):  # a shard found damaged is extracted once more
                built += self._build_share(arrays, shards, build, rank, size, label)
                bad = [s for s in shards[rank::size] if not arrays.intact(s)]
                for shard in bad:
                    log.warning(
                        "feature cache %s %s does not match its checksum; rebuilding it",
                        arrays.folder,
                        shard.name,
                    )
                    arrays.discard(shard)
                met = meet(
                    {"bad": len(bad), "built": built},
                    timeout_s=SYNC_GRACE_S,
                    what=f"{label}: checking digests",
                )
                if not any(m["bad"] for m in met):
                    break
            else:
                raise OutputError(
                    f"feature cache {arrays.folder}: shards read back differ from what was written"
                )
        except OutputError as e:
            # The cache only saves time: a run whose features cannot be stored trains on them in memory.
            log.warning("%s; training on the features in memory, without caching them", e)
            f, y = zip(*build(shards), strict=True)
            return FeatureSet(torch.cat(f), torch.cat(y)), False, None
        features, labels, rows_reader = arrays.open()
        hit = not any(m["built"] for m in met)
        if not hit:
            log.info("%s: rank %d of %d extracted %d of %d shards", label, rank, size, built, len(shards))
        return FeatureSet(features, labels, rows=rows_reader), hit, arrays.folder

    def _build_share(
        self,
        arrays: ShardedArrays,
        shards: list[Shard],
        build: Callable[[list[Shard]], Batches],
        rank: int,
        size: int,
        label: str,
    ) -> int:
        """Extract this rank's missing shards (rank r of W takes shards r, r + W, ...); then, once every
        rank is done, any shard still without a record here (a cache folder that the nodes do not
        share) is extracted here too. The number of shards extracted."""
        start, built, status = time.monotonic(), 0, {}
        try:
            built += _fill(
                arrays, shards[rank::size], build, {"rank": rank, "world_size": size}, f"{rank}-of-{size}"
            )
        except Exception as e:
            status = {"error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__}
            raise
        finally:
            passed_on = (BackendUnavailable, OutputError)
            timeout = SYNC_GRACE_S + time.monotonic() - start
            meet(status, timeout_s=timeout, what=label, passed_on=passed_on)
        if size > 1 and any(arrays.record(s) is None for s in shards):
            log.warning(
                "%s: other ranks' shards are not in %s here (a folder the nodes do not share?); "
                "extracting them on this rank too",
                label,
                arrays.folder,
            )
            built += _fill(arrays, shards, build, {"rank": rank, "world_size": size}, "all")
        return built

    def get_or_build(
        self, parts: dict[str, Any], build: Callable[[], FeatureSet]
    ) -> tuple[FeatureSet, bool, Path | None]:
        """`(features, hit, path)`: the stored features for `parts`, built (once, under a lock) if needed;
        `path` is None when they could not be stored."""
        key = cache_key(parts)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._not_writable("create", e) from None
        fs = self.load(key)
        if fs is not None:
            return fs, True, self.path(key)
        lock = FileLock(str(self.root / f".{key[:32]}.lock"))
        try:
            lock.acquire()
        except OSError as e:  # a folder that exists but cannot be written (a read-only share)
            raise self._not_writable("write to", e) from None
        try:
            fs = self.load(key)  # another process may have built it while this one waited
            if fs is not None:
                return fs, True, self.path(key)
            fs = build()
            try:
                return fs, False, self.save(key, fs, parts)
            except OutputError as e:
                # The cache only saves time: a run whose features cannot be stored trains on them in memory.
                log.warning("%s; training on the features in memory, without caching them", e)
                return fs, False, None
        finally:
            lock.release()


def _fill(
    arrays: ShardedArrays,
    shards: list[Shard],
    build: Callable[[list[Shard]], Batches],
    meta: dict[str, Any],
    share: str,
) -> int:
    """Extract the shards of `shards` that have no record, in one pass; the lock keeps a concurrent run
    from extracting the same share at once (it waits, then finds the records)."""
    with FileLock(str(arrays.folder / f".share-{share}.lock")):
        todo = [s for s in shards if arrays.record(s) is None]
        if todo:
            batches = iter(build(todo))
            for shard in todo:
                arrays.write(shard, take(batches, shard.stop - shard.start), meta)
    return len(todo)
