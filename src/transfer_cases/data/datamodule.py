"""`ClassificationDataModule`: the dataloaders, splits, transforms and checks every data module shares.

How to add your own data source:
1. Images as files? Use `FileSource(paths, labels)`. Otherwise subclass `ImageSource` (sources.py):
   `load(i)` returns an RGB PIL image, `fingerprint()` a cheap digest of what the images are.
2. Subclass `ClassificationDataModule`. In `__init__`, call `super().__init__(**kwargs)` and set
   `self.classes` (names in label order): the model is sized from it before the Trainer runs.
3. Implement `_load_splits() -> Splits(train, val=None, test=None)`. It is called once, at setup:
   read large arrays there, not in `__init__`. Without a val source, a seeded, stratified
   `val_fraction` of train is held out; labels index `self.classes` in every split.
4. Add `configs/data/<name>.yaml` with `_target_: <your class>` and select it with `data=<name>`.
Examples: `MNISTDataModule` (arrays read at setup), `ImageFolderDataModule` (folders scanned in `__init__`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from transfer_cases.data._log import RankZeroLogger
from transfer_cases.data.sources import ImageSource, SubsetDataset
from transfer_cases.data.splits import Splits, Stream, rng, split_per_class, take_per_class, torch_generator
from transfer_cases.data.transforms import check_crop_scale, eval_transform, train_transform
from transfer_cases.training.preprocess import Preprocess
from transfer_cases.utils.errors import ConfigError, DataError
from transfer_cases.utils.validate import whole

log = RankZeroLogger(__name__)


def _as_preprocess(value: Preprocess | Mapping[str, Any] | None) -> Preprocess:
    if value is None:
        return Preprocess()
    if isinstance(value, Preprocess):
        return value
    if isinstance(value, Mapping):
        return Preprocess.from_dict(dict(value))
    raise ConfigError(f"data.preprocess must be a mapping of mean/std/resize_size/crop_size, got {value!r}")


def _check_int(name: str, value: Any, minimum: int, what: str, example: str, nullable: bool = False) -> None:
    """Refuse a setting that is not a whole number >= minimum (booleans and strings included)."""
    if isinstance(value, np.integer):
        value = int(value)
    whole(minimum, example=int(example), optional=nullable, why=what)(value, f"data.{name}")


class ClassificationDataModule(L.LightningDataModule):
    """Train/val/test dataloaders for image classification with transfer-learning conveniences.

    Args:
        batch_size: samples per batch and per device (per process, Lightning's convention): under DDP
            on N devices one optimizer step sees N x batch_size images.
        num_workers: dataloader worker processes per device.
        seed: drives the train/val split, the subsampling and the train shuffling order (`Stream`).
        samples_per_class: keep exactly this many train images per class (the small-data regime);
            the val split is drawn first, so it does not depend on this value.
        val_fraction: share of train held out for validation when the data has no val split of its own
            (None: the subclass default `default_val_fraction`); ignored when it has one.
        preprocess: resize/crop/normalisation of the pretrained weights (`Preprocess` or a dict).
        image_size: if set, resize and crop to this size instead (for small images such as MNIST).
        random_crop_scale: area range of the train RandomResizedCrop; None: the eval resize + crop.
        augment: extra v2 transforms applied to train images after the crop (None: horizontal flip).
        pin_memory, persistent_workers: passed to the DataLoader (persistent: default num_workers > 0).
        check_images: at setup, check every image without decoding it, report all unreadable files at
            once and say how many are smaller than the crop.
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
        _check_int("batch_size", batch_size, 1, "images per batch and per device", "32")
        _check_int("num_workers", num_workers, 0, "loader processes per device; 0 loads in the main one", "2")
        _check_int("samples_per_class", samples_per_class, 1, "train images per class", "20", nullable=True)
        _check_int("image_size", image_size, 1, "pixels; null keeps the weights' size", "64", nullable=True)
        if val_fraction is not None and (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, int | float)
            or not 0 < val_fraction < 1
        ):
            raise ConfigError(
                f"data.val_fraction={val_fraction!r} must be between 0 and 1 (exclusive) or null; "
                "e.g. data.val_fraction=0.2"
            )
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
        self.train_dataset: SubsetDataset | None = None
        self.val_dataset: SubsetDataset | None = None
        self.test_dataset: SubsetDataset | None = None

    # --- what a subclass provides -------------------------------------------------------------------

    def _load_splits(self) -> Splits:
        """The sources of each split, labels indexing `self.classes`; called once, at setup."""
        raise NotImplementedError(f"{type(self).__name__} must implement _load_splits() -> Splits")

    def no_test_split_message(self) -> str:
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
        if stage == "fit" and self.trainer is not None:
            self._log_global_batch_size()
        if self.train_dataset is not None:
            return
        splits = self._load_splits()
        if self.check_images:
            self._check_images(splits)
        train_idx, val_source, val_idx = self._train_val_indices(splits)
        if self.samples_per_class is not None:
            k, subsample = self.samples_per_class, rng(self.seed, Stream.SUBSAMPLE)
            train_idx = take_per_class(splits.train.labels, train_idx, k, subsample, self.classes)
        self.train_dataset = SubsetDataset(splits.train, train_idx, self.train_transform())
        self.val_dataset = self._eval_dataset(val_source, val_idx)
        self.test_dataset = None if splits.test is None else self._eval_dataset(splits.test)
        self._log_missing_classes()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        if self.test_dataset is None:
            raise DataError(self.no_test_split_message())
        return self._loader(self.test_dataset)

    # --- helpers ------------------------------------------------------------------------------------

    def _train_val_indices(self, splits: Splits) -> tuple[np.ndarray, ImageSource, np.ndarray | None]:
        """Train indices and the val (source, indices): the data's own val split, else a seeded,
        stratified `val_fraction` of train (indices None means the whole source)."""
        all_train = np.arange(len(splits.train))
        if splits.val is not None:
            return all_train, splits.val, None
        fraction = self.val_fraction if self.val_fraction is not None else self.default_val_fraction
        val_rng = rng(self.seed, Stream.VAL_SPLIT)
        train_idx, val_idx = split_per_class(splits.train.labels, all_train, fraction, val_rng)
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
        bad: list[str] = []
        sizes: list[tuple[int, int]] = []
        for source in sources:
            for i in range(len(source)):
                try:
                    size = source.inspect(i)
                except DataError as err:
                    bad.append(str(err))
                    continue
                if size is not None:
                    sizes.append(size)
        if bad:
            listing = "\n  ".join(bad)
            raise DataError(f"{len(bad)} unreadable image(s); delete or replace them:\n  {listing}")
        crop = self.preprocess.crop_size
        small = [size for size in sizes if min(size) < crop]
        if small:
            w, h = min(small, key=min)
            log.info(
                "%d image(s) smaller than %d px will be upscaled (smallest %dx%d)", len(small), crop, w, h
            )

    def _log_missing_classes(self) -> None:
        for split, dataset in (("val", self.val_dataset), ("test", self.test_dataset)):
            if dataset is not None:
                present = set(np.unique(dataset.labels).tolist())
                missing = [name for i, name in enumerate(self.classes) if i not in present]
                if missing:
                    log.warning(
                        "the %s split has no images of class %s; its %s scores for it are undefined",
                        split, ", ".join(missing), split,
                    )  # fmt: skip

    def _log_global_batch_size(self) -> None:
        world = int(getattr(self.trainer, "world_size", 1))
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1))
        steps = f" x {accumulate} accumulated batches" if accumulate > 1 else ""
        log.info(
            "global batch size %d: data.batch_size=%d per device x %d device(s)%s",
            self.batch_size * world * accumulate, self.batch_size, world, steps,
        )  # fmt: skip

    def _loader(self, dataset: SubsetDataset | None, shuffle: bool = False) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch_generator(self.seed, Stream.SHUFFLE) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=False,
        )
