"""Feature rows served from the memory-mapped cache.

`MappedRows` gathers a batch of rows from the mapped arrays (only those pages are read) and, every
`RELEASE_BYTES` of rows read, gives the mapping's resident pages back to the kernel: pages of a file
mapping that were touched stay counted in the process's resident memory until then, so without it a
head-only run's memory would grow to the whole split over an epoch. The file stays in the page cache.

`RowSampler` is `DistributedSampler`'s order, kept as a tensor (8 bytes a row) instead of a list of
Python ints (about 36), so that the order of a large split does not outweigh the batch either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

RELEASE_BYTES = 32 << 20  # rows read between two page releases: the resident memory a reader may hold


class MappedRows(Dataset):
    """Rows of features (one tensor, or one per augmented view: a batch is then (B, V, C)) and labels,
    fetched a batch at a time; `release` gives back the pages read (None: in-memory tensors)."""

    def __init__(
        self,
        views: Sequence[torch.Tensor],
        labels: torch.Tensor,
        release: Sequence[Callable[[], None]] = (),
        stacked: bool = False,
    ) -> None:
        self.views, self.labels, self._release = list(views), labels, list(release)
        self.stacked = stacked or len(self.views) > 1  # rows are (V, C), even for one augmented view
        self._row_bytes = sum(v[0].numel() * v.element_size() for v in self.views) if len(labels) else 0
        self._read = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split, `(features, labels)` (read in full: for small splits, the audit and tests)."""
        features = torch.stack(self.views, dim=1) if self.stacked else self.views[0]
        return features, self.labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = self.__getitems__([i])
        return features[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One gather per batch instead of a `__getitem__` per row and a stack."""
        index = torch.as_tensor(indices)
        rows = [v[index] for v in self.views]
        features = torch.stack(rows, dim=1) if self.stacked else rows[0]
        labels = self.labels[index].long()
        self._read += len(indices) * self._row_bytes
        if self._read >= RELEASE_BYTES:
            self._read = 0
            for release in self._release:
                release()
        return features, labels


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
