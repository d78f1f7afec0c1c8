"""The batch a feature loader yields, typed so the module never guesses images from features by shape."""

from __future__ import annotations

from typing import NamedTuple

import torch


class FeatureBatch(NamedTuple):
    """A frozen body's pooled features `(N, C)`, or `(N, V, C)` for V augmented views, with labels.

    A NamedTuple survives Lightning's device transfer (`apply_to_collection` rebuilds it), so the
    type reaches `training_step` and chooses the head-only path explicitly."""

    features: torch.Tensor
    labels: torch.Tensor
