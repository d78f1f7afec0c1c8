"""The advisor's subset, decoded once: its passes (the control's BatchNorm statistics, the pretrained
body, the control) read the images from memory instead of decoding and resizing every file three
times, which on small images costs more than the bodies themselves."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

# Above this many bytes of decoded float32 images, each pass streams from the files as before.
MAX_DECODED_BYTES = 1 << 30


class DecodedOnce(Dataset):
    """`dataset`'s `(image, label)` items, decoded with its (deterministic, eval) transform at the
    first item asked for, by a loader with `num_workers` workers, then served from memory.

    It keeps `dataset`'s fingerprint and transform, so feature-cache keys are those of `dataset`,
    and a warm cache never decodes. Read it in the main process (`num_workers=0`): a loader worker
    would decode its own copy.
    """

    def __init__(self, dataset: Any, num_workers: int = 0, batch_size: int = 64) -> None:
        self.dataset, self.num_workers, self.batch_size = dataset, num_workers, batch_size
        self.transform = dataset.transform
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    def fingerprint(self) -> str:
        return self.dataset.fingerprint()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None:
            self._decode()
        assert self._images is not None and self._labels is not None
        return self._images[i], self._labels[i]

    def _decode(self) -> None:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        images, labels = zip(*loader, strict=True)
        self._images, self._labels = torch.cat(images), torch.cat([torch.as_tensor(y) for y in labels])
        log.info("advisor: %d images decoded once for its passes", len(self._images))


def decoded_once(dataset: Any, crop_size: int, num_workers: int) -> tuple[Any, int]:
    """`(dataset, workers)` for the advisor's passes: `DecodedOnce` (read with no workers) when its
    images fit in `MAX_DECODED_BYTES`, else `dataset` itself, streamed by `num_workers` workers."""
    if len(dataset) * 3 * crop_size * crop_size * 4 > MAX_DECODED_BYTES:
        return dataset, num_workers
    return DecodedOnce(dataset, num_workers), 0
