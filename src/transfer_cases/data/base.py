"""The logic every classification data module shares; subclasses only say where images come from.

A subclass sets `self.classes` in `__init__` (the model is built from it before the Trainer runs)
and either fills `self._sources` with one `ImageSource` per split or overrides `_load_splits()`.
Everything else lives here: the seeded train/val split, the seeded per-class subsampling of train,
transforms, image checks and the dataloaders.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from transfer_cases.data.transforms import check_crop_scale, eval_transform, to_rgb, train_transform
from transfer_cases.errors import ConfigError, DataError
from transfer_cases.preprocess import Preprocess

Item = TypeVar("Item")

# What PIL raises on a truncated, corrupt or not-an-image file.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_image(fp: str | Path | IO[bytes], name: str) -> Image.Image:
    """Decode one image to RGB; a bad file becomes a `DataError` that names it, so a crash mid-epoch
    points at the file to fix rather than at PIL internals."""
    try:
        with Image.open(fp) as img:
            img.load()
            return to_rgb(img)
    except _PIL_ERRORS as err:
        raise DataError(f"cannot read image {name} ({err}); delete or replace the file") from err


def verify_image(fp: str | Path | IO[bytes], name: str) -> str | None:
    """Fast header/structure check (no full decode): None when fine, else `name: reason`."""
    try:
        with Image.open(fp) as img:
            img.verify()
    except _PIL_ERRORS as err:
        return f"{name}: {err}"
    return None


class ImageSource(ABC):
    """Random access to one split's images and integer labels, before any subsetting or transform."""

    def __init__(self, labels: Sequence[int] | np.ndarray) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """The RGB image at `index`; raises `DataError` naming the file when it cannot be read."""

    def problem(self, index: int) -> str | None:
        """Cheap check used by `check_images`: None when the image looks readable, else a description."""
        return None


