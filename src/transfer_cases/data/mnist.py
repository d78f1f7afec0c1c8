"""MNIST from the four standard idx files (gzipped or not), read with numpy; `download=True`
fetches the official gzipped files (torchvision's mirrors and MD5s) when they are missing."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transfer_cases.data.datamodule import ClassificationDataModule
from transfer_cases.data.download import Resource, fetch
from transfer_cases.data.sources import ImageSource, file_stamp
from transfer_cases.data.splits import Splits
from transfer_cases.utils.digest import value_digest
from transfer_cases.utils.errors import DataError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# torchvision.datasets.MNIST's mirrors and MD5s of the gzipped files.
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
RESOURCES = [Resource(tuple(m + name for m in MIRRORS), name, md5) for name, md5 in MD5.items()]
_SOURCE = (
    f"the official files are at {MIRRORS[0]} (torchvision's mirror): pass data.download=true to fetch "
    "them there, or set data.root=/path/to/mnist"
)


class ArraySource(ImageSource):
    """Grayscale images held in a uint8 array (N, H, W); converted to RGB on access.

    `files` are those the arrays were read from: the fingerprint stats them instead of hashing
    the pixels (without files, the arrays themselves are hashed).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, files: Sequence[Path] = ()) -> None:
        super().__init__(labels)
        self.images = images
        self.files = list(files)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def inspect(self, index: int) -> tuple[int, int]:
        return self.images.shape[2], self.images.shape[1]

    def fingerprint(self) -> str:
        content = [file_stamp(f) for f in self.files] if self.files else self.images
        return value_digest(type(self).__name__, content, self.images.shape, self.labels)


def find_idx_files(root: Path) -> dict[str, Path]:
    """Path of each idx file under `root` (or torchvision's `root/MNIST/raw`), plain or `.gz`."""
    expected = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
    if not root.is_dir():
        raise DataError(f"MNIST folder not found: {root}; it must hold {expected}; {_SOURCE}")
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        candidates = [d / name for d in (root, root / "MNIST" / "raw") for name in (stem, f"{stem}.gz")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(stem)
        else:
            found[key] = path
    if missing:
        raise DataError(
            f"MNIST files missing in {root}: {', '.join(missing)}; the folder must hold {expected}; {_SOURCE}"
        )
    return found


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte idx array: 4-byte magic (0, 0, 0x08, ndim), ndim big-endian sizes, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path} ({err}); replace the file with an intact copy") from err
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an unsigned-byte idx file; replace it with the original MNIST file")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated or padded (header says {shape}); replace the file")
    return values.reshape(shape)


def _array_source(images_path: Path, labels_path: Path) -> ArraySource:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) > 9:
        raise DataError(
            f"{images_path} ({images.shape}) and {labels_path} ({labels.shape}) do not make a set of images "
            "with labels 0-9; replace them with the original MNIST files"
        )
    return ArraySource(images, labels, files=(images_path, labels_path))


class MNISTDataModule(ClassificationDataModule):
    """Handwritten digits, classes "0".."9": val is a seeded `val_fraction` (default 0.1) of train,
    test is t10k. The arrays are read at setup; `__init__` only checks that the files are there
    (with `download`, fetching the missing ones into `root` first)."""

    default_val_fraction = 0.1

    def __init__(self, root: str | Path, download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        try:
            self._files = find_idx_files(self.root)
        except DataError:
            if not download:
                raise
            fetch(RESOURCES, self.root, name="MNIST")
            self._files = find_idx_files(self.root)
        self.classes = [str(digit) for digit in range(10)]

    def _load_splits(self) -> Splits:
        files = self._files
        return Splits(
            train=_array_source(files["train_images"], files["train_labels"]),
            test=_array_source(files["test_images"], files["test_labels"]),
        )
