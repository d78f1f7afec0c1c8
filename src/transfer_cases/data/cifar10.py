"""CIFAR-10 as JPEG files, read straight from the (uncompressed) zip or from an extracted folder, or
the official python version (`cifar-10-batches-py/`), which `download=True` fetches when none is there."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from transfer_cases.data.datamodule import ClassificationDataModule
from transfer_cases.data.download import Resource, fetch
from transfer_cases.data.imagefolder import IMAGE_EXTENSIONS, folder_splits
from transfer_cases.data.mnist import ArraySource
from transfer_cases.data.sources import ImageSource, file_stamp, open_image, verify_image
from transfer_cases.data.splits import Splits, build_splits
from transfer_cases.utils.digest import value_digest
from transfer_cases.utils.errors import DataError

ZIP_NAME = "cifar10_jpg.zip"
ZIP_PREFIXES = ("cifar10_jpg/", "")
SPLITS = ("train", "test")
_HINT = f"set data.root=/path/to/{ZIP_NAME} or to a folder with train/<class>/ and test/<class>/"
# The official python version (torchvision.datasets.CIFAR10's url, tgz_md5 and base_folder).
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
RESOURCE = Resource((URL,), "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
PY_FOLDER = "cifar-10-batches-py"
PY_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class ZipSource(ImageSource):
    """Images stored as members of a zip file, read on demand.

    A `ZipFile` handle must not be shared between processes (the file offset is shared after fork),
    so each process opens its own on first use and the handle is never pickled.
    """

    def __init__(self, zip_path: Path, members: list[str], labels: list[int]) -> None:
        super().__init__(labels)
        self.zip_path = zip_path
        self.members = members
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.zip_path), os.getpid()
        return self._zip

    def _read(self, index: int) -> tuple[io.BytesIO, str]:
        name = f"{self.zip_path}:{self.members[index]}"
        try:
            return io.BytesIO(self._archive().read(self.members[index])), name
        except (OSError, zipfile.BadZipFile, KeyError) as err:
            raise DataError(
                f"cannot read {name} ({err}); replace {self.zip_path} with an intact copy"
            ) from err

    def load(self, index: int) -> Image.Image:
        return open_image(*self._read(index))

    def inspect(self, index: int) -> tuple[int, int]:
        return verify_image(*self._read(index))

    def fingerprint(self) -> str:
        # The zip's identity (a replaced or touched zip changes it) and which members this split reads.
        return value_digest(type(self).__name__, file_stamp(self.zip_path), self.members, self.labels)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None, "_pid": None}


def zip_listings(zip_path: Path) -> tuple[dict[str, dict[str, list[str]]], str]:
    """`{split: {class: members}}` for the `[cifar10_jpg/]{train,test}/<class>/<image>` members,
    and the prefix in use."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot open {zip_path} as a zip ({err}); {_HINT}") from err
    prefix = next((p for p in ZIP_PREFIXES if any(n.startswith(f"{p}train/") for n in names)), None)
    if prefix is None:
        raise DataError(f"{zip_path} has no train/<class>/ or cifar10_jpg/train/<class>/ members; {_HINT}")
    listings: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for name in sorted(names):
        parts = PurePosixPath(name[len(prefix) :]).parts if name.startswith(prefix) else ()
        if (
            len(parts) == 3
            and parts[0] in listings
            and PurePosixPath(parts[2]).suffix.lower() in IMAGE_EXTENSIONS
        ):
            listings[parts[0]].setdefault(parts[1], []).append(name)
    return listings, prefix


def _unpickle(path: Path) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")  # the official files (MD5 checked when downloaded)
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"cannot read {path} ({err}); delete {path.parent} and fetch it again") from err


def python_splits(folder: Path) -> tuple[list[str], Splits]:
    """Classes and sources from the official python version: pickled (N, 3072) uint8 batches."""

    def source(names: tuple[str, ...]) -> ArraySource:
        files = [folder / name for name in names]
        batches = [_unpickle(f) for f in files]
        data = np.concatenate([b[b"data"] for b in batches])
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NHWC for PIL
        labels = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
        return ArraySource(np.ascontiguousarray(images), labels, files=files)

    meta = _unpickle(folder / "batches.meta")
    classes = [name.decode() for name in meta[b"label_names"]]
    return classes, Splits(train=source(PY_TRAIN), test=source(("test_batch",)))


def not_found_message(root: Path) -> str:
    """What CIFAR-10 data is expected at `root`, and where it comes from."""
    folder = root.parent if root.suffix == ".zip" else root
    return (
        f"CIFAR-10 data not found: {root}; expected {ZIP_NAME} (JPEGs under train/<class>/ and "
        f"test/<class>/), an extracted folder of it, or the official python version {PY_FOLDER}/ "
        f"(data_batch_1..5, test_batch, batches.meta) from {URL}: pass data.download=true to fetch "
        f"it into {folder}, or {_HINT}"
    )


def cifar_splits(root: Path) -> tuple[list[str], Splits]:
    """Classes and sources from a zip, a folder holding the zip, an extracted folder, or the
    python version's folder (or one holding it)."""
    if not root.exists():
        raise DataError(not_found_message(root))
    if root.is_dir():
        for base in (root, root / "cifar10_jpg"):
            if (base / "train").is_dir():
                return folder_splits({s: base / s for s in SPLITS if (base / s).is_dir()})
        for base in (root, root / PY_FOLDER):
            if (base / "batches.meta").is_file():
                return python_splits(base)
        if not (root / ZIP_NAME).is_file():
            raise DataError(f"{root} holds neither train/ and test/ folders nor {ZIP_NAME}; {_HINT}")
        root = root / ZIP_NAME
    listings, prefix = zip_listings(root)
    where = {split: f"{root}:{prefix}{split}" for split in SPLITS}
    return build_splits(listings, where, lambda members, labels: ZipSource(root, members, labels))


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 (32x32 JPEGs): val is a seeded `val_fraction` (default 0.1) of train, test the test split.
    `root` is the zip, a folder containing it, an extracted `train/` + `test/` folder, or the python
    version's folder. When `root` is absent, the python version next to it is read: with `download`,
    fetched there first (a zip `root` names its folder)."""

    default_val_fraction = 0.1

    def __init__(self, root: str | Path, download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        folder = self.root.parent if self.root.suffix == ".zip" else self.root
        if not self.root.exists() and not (folder / PY_FOLDER / "batches.meta").is_file() and download:
            fetch([RESOURCE], folder, name="CIFAR-10", extract=True)
        if not self.root.exists() and (folder / PY_FOLDER / "batches.meta").is_file():
            self.classes, self._splits = python_splits(folder / PY_FOLDER)
        else:
            self.classes, self._splits = cifar_splits(self.root)

    def _load_splits(self) -> Splits:
        return self._splits

    def no_test_split_message(self) -> str:
        return f"there is no test split in {self.root}; it needs test/<class>/ images next to train/"
