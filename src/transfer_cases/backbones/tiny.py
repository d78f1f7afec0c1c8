"""A tiny CNN with the same staged shape as the real backbones, so tests run in milliseconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from transfer_cases.backbones.builder import CLASSIFIER_PREFIXES, BackboneBuilder
from transfer_cases.backbones.staged import StagedBody
from transfer_cases.training.preprocess import Preprocess


class _TinyNet(nn.Module):
    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        layers, c_in = [], 3
        for c_out in widths:
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                )
            )
            c_in = c_out
        self.features = nn.Sequential(*layers)


@dataclass
class TinyCNN(BackboneBuilder):
    """Conv-BN-ReLU stages that each halve the resolution; `weights` is a local file or None (random)."""

    widths: list[int] = field(default_factory=lambda: [8, 16, 32])
    weights: str | None = None
    image_size: int = 64
    weights_example: ClassVar[str | None] = None  # null weights: random initialisation

    @property
    def arch(self) -> str:
        return "tiny_cnn"

    def is_local(self, weights: str) -> bool:
        return True  # the tiny body has no named weights

    def create(self, named_weights: bool) -> tuple[nn.Module, Preprocess, tuple[str, ...]]:
        size = self.image_size
        preprocess = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_size=size, crop_size=size)
        return _TinyNet(self.widths), preprocess, CLASSIFIER_PREFIXES

    def stage(self, model: nn.Module, preprocess: Preprocess) -> StagedBody:
        strides = [2 ** (i + 1) for i in range(len(self.widths))]  # every stage halves the resolution
        return StagedBody(list(model.features), self.widths, strides, preprocess=preprocess, name=self.arch)
