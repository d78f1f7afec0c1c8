"""Feature rows served from the cache on disk, a batch at a time, and the order a rank reads them in.

`MappedRows` fetches a batch of rows by index (`FeatureSet.rows`: positional reads of the cache file,
so only the batch becomes resident, however large the split); whole-split readers (the audit, tests)
get the memory-mapped tensors through `tensors`. Features held in memory (a cache that could not be
written) are indexed directly.

`RowSampler` is `DistributedSampler`'s order, kept as a tensor (8 bytes a row) instead of a list of
Python ints (about 36), so that the order of a large split does not outweigh the batch either.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

from transfer_cases.features.store import FeatureSet


class MappedRows(Dataset):
    """The rows of one split: one feature set, or one per augmented view (`stacked`: a batch is then
    (B, V, C), even for one view), with the first set's labels."""

    def __init__(self, sets: Sequence[FeatureSet], stacked: bool = False) -> None:
        self.sets, self.labels = list(sets), sets[0].labels
        self.stacked = stacked or len(self.sets) > 1

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split, `(features, labels)` (mapped: read in full only by whole-split readers)."""
        views = [s.features for s in self.sets]
        return (torch.stack(views, dim=1) if self.stacked else views[0]), self.labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = self.__getitems__([i])
        return features[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One read per batch instead of a `__getitem__` per row and a stack."""
        index = torch.as_tensor(indices)
        rows = [s.features[index] if s.rows is None else s.rows[index] for s in self.sets]
        features = torch.stack(rows, dim=1) if self.stacked else rows[0]
        return features, self.labels[index].long()


class RowSampler(DistributedSampler):
    """`DistributedSampler(shuffle=True)`'s indices for this rank (the permutation of `seed` + epoch,
    padded to a multiple of the ranks, rank r taking positions r, r + W, ...), yielded from a tensor."""

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.total_size > n:  # as DistributedSampler pads: every rank takes as many steps
            order = order.repeat(math.ceil(self.total_size / n))[: self.total_size]
        for chunk in order[self.rank : self.total_size : self.num_replicas].split(1 << 16):
            yield from chunk.tolist()
