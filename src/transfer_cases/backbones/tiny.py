"""A tiny CNN with the same staged shape as the real backbones, so tests run in milliseconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from transfer_cases.backbones.check import check_stages
from transfer_cases.backbones.staged import StagedBody
from transfer_cases.backbones.weights import load_weights_path
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
class TinyCNN:
    """Conv-BN-ReLU stages that each halve the resolution; `weights` is a local file or None."""

    widths: list[int] = field(default_factory=lambda: [8, 16, 32])
    weights: str | None = None
    image_size: int = 64

    def build(self, pretrained: bool = True) -> StagedBody:
        model = _TinyNet(self.widths)
        preprocess = Preprocess(
            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_size=self.image_size, crop_size=self.image_size
        )
        body_state = None
        if pretrained and self.weights:
            preprocess, body_state = load_weights_path(model, "tiny_cnn", self.weights, default=preprocess)
        strides = [2 ** (i + 1) for i in range(len(self.widths))]  # every stage halves the resolution
        body = StagedBody(list(model.features), self.widths, strides, preprocess=preprocess, name="tiny_cnn")
        check_stages(body)
        if body_state is not None:
            body.load_body_state(body_state, str(self.weights))
        return body
