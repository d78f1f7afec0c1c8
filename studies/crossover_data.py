"""Data modules for the crossover study: the library's own, with one fixed test set per data set.

`test_per_class` keeps the same images of the official test split in every run (drawn with a fixed
seed, independent of the run's seed), so every (N, seed, case) is scored on one set and the test
pass stays short on 2 cores. A data set without a test split (the ants/bees) is tested on its val
split; that split also selects the best checkpoint, which the study's report says.
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


class CIFAR10(FixedTest, CIFAR10DataModule):
    """CIFAR-10 with a fixed test subset."""


class MNIST(FixedTest, MNISTDataModule):
    """MNIST with a fixed test subset."""


class ImageFolder(FixedTest, ImageFolderDataModule):
    """An image folder; without a test/ folder its val split is the test set."""