class FileSource(ImageSource):
    """Images stored as files on disk."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | np.ndarray) -> None:
        super().__init__(labels)
        self.paths = list(paths)

    def load(self, index: int) -> Image.Image:
        return open_image(self.paths[index], str(self.paths[index]))

    def problem(self, index: int) -> str | None:
        return verify_image(self.paths[index], str(self.paths[index]))


@dataclass
class Splits:
    """The sources a subclass provides; `val` None means "split it off train with `val_fraction`"."""

    train: ImageSource
    val: ImageSource | None = None
    test: ImageSource | None = None


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


def class_names(listing: Mapping[str, Any], where: str) -> list[str]:
    """Sorted class names of a train listing; a classifier needs at least two."""
    names = sorted(listing)
    if len(names) < 2:
        found = ", ".join(names) or "none"
        raise DataError(
            f"found {len(names)} class folder(s) in {where} ({found}); a classifier needs at least two: "
            f"put each class's images in its own subfolder {where}/<class>/"
        )
    return names


def label_items(
    listing: Mapping[str, Sequence[Item]], classes: Sequence[str], split: str, where: str
) -> tuple[list[Item], list[int]]:
    """Flatten `{class: items}` into items and labels in the index order of `classes` (those of train),
    so that label i means the same class in every split."""
    index = {name: i for i, name in enumerate(classes)}
    extra = sorted(set(listing) - set(index))
    if extra:
        raise DataError(
            f"the {split} split has class '{extra[0]}' ({where}/{extra[0]}) that the train split lacks "
            f"(train classes: {', '.join(classes)}); add it to train or remove it from {split}"
        )
    missing = sorted(set(index) - set(listing))
    if missing:
        warnings.warn(
            f"the {split} split in {where} has no images of class(es) {', '.join(missing)}", stacklevel=2
        )
    items: list[Item] = []
    labels: list[int] = []
    for name in sorted(listing, key=index.__getitem__):
        items.extend(listing[name])
        labels.extend([index[name]] * len(listing[name]))
    return items, labels


def build_sources(
    listings: Mapping[str, Mapping[str, Sequence[Item]]],
    where: Mapping[str, str],
    factory: Callable[[list[Item], list[int]], ImageSource],
) -> tuple[list[str], dict[str, ImageSource]]:
    """Classes (from train) and one source per split from `{split: {class: items}}` listings.
    A split with no class at all is dropped with a warning (val is then carved from train)."""
    classes = class_names(listings["train"], where["train"])
    sources = {}
    for split, listing in listings.items():
        if not listing:
            warnings.warn(f"ignoring the {split} split: {where[split]} has no class folders", stacklevel=2)
            continue
        items, labels = label_items(listing, classes, split, where[split])
        sources[split] = factory(items, labels)
    return classes, sources


def split_per_class(
    labels: np.ndarray, indices: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of `indices` into (keep, held_out): every class with at least two samples
    gives `fraction` of them (at least one, never all) to held_out."""
    keep, held = [], []
    for label in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == label])
        n_held = round(len(members) * fraction)
        n_held = min(max(n_held, 1), len(members) - 1) if len(members) > 1 else 0
        held.append(members[:n_held])
        keep.append(members[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def take_per_class(
    labels: np.ndarray, indices: np.ndarray, k: int, rng: np.random.Generator, classes: Sequence[str]
) -> np.ndarray:
    """Exactly `k` random indices per class. Draws a full permutation per class, so with one seed the
    subset for k is contained in the subset for any larger k (learning curves compare like with like)."""
    chosen = []
    for label, name in enumerate(classes):
        members = rng.permutation(indices[labels[indices] == label])
        if len(members) < k:
            raise DataError(
                f"class '{name}' has only {len(members)} training images, fewer than "
                f"data.samples_per_class={k}; lower data.samples_per_class or add images"
            )
        chosen.append(members[:k])
    return np.sort(np.concatenate(chosen))


def _as_preprocess(value: Preprocess | Mapping[str, Any] | None) -> Preprocess:
    if value is None:
        return Preprocess()
    if isinstance(value, Preprocess):
        return value
    if isinstance(value, Mapping):
        return Preprocess.from_dict(dict(value))
    raise ConfigError(f"data.preprocess must be a mapping of mean/std/resize_size/crop_size, got {value!r}")


class ClassificationDataModule(L.LightningDataModule):
    """Train/val/test dataloaders for image classification with transfer-learning conveniences.

    Args:
        batch_size: samples per batch for every split.
        num_workers: dataloader worker processes.
        seed: drives the train/val split, the subsampling and the train shuffling order.
        samples_per_class: keep exactly this many train images per class (the small-data regime);
            the val split is drawn first, so it does not depend on this value.
        val_fraction: share of train held out for validation when the data has no val split
            (None: the subclass default `default_val_fraction`).
        preprocess: resize/crop/normalisation of the pretrained weights (`Preprocess` or a dict).
        image_size: if set, resize and crop to this size instead (for small images such as MNIST).
        random_crop_scale: area range of the train RandomResizedCrop; None: the eval resize + crop.
        augment: extra v2 transforms applied to train images after the crop (None: horizontal flip).
        pin_memory, persistent_workers: passed to the DataLoader (persistent: default num_workers > 0).
        check_images: at setup, open every image header and report all unreadable files at once.
    """

    default_val_fraction: float = 0.1

    def __init__(
        self,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        samples_per_class: int | None = None,
        val_fraction: float | None = None,
        preprocess: Preprocess | Mapping[str, Any] | None = None,
        image_size: int | None = None,
        random_crop_scale: Sequence[float] | None = (0.5, 1.0),
        augment: Iterable[Callable] | Callable | None = None,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        check_images: bool = False,
    ) -> None:
        super().__init__()
        if samples_per_class is not None and samples_per_class < 1:
            raise ConfigError(
                f"data.samples_per_class={samples_per_class} must be a positive integer or null"
            )
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive) or null")
        if image_size is not None and image_size < 1:
            raise ConfigError(f"data.image_size={image_size} must be a positive integer or null")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.samples_per_class = samples_per_class
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.random_crop_scale = None if random_crop_scale is None else check_crop_scale(random_crop_scale)
        self.augment = None if augment is None else [augment] if callable(augment) else list(augment)
        self.pin_memory = pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.check_images = check_images
        self._preprocess = _as_preprocess(preprocess)
        self.classes: list[str] = []
        self._sources: dict[str, ImageSource] = {}
        self.train_dataset: SubsetDataset | None = None
        self.val_dataset: SubsetDataset | None = None
        self.test_dataset: SubsetDataset | None = None

    # --- what a subclass provides -------------------------------------------------------------------

    def _load_splits(self) -> Splits:
        """The sources of each split, labels indexing `self.classes`. By default those a subclass put in
        `self._sources` in `__init__`; override to load lazily at setup instead."""
        if "train" not in self._sources:
            raise NotImplementedError(
                f"{type(self).__name__} must fill self._sources or override _load_splits"
            )
        return Splits(self._sources["train"], self._sources.get("val"), self._sources.get("test"))

    def _no_test_split_message(self) -> str:
        return f"{type(self).__name__} has no test split"

    # --- public API ---------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing in effect: the given one, with `image_size` overriding resize and crop."""
        if self.image_size is None:
            return self._preprocess
        return Preprocess(self._preprocess.mean, self._preprocess.std, self.image_size, self.image_size)

    @preprocess.setter
    def preprocess(self, value: Preprocess | Mapping[str, Any] | None) -> None:
        # Lets the caller hand over the preprocessing of weights chosen after this module was built.
        self._preprocess = _as_preprocess(value)
        self._apply_transforms()

    def train_transform(self) -> Callable:
        return train_transform(self.preprocess, self.random_crop_scale, self.augment)

    def predict_transform(self) -> Callable:
        """The eval pipeline, for feeding single images the way validation does."""
        return eval_transform(self.preprocess)

    def setup(self, stage: str | None = None) -> None:
        """Build all split datasets once (later calls, for any stage, are no-ops)."""
        if self.train_dataset is not None:
            return
        splits = self._load_splits()
        if self.check_images:
            self._check_images(splits)
        train_idx, val_source, val_idx = self._train_val_indices(splits)
        if self.samples_per_class is not None:
            train_idx = take_per_class(
                splits.train.labels, train_idx, self.samples_per_class, self._rng(2), self.classes
            )
        self.train_dataset = SubsetDataset(splits.train, train_idx, self.train_transform())
        self.val_dataset = self._eval_dataset(val_source, val_idx)
        self.test_dataset = None if splits.test is None else self._eval_dataset(splits.test)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.train_dataset, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        if self.test_dataset is None:
            raise DataError(self._no_test_split_message())
        return self._loader(self.test_dataset)

    # --- helpers ------------------------------------------------------------------------------------

    def _rng(self, purpose: int) -> np.random.Generator:
        # Independent streams per purpose, so the val split does not move when samples_per_class changes.
        return np.random.default_rng([self.seed, purpose])

    def _train_val_indices(self, splits: Splits) -> tuple[np.ndarray, ImageSource, np.ndarray | None]:
        """Train indices and the val (source, indices): the data's own val split, else a seeded,
        stratified `val_fraction` of train (indices None means the whole source)."""
        all_train = np.arange(len(splits.train))
        if splits.val is not None:
            if self.val_fraction is not None:
                raise ConfigError(
                    f"data.val_fraction={self.val_fraction} is set but the data has its own val split; "
                    "set data.val_fraction=null (or remove the val split to carve it from train)"
                )
            return all_train, splits.val, None
        fraction = self.val_fraction if self.val_fraction is not None else self.default_val_fraction
        train_idx, val_idx = split_per_class(splits.train.labels, all_train, fraction, self._rng(1))
        return train_idx, splits.train, val_idx

    def _eval_dataset(self, source: ImageSource, indices: np.ndarray | None = None) -> SubsetDataset:
        indices = np.arange(len(source)) if indices is None else indices
        return SubsetDataset(source, indices, eval_transform(self.preprocess))

    def _apply_transforms(self) -> None:
        if self.train_dataset is not None:
            self.train_dataset.transform = self.train_transform()
        for dataset in (self.val_dataset, self.test_dataset):
            if dataset is not None:
                dataset.transform = eval_transform(self.preprocess)

    def _check_images(self, splits: Splits) -> None:
        sources = [s for s in (splits.train, splits.val, splits.test) if s is not None]
        bad = [p for s in sources for i in range(len(s)) if (p := s.problem(i)) is not None]
        if bad:
            listing = "\n  ".join(bad)
            raise DataError(f"{len(bad)} unreadable image(s); delete or replace them:\n  {listing}")

    def _loader(
        self, dataset: SubsetDataset | None, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=False,
        )
