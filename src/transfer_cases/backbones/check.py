"""Check a declared stage layout against the real model with one small input.

Stages are declared, never derived from a forward pass: this pass only confirms the declaration (a
torchvision release that renamed a layer, a timm model whose `feature_info` means something else)
and refuses what the staged body cannot describe, such as channels-last (B, H, W, C) stage outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from transfer_cases.backbones.staged import StagedBody
from transfer_cases.utils.errors import ConfigError

CHECK_SIZE = 64


def check_stages(body: StagedBody, size: int = CHECK_SIZE) -> None:
    """Raise `ConfigError` unless every stage returns (B, width, size/stride, size/stride) maps."""
    size = max(size, *body.strides)
    x = torch.zeros(1, 3, size, size)
    with eval_no_grad(body):
        for i, (stage, width, stride) in enumerate(zip(body.stages, body.widths, body.strides, strict=True)):
            x = stage(x)
            expected = (1, width, size // stride, size // stride)
            if tuple(x.shape) == expected:
                continue
            if x.dim() == 4 and tuple(x.shape) == (1, size // stride, size // stride, width):
                problem = "returns channels-last (B, H, W, C) maps; only (B, C, H, W) stages are supported"
            else:
                problem = f"returns shape {tuple(x.shape)}, declared (B, C, H, W) = {expected}"
            raise ConfigError(
                f"{body.name}: stage {i} (declared width {width}, stride {stride}) {problem} "
                f"for a {size}x{size} input"
            )
        out = body.neck(body.pool(x)).flatten(1)
    if tuple(out.shape) != (1, body.out_features):
        raise ConfigError(
            f"{body.name}: the full body's output has shape {tuple(out.shape)}, "
            f"declared (B, {body.out_features})"
        )


@contextmanager
def eval_no_grad(module: nn.Module) -> Iterator[None]:
    """Check passes run in eval mode without gradients, so BatchNorm statistics stay untouched."""
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
