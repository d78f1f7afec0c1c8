"""The new, randomly initialised classification head that every case puts on the body."""

from __future__ import annotations

from torch import nn


def make_head(
    in_features: int, num_classes: int, kind: str = "linear", hidden: int = 256, dropout: float = 0.0
) -> nn.Module:
    """A `linear` layer or a small `mlp` (Linear-ReLU-Dropout-Linear) from pooled features to logits."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    drop = [nn.Dropout(dropout)] if dropout > 0 else []
    if kind == "linear":
        return nn.Sequential(*drop, nn.Linear(in_features, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), *drop, nn.Linear(hidden, num_classes)
        )
    raise ValueError(f"model.head.kind must be 'linear' or 'mlp', got {kind!r}")
