"""Features of one data set through one body: loaded from the store, or extracted once and stored.

The cache key holds everything that changes the features: the body's structure and every weight and
buffer (so the architecture, the cut and the weights file), the data (file paths, sizes, modification
times or, with `stamp="content"`, content hashes, and the chosen subset), the transform
(preprocessing, image size, augmentation settings), the augmented view and its seed, and the
numerics of the extraction pass, which name its engine (`onnxruntime_fp32`, or torch's settings).

A body that onnxruntime cannot run (it does not export, an operator is missing, its output differs)
is extracted by torch in the pass's fallback numerics, under their own key, with one warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer_cases.data.sources import stamping
from transfer_cases.data.splits import Stream
from transfer_cases.features.extract import Extraction, extract
from transfer_cases.features.onnx_body import BackendUnavailable
from transfer_cases.features.store import FeatureSet, FeatureStore
from transfer_cases.utils.digest import tensor_digest

log = logging.getLogger(__name__)
MODELS_DIR = "onnx"  # exported bodies, in the feature store's folder
_warned: set[str] = set()  # bodies whose fallback was already logged by this process

# Bumped when the meaning of a stored file changes, so older files are never read as current ones.
FEATURES_VERSION = 2  # 2: stored in float32 (float16 flushed a random body's small activations to zero)
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
    label: str = "features",
    stamp: str = "mtime",
) -> tuple[FeatureSet, bool, Path]:
    """`(features, hit, path)` of `dataset` (an image dataset with `fingerprint()` and `transform`).

    `view` None means the dataset's images as its transform gives them once; an integer is augmented
    view number `view`, whose random crops come from their own stream seeded by (`seed`, `view`), so a
    view is the same file run after run. `stamp` is how the data's files are identified
    (`data.sources.STAMPS`): "content" hashes every byte, "mtime" trusts size and modification time.
    """
    with stamping(stamp):
        data = dataset.fingerprint()
    fingerprint = body_fingerprint(body)

    def build() -> FeatureSet:  # with the numerics of the loop's current try
        # The transforms draw from this stream (in the workers, or here when there are none), without
        # moving the global RNG that training uses next.
        stream = int(np.random.SeedSequence([seed, int(Stream.AUGMENT_VIEW), view or 0]).generate_state(1)[0])
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(stream),
            pin_memory=device.type == "cuda",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream)
            desc = f"{label} ({numerics.name})"
            f, y = extract(
                body,
                loader,
                device,
                numerics,
                desc=desc,
                total=len(dataset),
                models_dir=store.root / MODELS_DIR,
                fingerprint=fingerprint,
            )
        return FeatureSet(f.to(STORED_DTYPE), y)

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
            fs, hit, path = store.get_or_build(parts, build)
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
