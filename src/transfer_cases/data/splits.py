"""Which images go where: labelling class listings, the seeded train/val split and per-class subsampling.

Every random choice draws from its own named stream of `data.seed` (`Stream`), so changing one
setting cannot move another choice: the val split is the same whatever `samples_per_class` is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar

import numpy as np
import torch

from transfer_cases.data._log import RankZeroLogger
from transfer_cases.data.sources import ImageSource
from transfer_cases.utils.errors import DataError

log = RankZeroLogger(__name__)
Item = TypeVar("Item")


class Stream(IntEnum):
    """The independent random streams drawn from one seed. The numbers are part of every result:
    changing one changes the split (or order) that a given seed produces."""

    SHUFFLE = 0  # order of the train batches (a torch generator seeded with the seed itself)
    VAL_SPLIT = 1  # which train images are held out for val, when the data has no val split
    SUBSAMPLE = 2  # which train images `samples_per_class` keeps
    AUGMENT_VIEW = 3  # the random crops of a cached augmented view (with the view number)
    ADVISOR_SUBSET = 4  # which train images the advisor looks at
    RANDOM_CONTROL = 5  # the random initialisation of the advisor's control network


def rng(seed: int, stream: Stream) -> np.random.Generator:
    """The numpy generator of one stream."""
    return np.random.default_rng([seed, int(stream)])


def torch_generator(seed: int, stream: Stream) -> torch.Generator:
    """The torch generator of one stream (torch takes a single integer: stream 0 is the seed as is)."""
    return torch.Generator().manual_seed(seed + (int(stream) << 32))


@dataclass
class Splits:
    """The sources a data module provides; `val` None means "split it off train with `val_fraction`"."""

    train: ImageSource
    val: ImageSource | None = None
    test: ImageSource | None = None


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
    so that label i means the same class in every split. A class the split lacks is allowed (the
    data module reports it); a class train lacks is an error."""
    index = {name: i for i, name in enumerate(classes)}
    extra = sorted(set(listing) - set(index))
    if extra:
        raise DataError(
            f"the {split} split has class '{extra[0]}' ({where}/{extra[0]}) that the train split lacks "
            f"(train classes: {', '.join(classes)}); add it to train or remove it from {split}"
        )
    items: list[Item] = []
    labels: list[int] = []
    for name in sorted(listing, key=index.__getitem__):
        items.extend(listing[name])
        labels.extend([index[name]] * len(listing[name]))
    return items, labels


def build_splits(
    listings: Mapping[str, Mapping[str, Sequence[Item]]],
    where: Mapping[str, str],
    factory: Callable[[list[Item], list[int]], ImageSource],
) -> tuple[list[str], Splits]:
    """Classes (from train) and one source per split from `{split: {class: items}}` listings
    (splits: train, val, test). A split with no class at all is dropped with a warning."""
    classes = class_names(listings["train"], where["train"])
    sources = {}
    for split, listing in listings.items():
        if not listing:
            log.warning("ignoring the %s split: %s has no class folders", split, where[split])
            continue
        items, labels = label_items(listing, classes, split, where[split])
        sources[split] = factory(items, labels)
    return classes, Splits(**sources)


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
