"""The advisor's random control: the body that training from scratch would start from.

A randomly initialised body in eval mode normalises with its initial BatchNorm statistics (mean 0,
variance 1), which fit no real activations: they shrink or grow stage after stage (MobileNetV2's
last stage came out near 1e-8), and a probe on them measures the arithmetic, not the features.
So the control gets what the pretrained weights got: BatchNorm statistics estimated on images,
here at most `CALIBRATION_IMAGES` of the advisor's subset of the user's training images, spread
evenly over it: a channel's mean and variance pool every spatial position of every image, so a few
hundred images pin them down, and the calibration stays a small part of the advisor's cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from transfer_cases.features.cached import body_fingerprint
from transfer_cases.features.extract import Extraction
from transfer_cases.features.store import FeatureSet, FeatureStore

BATCH_SIZE = 64
CALIBRATION_IMAGES = 256
# Bumped when the meaning of the stored statistics changes (2: at most CALIBRATION_IMAGES images).
STATS_VERSION = 2


def estimate_batchnorm_statistics(
    module: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | None = None
) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance on `batches`; returns the
    number of batches seen.

    The statistics are reset, then accumulated as a cumulative average over the batches
    (`momentum=None`), with only the BatchNorm layers in train mode (dropout stays off) and no
    gradients: no parameter changes. Each layer's mode and momentum are restored afterwards.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.training, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for x in batches:
                module(x if device is None else x.to(device))
                seen += 1
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum
    return seen


def batchnorm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm statistics of `module`, in module order."""
    return [
        b
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
        if b is not None
    ]


def calibrated_control(
    control: nn.Module,
    dataset: Any,
    store: FeatureStore,
    *,
    device: torch.device,
    numerics: Extraction,
    num_workers: int = 0,
) -> tuple[int, bool]:
    """Estimate the BatchNorm statistics of the randomly initialised `control` on `dataset` (images
    through the eval transform; at most `CALIBRATION_IMAGES` of them, evenly spaced), in place, with
    the numerics of the feature extraction that follows (the statistics are kept in float32
    whatever the autocast dtype); `(images seen, cache hit)`.

    The statistics are stored in the feature store, keyed by the initial weights, the images and
    their transform, so asking again skips the pass (the control's features are cached by its
    weights and buffers, which now include these statistics).
    """
    # Evenly spaced: a subset listed class by class still gives every class its share.
    chosen = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), CALIBRATION_IMAGES)).round())
    parts = {
        "kind": "advisor random control: BatchNorm statistics",
        "version": STATS_VERSION,
        "body": body_fingerprint(control),
        "data": dataset.fingerprint(),
        "transform": repr(dataset.transform),
        "batch_size": BATCH_SIZE,
        "numerics": numerics.name,
        "images": len(chosen),
    }
    buffers = batchnorm_buffers(control)

    def build() -> FeatureSet:
        images = Subset(dataset, chosen.astype(int).tolist())
        loader = DataLoader(images, batch_size=BATCH_SIZE, shuffle=False, num_workers=num_workers)
        layout = torch.channels_last if numerics.channels_last else torch.contiguous_format
        control.to(device, memory_format=layout)
        batches = (x.to(device, memory_format=layout) for x, _ in loader)
        with torch.autocast(device.type, dtype=numerics.autocast, enabled=numerics.autocast is not None):
            estimate_batchnorm_statistics(control, batches)
        control.to("cpu", memory_format=torch.contiguous_format)
        flat = torch.cat([b.detach().double().flatten() for b in buffers])
        return FeatureSet(flat[None], torch.zeros(1, dtype=torch.long))

    stored, hit, _ = store.get_or_build(parts, build)
    if hit:
        flat, offset = stored.features[0], 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b).to(b.dtype))
            offset += b.numel()
    return len(chosen), hit
