"""A backbone as an ordered list of stages followed by global pooling.

Every case of the guide is "keep the first k stages, freeze the first n of them": with the body
in this shape the case logic needs no per-architecture code. Stage boundaries and widths are
derived from one dummy forward pass (a stage is a run of blocks at one spatial resolution),
never hard-coded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from transfer_cases.errors import ConfigError, WeightsError
from transfer_cases.preprocess import Preprocess


class StagedBody(nn.Module):
    """`stages` run in order, then global average pooling and `neck` (only when the full body is kept).

    The first `num_frozen` stages are the frozen prefix: they run under `torch.no_grad()` (backward
    stops at the first trainable stage) and stay in eval mode whatever `train()` is called with, so
    their BatchNorm statistics never move.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        widths: Sequence[int],
        *,
        neck: nn.Module | None = None,
        full_depth: int | None = None,
        preprocess: Preprocess | None = None,
        name: str = "body",
    ) -> None:
        super().__init__()
        if len(stages) != len(widths):
            raise ValueError("one width per stage")
        self.stages = nn.ModuleList(stages)
        self.widths = list(widths)
        self.full_depth = full_depth if full_depth is not None else len(stages)
        # The neck (ConvNeXt's LayerNorm after pooling) only fits the last stage's features.
        self.neck = neck if neck is not None and len(stages) == self.full_depth else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.preprocess = preprocess or Preprocess()
        self.name = name
        self.num_frozen = 0

    @classmethod
    def from_blocks(
        cls,
        blocks: Sequence[nn.Module],
        *,
        neck: nn.Module | None = None,
        preprocess: Preprocess | None = None,
        name: str = "body",
        probe_size: int = 64,
    ) -> StagedBody:
        """Group consecutive blocks that keep the same spatial resolution into one stage each."""
        groups: list[list[nn.Module]] = []
        widths: list[int] = []
        x = torch.zeros(1, 3, probe_size, probe_size)
        last_hw: tuple[int, ...] | None = None
        with _eval_no_grad(blocks):
            for block in blocks:
                x = block(x)
                hw = tuple(x.shape[-2:])
                if hw != last_hw:
                    groups.append([])
                    widths.append(0)
                    last_hw = hw
                groups[-1].append(block)
                widths[-1] = int(x.shape[1])
        stages = [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]
        return cls(stages, widths, neck=neck, preprocess=preprocess, name=name)

    def load_body_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a saved body (possibly cut shorter) into the first stages of this one."""
        own = self.state_dict()
        kept = {int(k.split(".")[1]) for k in state if k.startswith("stages.")}
        unexpected = [k for k in state if k not in own]
        wrong = [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        missing = [
            k for k in own if k.startswith("stages.") and int(k.split(".")[1]) in kept and k not in state
        ]
        if unexpected or wrong or missing:
            raise WeightsError(
                f"the body in {source} does not fit {self.name}: "
                f"unexpected {unexpected[:3]}, shape mismatches {wrong[:3]}, missing {missing[:3]}"
            )
        self.load_state_dict(state, strict=False)

    @property
    def depth(self) -> int:
        return len(self.stages)

    @property
    def out_features(self) -> int:
        """Width of the pooled feature vector the head receives."""
        return self.widths[-1]

    def cut(self, keep: int | None) -> StagedBody:
        """Keep the first `keep` stages (None: all; negative: all but the last `-keep`)."""
        if keep is None:
            return self
        n = keep if keep > 0 else self.depth + keep
        if keep == 0 or not 0 < n <= self.depth:
            raise ConfigError(
                f"case.keep={keep} does not fit {self.name}, which has {self.depth} stages "
                f"(widths {self.widths}): use 1..{self.depth}, -1..-{self.depth - 1}, or null for all"
            )
        if n == self.depth:
            return self
        return StagedBody(
            list(self.stages[:n]),
            self.widths[:n],
            neck=None,
            full_depth=self.full_depth,
            preprocess=self.preprocess,
            name=self.name,
        )

    def freeze(self, n: int) -> None:
        """Make the first `n` stages the frozen prefix: no gradients, eval mode for good."""
        if not 0 <= n <= self.depth:
            raise ConfigError(f"cannot freeze {n} stages of a body with {self.depth} stages")
        self.num_frozen = n
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= n)
        if n == self.depth:
            self.neck.requires_grad_(False)
        self.train(self.training)

    @property
    def fully_frozen(self) -> bool:
        return self.num_frozen == self.depth

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the frozen prefix (what must never change)."""
        state = {}
        for i, stage in enumerate(self.stages[: self.num_frozen]):
            state.update({f"stages.{i}.{k}": v for k, v in stage.state_dict(keep_vars=True).items()})
        if self.fully_frozen:
            state.update({f"neck.{k}": v for k, v in self.neck.state_dict(keep_vars=True).items()})
        return state

    def train(self, mode: bool = True) -> StagedBody:
        # Lightning and users call .train() on the whole model around every fit/validate loop;
        # without this override, frozen BatchNorm layers would start updating running statistics.
        super().train(mode)
        for stage in self.stages[: self.num_frozen]:
            stage.eval()
        if self.fully_frozen:
            self.neck.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for stage in self.stages[: self.num_frozen]:
                x = stage(x)
        for stage in self.stages[self.num_frozen :]:
            x = stage(x)
        x = self.pool(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.fully_frozen):
            return self.neck(x).flatten(1)


@contextmanager
def _eval_no_grad(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Probe passes run in eval mode without gradients, so BatchNorm statistics stay untouched."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
