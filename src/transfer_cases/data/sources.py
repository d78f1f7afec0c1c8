"""Where images come from: a source gives random access to one split's images and integer labels.

`FileSource` reads image files; MNIST (`ArraySource`) and CIFAR-10 (`ZipSource`) bring their own.
`SubsetDataset` turns chosen indices of a source into `(tensor, label)` pairs for a DataLoader.
Every source has a `fingerprint()`: a cheap digest of its content identity (no decoding), so that
features computed from it can be cached and reused only while the images are the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from transfer_cases.data.transforms import to_rgb
from transfer_cases.utils.digest import value_digest
from transfer_cases.utils.errors import DataError

# What PIL raises on a truncated, corrupt or not-an-image file.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Readable = str | Path | IO[bytes]


def open_image(fp: Readable, name: str) -> Image.Image:
    """Decode one image to RGB, upright; a bad file becomes a `DataError` that names it, so a crash
    mid-epoch points at the file to fix rather than at PIL internals.

    Upright: a camera stores a photo taken sideways as the sensor saw it, with an EXIF `Orientation`
    tag saying how to turn it (every viewer does); without the turn a model is trained on, and
    predicts, sideways images."""
    try:
        with Image.open(fp) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img)
    except DataError as err:  # a decodable image whose pixels cannot be made RGB (see `to_rgb`)
        raise DataError(f"cannot use image {name}: {err}") from err
    except _PIL_ERRORS as err:
        raise DataError(f"cannot read image {name} ({err}); delete or replace the file") from err


def verify_image(fp: Readable, name: str) -> tuple[int, int]:
    """Cheap check that an image is whole, without decoding its pixels: PIL's structure check plus,
    for JPEG (which `verify()` only reads the header of), the end-of-image marker, so a file cut
    short fails here and not mid-epoch in a worker. Returns (width, height); raises `DataError`."""
    try:
        with Image.open(fp) as img:
            size, kind = img.size, img.format
            img.verify()
    except _PIL_ERRORS as err:
        raise DataError(f"{name}: {err}") from err
    if kind == "JPEG" and not _jpeg_has_end(fp):
        raise DataError(f"{name}: truncated JPEG (no end-of-image marker after the image data)")
    return size


def _jpeg_has_end(fp: Readable) -> bool:
    """Whether the JPEG's image data is followed by the end-of-image marker FFD9. Usually the last two
    bytes (after padding); else the whole file is scanned, because data may follow the image (a motion
    photo's video) and the header may hold an FFD9 of its own (an EXIF thumbnail)."""
    with open(fp, "rb") if isinstance(fp, str | Path) else contextlib.nullcontext(fp) as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        if f.read().rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):
            return True
        f.seek(0)
        data = f.read()
    scan = _first_scan_data(data)
    return scan is not None and data.find(b"\xff\xd9", scan) != -1


def _first_scan_data(data: bytes) -> int | None:
    """Offset where the first scan's entropy-coded data starts (after the SOS header), or None.
    Entropy-coded data escapes every FF byte, so an FFD9 after this offset is a real marker."""
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan
            return pos + 2 + length
        pos += 2 + length
    return None


STAMPS = ("mtime", "content")
_stamp: ContextVar[str] = ContextVar("stamp", default="mtime")


@contextlib.contextmanager
def stamping(mode: str) -> Iterator[None]:
    """Fingerprints computed in the block stamp files by `mode` (see STAMPS)."""
    if mode not in STAMPS:
        raise ValueError(f"stamp mode {mode!r} is not one of {STAMPS}")
    token = _stamp.set(mode)
    try:
        yield
    finally:
        _stamp.reset(token)


def file_stamp(path: Path) -> tuple[str, int, int | str]:
    """(path, size, mtime_ns) from one `stat`, or (path, size, content hash) under `stamping("content")`."""
    try:
        st = os.stat(path)
        if _stamp.get() == "content":
            with open(path, "rb") as f:
                return str(path), st.st_size, "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err}); was it moved or deleted after listing?") from err
    return str(path), st.st_size, st.st_mtime_ns


class ImageSource(ABC):
    """Random access to one split's images and integer labels, before any subsetting or transform."""

    def __init__(self, labels: Sequence[int] | np.ndarray) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """The RGB image at `index`; raises `DataError` naming the file when it cannot be read."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable digest of what the images are (file identities, not pixels): it changes when an
        image is added, removed, replaced or touched, and is cheap (no decoding)."""

    def inspect(self, index: int) -> tuple[int, int] | None:
        """Cheap check used by `check_images`: the image's (width, height), None when unknown;
        raises `DataError` naming the image when it looks unreadable."""
        return None


class FileSource(ImageSource):
    """Images stored as files on disk."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | np.ndarray) -> None:
        super().__init__(labels)
        self.paths = list(paths)

    def load(self, index: int) -> Image.Image:
        return open_image(self.paths[index], str(self.paths[index]))

    def inspect(self, index: int) -> tuple[int, int]:
        return verify_image(self.paths[index], str(self.paths[index]))

    def fingerprint(self) -> str:
        # "upright": features cached before `open_image` applied the EXIF orientation are not reused.
        return value_digest(type(self).__name__, "upright", [file_stamp(p) for p in self.paths], self.labels)


class SubsetDataset(Dataset):
    """`(image tensor, label)` pairs for chosen indices of a source, through a transform."""

    def __init__(self, source: ImageSource, indices: np.ndarray, transform: Callable) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[i])
        return self.transform(self.source.load(index)), int(self.source.labels[index])

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    def fingerprint(self) -> str:
        """The source's fingerprint and the chosen indices (not the transform: a cache keys that apart)."""
        return value_digest(type(self).__name__, self.source.fingerprint(), self.indices)
