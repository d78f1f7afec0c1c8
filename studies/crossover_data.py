"""Data modules for the crossover study: the library's own, with one fixed test set per data set.

`test_per_class` keeps the same images of the official test split in every run (drawn with a fixed
seed, independent of the run's seed), so every (N, seed, case) is scored on one set and the test
pass stays short on 2 cores. A data set without a test split (the ants/bees) is tested on its val
split; that split also selects the best checkpoint, which the study's report says.

Derived tasks (`Grouped`) merge a data set's classes into groups, the same images with new labels:
fresh tasks to validate the advisor on, without a data set the advisor is later judged on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from transfer_cases.data import CIFAR10DataModule, ImageFolderDataModule, MNISTDataModule

TEST_SEED = 12345  # fixed: the test images must not depend on the run's seed


class FixedTest:
    """Mixin: after setup, the test split is a fixed `test_per_class` images per class."""

    def __init__(self, *, test_per_class: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test_per_class = test_per_class

    def setup(self, stage: str | None = None) -> None:
        fresh = self.train_dataset is None
        super().setup(stage)
        if not fresh:
            return
        if self.test_dataset is None:
            self.test_dataset = self.val_dataset
        elif self.test_per_class is not None:
            labels = np.asarray(self.test_dataset.labels)
            generator = np.random.default_rng(TEST_SEED)
            keep = np.sort(
                np.concatenate(
                    [
                        generator.permutation(np.flatnonzero(labels == c))[: self.test_per_class]
                        for c in np.unique(labels)
                    ]
                )
            )
            self.test_dataset.indices = np.asarray(self.test_dataset.indices)[keep]


class Grouped:
    """Mixin: the classes merged into `groups` (name -> original class names), in that order."""

    groups: dict[str, tuple[str, ...]] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.original_classes = list(self.classes)
        self.classes = list(self.groups)

    def _load_splits(self) -> Any:
        splits = super()._load_splits()
        group_of = {name: g for g, (_, names) in enumerate(self.groups.items()) for name in names}
        if set(group_of) != set(self.original_classes):
            raise ValueError(f"groups {self.groups} do not cover the classes {self.original_classes} once")
        mapping = np.array([group_of[name] for name in self.original_classes])
        for source in (splits.train, splits.val, splits.test):
            if source is not None:
                source.labels = mapping[source.labels]
        return splits


class CIFAR10(FixedTest, CIFAR10DataModule):
    """CIFAR-10 with a fixed test subset."""


class MNIST(FixedTest, MNISTDataModule):
    """MNIST with a fixed test subset."""


class ImageFolder(FixedTest, ImageFolderDataModule):
    """An image folder; without a test/ folder its val split is the test set."""


class CIFAR10AnimalsVehicles(Grouped, CIFAR10):
    """CIFAR-10 as two classes: the six animals against the four vehicles."""

    groups = {
        "animal": ("bird", "cat", "deer", "dog", "frog", "horse"),
        "vehicle": ("airplane", "automobile", "ship", "truck"),
    }


class MNISTOddEven(Grouped, MNIST):
    """MNIST as two classes: even digits against odd ones."""

    groups = {"even": ("0", "2", "4", "6", "8"), "odd": ("1", "3", "5", "7", "9")}


class CIFAR10Pairs(Grouped, CIFAR10):
    """CIFAR-10 as five classes, each two of its classes that look alike."""

    groups = {
        "air_or_sea": ("airplane", "ship"),
        "road": ("automobile", "truck"),
        "small_animal": ("bird", "frog"),
        "pet": ("cat", "dog"),
        "hoofed": ("deer", "horse"),
    }


class MNISTPairs(Grouped, MNIST):
    """MNIST as five classes: 0-1, 2-3, 4-5, 6-7, 8-9."""

    groups = {f"{d}{d + 1}": (str(d), str(d + 1)) for d in range(0, 10, 2)}
