"""Features of one data set through one body: loaded from the store, or extracted once and stored.

The cache key holds everything that changes the features: the body's structure and every weight and
buffer (so the architecture, the cut and the weights file), the data (file paths, sizes, modification
times or, with `stamp="content"`, content hashes, and the chosen subset), the transform
(preprocessing, image size, augmentation settings), the augmented view and its seed, and the
numerics of the extraction pass, which name its engine (`onnxruntime_fp32`, or torch's settings).

A body that onnxruntime cannot run (it does not export, an operator is missing, its output differs)
is extracted by torch in the pass's fallback numerics, under their own key, with one warning.

Under DDP every rank calls this at the same point (the data module's setup): each extracts its shards
of the split and all read the whole set (`FeatureStore.get_or_build_rows`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transfer_cases.data.sources import stamping
from transfer_cases.data.splits import Stream
from transfer_cases.features.extract import Extraction, extract_batches
from transfer_cases.features.onnx_body import BackendUnavailable
from transfer_cases.features.shards import Shard
from transfer_cases.features.store import FeatureSet, FeatureStore
from transfer_cases.utils.digest import tensor_digest

log = logging.getLogger(__name__)
MODELS_DIR = "onnx"  # exported bodies, in the feature store's folder
_warned: set[str] = set()  # bodies whose fallback was already logged by this process

# Bumped when the meaning of a stored file changes, so older files are never read as current ones.
# 2: stored in float32 (float16 flushed a random body's small activations to zero). 3: memory-mapped
# shards; an augmented view's crops are seeded per image (the same on any rank), not by the pass.
FEATURES_VERSION = 3
# The values the pass computed, kept: float16 has neither the range (a randomly initialised body's deep
# activations are far below its smallest normal number) nor the precision the probes and heads need.
STORED_DTYPE = torch.float32


def body_fingerprint(body: nn.Module) -> str:
    """Structure and every weight and buffer: a different cut, architecture or weights file differs."""
    return tensor_digest([(f"repr:{body!r}", torch.empty(0)), *body.state_dict().items()])


def cached_features(
    store: FeatureStore,
    body: nn.Module,
    dataset: Any,
    *,
    device: torch.device,
    numerics: Extraction,
    batch_size: int = 64,
    num_workers: int = 0,
    view: int | None = None,
    seed: int = 0,
    label: str = "extracting features",
    stamp: str = "mtime",
) -> tuple[FeatureSet, bool, Path | None]:
    """`(features, hit, path)` of `dataset` (an image dataset with `fingerprint()` and `transform`).

    `view` None means the dataset's images as its transform gives them once; an integer is augmented
    view number `view`, each image's random crop seeded by (`seed`, `view`, its index), so a view is
    the same file run after run, whichever rank extracts which image. `stamp` is how the data's files
    are identified (`data.sources.STAMPS`): "content" hashes every byte, "mtime" trusts size and
    modification time.
    """
    with stamping(stamp):
        data = dataset.fingerprint()
    fingerprint = body_fingerprint(body)

    # Each image's random crop comes from its own stream, seeded by (seed, view, index): the same
    # whichever rank extracts it, in whichever batch, with any number of loader workers.
    stream = int(np.random.SeedSequence([seed, int(Stream.AUGMENT_VIEW), view or 0]).generate_state(1)[0])
    items = SeededItems(dataset, stream)

    def build(shards: list[Shard]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `shards`, with the numerics of the loop's current try."""
        loader = DataLoader(
            items,
            batch_sampler=[
                list(range(b, min(b + batch_size, s.stop)))
                for s in shards
                for b in range(s.start, s.stop, batch_size)
            ],
            num_workers=num_workers,
            pin_memory=device.type == "cuda",  # so the copies to the GPU can be non-blocking
        )
        yield from extract_batches(
            body,
            loader,
            device,
            numerics,
            desc=f"{label} ({numerics.name})",
            total=sum(s.stop - s.start for s in shards),
            models_dir=store.root / MODELS_DIR,
            fingerprint=fingerprint,
        )

    while True:
        parts = {
            "version": FEATURES_VERSION,
            "body": fingerprint,
            "extraction": numerics.name,
            "stored_dtype": str(STORED_DTYPE),
            "data": data,
            "transform": repr(dataset.transform),
            "view": view,
            "seed": None if view is None else seed,
        }
        try:
            fs, hit, path = store.get_or_build_rows(parts, len(dataset), batch_size, build, label)
            break
        except BackendUnavailable as e:
            if numerics.fallback is None:
                raise
            if fingerprint not in _warned:
                _warned.add(fingerprint)
                log.warning(
                    "%s backend: %s; extracting with torch (%s)", numerics.backend, e, numerics.fallback.name
                )
            numerics = numerics.fallback  # its own key: the torch pass is stored under its own numerics
    log.info("feature cache %s for %s: %s", "hit" if hit else "built", label, path or "(not stored)")
    fs.extraction = numerics.name
    return fs, hit, path


class SeededItems(Dataset):
    """`dataset[i]` with torch's random generator seeded by (`stream`, i) for its transform, and left
    as it was afterwards (in this process or in a loader worker)."""

    def __init__(self, dataset: Any, stream: int) -> None:
        self.dataset, self.stream = dataset, stream

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: `torch.manual_seed` also queues a seed for every lazily
            # initialised accelerator, recording a stack trace each time, per image.
            torch.default_generator.manual_seed(
                int(np.random.SeedSequence([self.stream, i]).generate_state(1)[0])
            )
            return self.dataset[i]
