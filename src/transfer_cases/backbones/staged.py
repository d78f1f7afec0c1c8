"""A backbone as an ordered list of stages followed by pooling.

Every case of the guide is "keep the first k stages, freeze the first n of them": with the body
in this shape the case logic needs no per-architecture code. Which modules form each stage, and
each stage's width and stride, are declared per architecture (`torchvision_zoo.py`, `timm_zoo.py`),
in the spirit of timm's `feature_info`; `check.py` verifies a declaration with one small input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from transfer_cases.training.preprocess import Preprocess
from transfer_cases.utils.errors import ConfigError, WeightsError


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) → (B, C): the pooling of every cut body and of full bodies without their own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class StagedBody(nn.Module):
    """`stages` run in order; then `pool` and `neck` turn the last map into the feature vector.

    The full body ends as its architecture does before the classifier: `pool` may be the model's own
    pre-logits head (a timm model's `forward_head(x, pre_logits=True)`) and `neck` its pretrained
    layers after pooling (ConvNeXt's LayerNorm, MobileNetV3's Linear + Hardswish). A cut body ends
    in global average pooling: those layers only fit the last stage's features.

    The first `num_frozen` stages are the frozen prefix: they run under `torch.no_grad()` (backward
    stops at the first trainable stage) and stay in eval mode whatever `train()` is called with, so
    their BatchNorm statistics never move. `pool` and `neck` are frozen with the last stage.

    Args:
        stages: the stage modules, in forward order.
        widths: channels of each stage's output (timm's `num_chs`).
        strides: each stage's output stride relative to the input (timm's `reduction`).
        pool: the full body's map → vector pooling (default: global average pooling).
        neck: the full body's pretrained layers on the pooled vector.
        full_features: width of the full body's output when `neck`/`pool` change it.
        full_depth: stage count of the uncut body (set by `cut`).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        widths: Sequence[int],
        strides: Sequence[int],
        *,
        pool: nn.Module | None = None,
        neck: nn.Module | None = None,
        full_features: int | None = None,
        full_depth: int | None = None,
        preprocess: Preprocess | None = None,
        name: str = "body",
    ) -> None:
        super().__init__()
        if not len(stages) == len(widths) == len(strides):
            raise ValueError("one width and one stride per stage")
        self.stages = nn.ModuleList(stages)
        self.widths = [int(w) for w in widths]
        self.strides = [int(s) for s in strides]
        self.full_depth = full_depth if full_depth is not None else len(stages)
        full = len(stages) == self.full_depth
        self.pool = pool if pool is not None and full else GlobalAvgPool()
        self.neck = neck if neck is not None and full else nn.Identity()
        self._out_features = full_features if full and full_features else self.widths[-1]
        self.preprocess = preprocess or Preprocess()
        self.name = name
        self.num_frozen = 0
        self.bn_eval = False  # see set_bn_eval
        # (source, stages it held) when a saved body was loaded: `cut` refuses to keep more.
        self.loaded_from: tuple[str, int] | None = None

    # -- shape ----------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.stages)

    @property
    def out_features(self) -> int:
        """Width of the feature vector the head receives."""
        return self._out_features

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm-style description of the kept stages; `module` names the stage in this body."""
        return [
            {"num_chs": w, "reduction": s, "module": f"stages.{i}"}
            for i, (w, s) in enumerate(zip(self.widths, self.strides, strict=True))
        ]

    # -- weights --------------------------------------------------------------------------------
    def load_body_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a saved body (possibly cut shorter) into the first stages of this one.

        A body cut to k stages leaves the later ones random: `cut` then refuses to keep them.
        """
        own = self.state_dict()
        held = len({int(k.split(".")[1]) for k in state if k.startswith("stages.")})
        # The pool's and neck's keys belong to the full body: expected only with all of its stages.
        covered = [
            k for k in own if 0 <= _stage_index(k) < held or (_stage_index(k) < 0 and held == self.depth)
        ]
        unexpected = [k for k in state if k not in own]
        wrong = [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        missing = [k for k in covered if k not in state]
        if unexpected or wrong or missing:
            raise WeightsError(
                f"the body in {source} does not fit {self.name}: "
                f"unexpected {unexpected[:3]}, shape mismatches {wrong[:3]}, missing {missing[:3]}"
            )
        self.load_state_dict(state, strict=False)
        self.loaded_from = (source, held)

    # -- the cases ------------------------------------------------------------------------------
    def cut(self, keep: int | None) -> StagedBody:
        """Keep the first `keep` stages (None: all; negative: all but the last `-keep`)."""
        n = self.depth if keep is None else keep if keep > 0 else self.depth + keep
        if keep == 0 or not 0 < n <= self.depth:
            raise ConfigError(
                f"case.keep={keep} does not fit {self.name}, which has {self.depth} stages "
                f"(widths {self.widths}): use 1..{self.depth}, -1..-{self.depth - 1}, or null for all"
            )
        if self.loaded_from is not None and self.loaded_from[1] < n:
            source, held = self.loaded_from
            raise WeightsError(
                f"backbone.weights={source} holds a body cut to {held} of {self.full_depth} stages, "
                f"but this case keeps {n} (case.keep={'null' if keep is None else keep}): stages "
                f"{held + 1}..{n} would stay randomly initialised. Cut the same way "
                f"(case.keep={held}) or use a checkpoint or weights file with the full body."
            )
        if n == self.depth:
            return self
        body = StagedBody(
            list(self.stages[:n]),
            self.widths[:n],
            self.strides[:n],
            full_depth=self.full_depth,
            preprocess=self.preprocess,
            name=self.name,
        )
        body.loaded_from = self.loaded_from
        return body

    def freeze(self, n: int) -> None:
        """Make the first `n` stages the frozen prefix: no gradients, eval mode for good."""
        if not 0 <= n <= self.depth:
            raise ConfigError(f"cannot freeze {n} stages of a body with {self.depth} stages")
        self.num_frozen = n
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= n)
        self.pool.requires_grad_(n < self.depth)
        self.neck.requires_grad_(n < self.depth)
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
            for name in ("pool", "neck"):
                part = getattr(self, name).state_dict(keep_vars=True)
                state.update({f"{name}.{k}": v for k, v in part.items()})
        return state

    def train(self, mode: bool = True) -> StagedBody:
        # Lightning and users call .train() on the whole model around every fit/validate loop;
        # without this override, frozen BatchNorm layers would start updating running statistics.
        # The frozen parts stay in eval mode whatever `mode` is.
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = self.stages.training = mode
        frozen = [*self.stages[: self.num_frozen], *((self.pool, self.neck) if self.fully_frozen else ())]
        for part in frozen:
            part.train(False)
        trainable = [*self.stages[self.num_frozen :], *(() if self.fully_frozen else (self.pool, self.neck))]
        for part in trainable:
            part.train(mode)
        if mode and self.bn_eval:
            # Trainable BatchNorm layers normalise with the pretrained running statistics (and keep
            # them); their affine weights still train.
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def set_bn_eval(self, on: bool) -> None:
        """`bn_mode: eval` of a case: every BatchNorm layer of the body stays in eval mode."""
        self.bn_eval = on
        self.train(self.training)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, every_stage=False)[-1]

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """In one pass, the pooled (B, C_i) features after every kept stage; the last is `self(x)`."""
        return self._run(x, every_stage=True)

    def _run(self, x: torch.Tensor, every_stage: bool) -> list[torch.Tensor]:
        grad = torch.is_grad_enabled()
        features = []
        for i, stage in enumerate(self.stages):
            with torch.set_grad_enabled(grad and i >= self.num_frozen):
                x = stage(x)
                if every_stage and i < self.depth - 1:
                    features.append(F.adaptive_avg_pool2d(x, 1).flatten(1))
        with torch.set_grad_enabled(grad and not self.fully_frozen):
            features.append(self.neck(self.pool(x)).flatten(1))
        return features


def _stage_index(key: str) -> int:
    """`stages.3.0.weight` → 3; keys of the pool and neck → -1."""
    return int(key.split(".")[1]) if key.startswith("stages.") else -1
