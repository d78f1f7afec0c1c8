"""The transfer-learning cases as data: where to cut the body, what to freeze, how to initialise,
and how to train it.

A case is a few numbers-or-words, so a fifth case is a few lines of YAML in `configs/case/`.
Applying a case is plain PyTorch on a `StagedBody`; nothing here knows any architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from transfer_cases.backbones.staged import StagedBody
from transfer_cases.utils.errors import ConfigError

# The four cases of the 2x2 (configs/case/<name>.yaml; `auto` asks the advisor for one of them).
CASES = ("small_similar", "small_different", "large_similar", "large_different")
CASE_FIELDS = ("name", "init", "keep", "freeze", "body_lr_scale", "epochs", "probe_epochs", "bn_mode")


@dataclass(frozen=True)
class Case:
    """
    Args:
        name: label used in logs and reports.
        init: `pretrained` (load the backbone's weights) or `scratch` (random initialisation).
        keep: stages of the body to keep: None for all, k > 0 for the first k, -k to drop the last k.
        freeze: kept stages to freeze: `all`, `none`, or n for the first n.
        body_lr_scale: learning rate of trainable body stages relative to the head's.
        epochs: training epochs of the case (`trainer.max_epochs` follows it unless set).
        probe_epochs: LP-FT (Kumar et al. 2022): epochs of head-only training on the frozen body
            (cached features, seconds) before the body is fine-tuned; 0 fine-tunes at once.
        bn_mode: BatchNorm layers of trainable stages: `train` (batch statistics, running statistics
            updated) or `eval` (the pretrained running statistics, fixed; the affine weights train).
    """

    name: str
    init: Literal["pretrained", "scratch"] = "pretrained"
    keep: int | None = None
    freeze: int | Literal["all", "none"] = "none"
    body_lr_scale: float = 1.0
    epochs: int = 5
    probe_epochs: int = 0
    bn_mode: Literal["train", "eval"] = "train"

    def __post_init__(self) -> None:
        # First: the auto case's fields are null until the advisor fills them in, so any other check
        # would blame a field (body_lr_scale=None) instead of the missing advisor step.
        if self.name == "auto":
            raise ConfigError(
                "case=auto is resolved by transfer-train, which runs the advisor first; from Python, call "
                "transfer_cases.advise.resolve_auto_case(cfg) before build(cfg)"
            )
        # YAML `true`/`false` are ints to Python: `freeze: true` would freeze one stage, `keep: true`
        # keep one. Say so instead.
        for key, meaning in (
            ("keep", "null (all stages), k (the first k) or -k (all but the last k)"),
            ("freeze", "'all', 'none' or a number of stages"),
            ("body_lr_scale", "a number such as 0.1"),
            ("epochs", "a whole number >= 1"),
            ("probe_epochs", "a whole number >= 0"),
        ):
            value = getattr(self, key)
            if isinstance(value, bool):
                raise ConfigError(
                    f"case.{key}={str(value).lower()} is a boolean; case.{key} takes {meaning}"
                    + (", e.g. case.freeze=all" if key == "freeze" else "")
                )
        if not (self.keep is None or isinstance(self.keep, int)):
            raise ConfigError(
                f"case.keep must be null, k or -k (a whole number of stages), got {self.keep!r}; "
                "e.g. case.keep=-1"
            )
        if self.init not in ("pretrained", "scratch"):
            raise ConfigError(f"case.init must be 'pretrained' or 'scratch', got {self.init!r}")
        if not (self.freeze in ("all", "none") or (isinstance(self.freeze, int) and self.freeze >= 0)):
            raise ConfigError(f"case.freeze must be 'all', 'none' or a number of stages, got {self.freeze!r}")
        if self.init == "scratch" and self.freeze != "none":
            raise ConfigError(
                f"case {self.name!r} freezes randomly initialised stages "
                f"(init=scratch, freeze={self.freeze}): frozen random features are useless; "
                "set case.freeze=none or case.init=pretrained"
            )
        if not isinstance(self.body_lr_scale, int | float) or self.body_lr_scale < 0:
            raise ConfigError(f"case.body_lr_scale must be a number >= 0, got {self.body_lr_scale!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"case.epochs must be a whole number >= 1, got {self.epochs!r}")
        if not isinstance(self.probe_epochs, int) or self.probe_epochs < 0:
            raise ConfigError(f"case.probe_epochs must be a whole number >= 0, got {self.probe_epochs!r}")
        if self.probe_epochs and (self.freeze == "all" or self.init == "scratch"):
            raise ConfigError(
                f"case.probe_epochs={self.probe_epochs} warms the head up on the frozen pretrained body "
                f"before fine-tuning it, but case {self.name!r} "
                + ("fine-tunes nothing (freeze=all)" if self.freeze == "all" else "starts from scratch")
                + ": set case.probe_epochs=0"
            )
        if self.bn_mode not in ("train", "eval"):
            raise ConfigError(f"case.bn_mode must be 'train' or 'eval', got {self.bn_mode!r}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Case:
        unknown = set(cfg) - set(CASE_FIELDS)
        if unknown:
            raise ConfigError(f"unknown case field(s) {sorted(unknown)}; a case has {list(CASE_FIELDS)}")
        return cls(**cfg)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def pretrained(self) -> bool:
        return self.init == "pretrained"

    def frozen_stages(self, depth: int) -> int:
        """How many of `depth` kept stages this case freezes."""
        if self.freeze == "all":
            return depth
        if self.freeze == "none":
            return 0
        if self.freeze > depth:
            raise ConfigError(
                f"case.freeze={self.freeze} but only {depth} stages are kept (case.keep={self.keep})"
            )
        return self.freeze

    def apply(self, body: StagedBody) -> StagedBody:
        """Cut `body` to the kept stages and freeze the case's prefix; returns the body to use."""
        body = body.cut(self.keep)
        body.freeze(self.frozen_stages(body.depth))
        body.set_bn_eval(self.bn_mode == "eval")
        return body
