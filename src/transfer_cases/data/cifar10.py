"""CIFAR-10 as JPEG files, read straight from the (uncompressed) zip or from an extracted folder."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from transfer_cases.data.datamodule import ClassificationDataModule
from transfer_cases.data.imagefolder import IMAGE_EXTENSIONS, folder_splits
from transfer_cases.data.sources import ImageSource, digest, file_stamp, open_image, verify_image
from transfer_cases.data.splits import Splits, build_splits
from transfer_cases.errors import DataError

ZIP_NAME = "cifar10_jpg.zip"
ZIP_PREFIXES = ("cifar10_jpg/", "")
SPLITS = ("train", "test")
_HINT = f"set data.root=/path/to/{ZIP_NAME} or to a folder with train/<class>/ and test/<class>/"


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
        return digest(type(self).__name__, file_stamp(self.zip_path), self.members, self.labels)

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


def cifar_splits(root: Path) -> tuple[list[str], Splits]:
    """Classes and sources from a zip, a folder holding the zip, or an extracted folder."""
    if not root.exists():
        raise DataError(f"CIFAR-10 data not found: {root}; {_HINT}")
    if root.is_dir():
        for base in (root, root / "cifar10_jpg"):
            if (base / "train").is_dir():
                return folder_splits({s: base / s for s in SPLITS if (base / s).is_dir()})
        if not (root / ZIP_NAME).is_file():
            raise DataError(f"{root} holds neither train/ and test/ folders nor {ZIP_NAME}; {_HINT}")
        root = root / ZIP_NAME
    listings, prefix = zip_listings(root)
    where = {split: f"{root}:{prefix}{split}" for split in SPLITS}
    return build_splits(listings, where, lambda members, labels: ZipSource(root, members, labels))


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 (32x32 JPEGs): val is a seeded `val_fraction` (default 0.1) of train, test the test split.
    `root` is the zip, a folder containing it, or an extracted `train/` + `test/` folder."""

    default_val_fraction = 0.1

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.classes, self._splits = cifar_splits(self.root)

    def _load_splits(self) -> Splits:
        return self._splits

    def no_test_split_message(self) -> str:
        return f"there is no test split in {self.root}; it needs test/<class>/ images next to train/"
