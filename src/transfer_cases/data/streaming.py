"""Images in streaming shards (LitData's chunk format), local or at any URL LitData reads (s3://,
gs://, ...): `ShardDataModule`, and `write_shards`, which turns any data module's splits into shards.

Why LitData and not WebDataset: a LitData dataset is indexed (index.json lists every chunk with its
size and item count) and gives random access by item, so a shard split is one more `ImageSource`:
the seeded val split, subsampling, Lightning's DistributedSampler (each DDP rank its share), the
feature cache and the image checks work as they do for folders, and shards written from a folder
give the same items in the same order (the same training result, not only a similar one). A
WebDataset tar is a stream with no index: none of that holds without reading it all.

Layout (what `transfer-shards` writes): `root/classes.json` (class names, each split's labels) and
`root/<split>/` (index.json + chunk-*.bin) for train, val and test. Each item is the image file's
own bytes (not decoded and re-encoded), so the pixels are the folder's.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transfer_cases.data.datamodule import ClassificationDataModule
from transfer_cases.data.sources import FileSource, ImageSource, file_stamp, open_image
from transfer_cases.data.splits import Splits
from transfer_cases.utils.digest import value_digest
from transfer_cases.utils.errors import DataError

INSTALL = "pip install 'transfer-cases[streaming]'"
CLASSES = "classes.json"
SPLITS = ("train", "val", "test")


def _litdata() -> Any:
    try:
        import litdata
    except ImportError as err:
        raise DataError(f"shards are read with LitData ({err}); install it with: {INSTALL}") from err
    return litdata


def _is_url(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def _read_small_file(root: str, name: str, cache_dir: str) -> bytes:
    """`root/name` from a local folder or a URL (through LitData's own downloaders)."""
    if not _is_url(root):
        path = Path(root.removeprefix("file://")) / name
        try:
            return path.read_bytes()
        except OSError as err:
            raise DataError(
                f"cannot read {path} ({err}); set data.root to a folder written by transfer-shards"
            ) from err
    from litdata.streaming.downloader import get_downloader

    local = Path(cache_dir) / name
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        get_downloader(root, cache_dir, []).download_file(f"{root.rstrip('/')}/{name}", str(local))
        return local.read_bytes()
    except Exception as err:
        raise DataError(f"cannot read {root}/{name} ({err}); check data.root and your credentials") from err


class ShardSource(ImageSource):
    """One split's shards. Items are read by index through a `StreamingDataset` opened once per
    process (a handle must not cross a fork); a local chunk whose size is not the one its index
    records (a copy cut short) is refused when the source is made, naming the file."""

    def __init__(self, url: str, labels: list[int], cache_dir: str) -> None:
        super().__init__(labels)
        self.url, self.cache_dir = url, cache_dir
        index = json.loads(_read_small_file(url, "index.json", cache_dir))
        self.chunks = [(c["filename"], int(c["chunk_bytes"]), int(c["chunk_size"])) for c in index["chunks"]]
        if sum(n for _, _, n in self.chunks) != len(self.labels):
            raise DataError(
                f"{url} holds {sum(n for _, _, n in self.chunks)} items but {CLASSES} lists "
                f"{len(self.labels)} labels for it; write the shards again with transfer-shards"
            )
        if not _is_url(url):
            for name, size, _ in self.chunks:
                self._check_chunk(Path(url) / name, size)
        self._dataset: Any = None
        self._pid: int | None = None

    @staticmethod
    def _check_chunk(path: Path, size: int) -> None:
        try:
            found = path.stat().st_size
        except OSError as err:
            raise DataError(
                f"shard {path} is missing ({err}); copy it again or write the shards again"
            ) from err
        if found != size:
            raise DataError(
                f"shard {path} is {found} bytes but its index.json says {size}: it is truncated or was "
                "replaced; copy it again or write the shards again with transfer-shards"
            )

    def _items(self) -> Any:
        if self._dataset is None or self._pid != os.getpid():
            self._dataset = _litdata().StreamingDataset(
                self.url, cache_dir=None if not _is_url(self.url) else self.cache_dir
            )
            self._pid = os.getpid()
        return self._dataset

    def load(self, index: int) -> Any:
        name = f"{self.url} item {index}"
        try:
            item = self._items()[index]
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"cannot read {name} ({err}); copy the shards again or write them again") from err
        return open_image(io.BytesIO(bytes(item["image"])), name)

    def fingerprint(self) -> str:
        # The shard list with each chunk's recorded size, and, for local shards, their file stamps
        # (size and mtime, or content digests under cache.stamp=content).
        stamps = [] if _is_url(self.url) else [file_stamp(Path(self.url) / n) for n, _, _ in self.chunks]
        return value_digest(type(self).__name__, "upright", self.url, self.chunks, stamps, self.labels)


class ShardDataModule(ClassificationDataModule):
    """Images from shards written by `transfer-shards`: `root` is their folder or URL. Without a val
    split, a seeded val_fraction of train is held out, as for folders. Remote chunks are kept in
    `cache_dir` (default: a temporary folder) as they are read."""

    default_val_fraction = 0.2

    def __init__(self, root: str | Path, cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = str(root).rstrip("/")
        self.cache_dir = cache_dir or str(Path(tempfile.gettempdir()) / "litdata_shards")
        meta = json.loads(_read_small_file(self.root, CLASSES, self.cache_dir))
        self.classes = list(meta["classes"])
        self._labels: dict[str, list[int]] = meta["labels"]

    def _load_splits(self) -> Splits:
        _litdata()
        sources = {
            split: ShardSource(f"{self.root}/{split}", labels, f"{self.cache_dir}/{split}")
            for split, labels in self._labels.items()
        }
        return Splits(**sources)

    def no_test_split_message(self) -> str:
        return f"there is no test split in {self.root}; write shards from a folder with a test/ split"


def write_shards(
    splits: Mapping[str, ImageSource], classes: list[str], out: Path, chunk_bytes: str = "64MB"
) -> dict[str, int]:
    """Write each split's images into `out/<split>/` shards in index order, and `out/classes.json`;
    returns the item count per split. File sources are stored as their files' bytes; other sources
    (arrays, zip members) as lossless PNG of the decoded image."""
    from litdata.streaming.writer import BinaryWriter

    _litdata()
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, source in splits.items():
        writer = BinaryWriter(str(out / split), chunk_bytes=chunk_bytes)
        for i in range(len(source)):
            writer[i] = {"image": _image_bytes(source, i), "label": int(source.labels[i])}
        writer.done()
        writer.merge(1)
        counts[split] = len(source)
    labels = {split: [int(x) for x in source.labels] for split, source in splits.items()}
    (out / CLASSES).write_text(json.dumps({"classes": classes, "labels": labels}), encoding="utf-8")
    return counts


def _image_bytes(source: ImageSource, index: int) -> bytes:
    if isinstance(source, FileSource):
        return Path(source.paths[index]).read_bytes()
    buffer = io.BytesIO()
    source.load(index).save(buffer, format="PNG")
    return buffer.getvalue()


def split_sources(splits: Splits) -> dict[str, ImageSource]:
    return {name: s for name in SPLITS if (s := getattr(splits, name)) is not None}
