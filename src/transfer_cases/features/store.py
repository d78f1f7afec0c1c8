"""Feature files on disk: one file per cache key, written atomically, checked when read.

A file holds `{"format", "key", "parts", "features", "labels", "digest"}` (tensors, strings and numbers
only, so it loads with `torch.load(weights_only=True)`). `digest` is a SHA-256 of the tensors: a file that
was truncated, overwritten or damaged is detected on load and rebuilt, never used. Builds are serialised
per key with a file lock, so two runs (a multirun, DDP ranks) never build the same file twice at once
and never read a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from transfer_cases.utils.atomic import atomic_write
from transfer_cases.utils.digest import tensor_digest
from transfer_cases.utils.errors import ConfigError, OutputError

log = logging.getLogger(__name__)

FORMAT = "transfer-cases-features/1"


@dataclass
class FeatureSet:
    """Pooled features of one split (and view) with their labels.

    `features` is (N, C), or (N, V, C) for V augmented views of each training image; `extraction`
    names the pass that computed them (set by `cached_features`, not stored: the key holds it).
    """

    features: torch.Tensor
    labels: torch.Tensor
    extraction: str | None = None

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
