"""Will fine-tuning pay? The predicted gain of fine-tuning over the head-only case at the user's N.

From the learning curve of the linear probe at the best stage (the head-only case's features):

1. the head-only error at N images per class: the probe's error follows a power law in its
   training count (Hestness et al. 2017), fitted in log-log to the curve's points, its exponent
   clipped to [0, `curve_exponent_max`], extrapolated from the last point to N. A power law with no
   floor is optimistic for the head, so the extrapolation errs towards head-only;
2. the gain `e_N * (1 - (n0 / N) ** beta)`: fine-tuning removes at most the error the frozen head
   leaves, loses below `break_even_per_class` (n0) images per class and takes a growing share of
   that error above it, how fast set by `finetune_exponent` (beta);
3. its standard error, from the last probe point's (the exponent taken as known). Fine-tuning is
   predicted to pay when the gain clears `min_gain` by `gain_sems` standard errors; a band that
   straddles `min_gain` is *unclear*, and unclear means head-only (cheaper, cannot collapse).

The rule family and how its free parameters (n0, beta) are fitted are in docs/advisor.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np

from transfer_cases.advise.scores import StageScores


class GainRules(Protocol):
    """The thresholds the prediction reads (fields of `decide.Rules`)."""

    break_even_per_class: float
    finetune_exponent: float
    min_gain: float
    gain_sems: float
    curve_exponent_max: float
    finetune_source: str


@dataclass(frozen=True)
class GainPrediction:
    """The predicted fine-tuning gain at `per_class` images per class and the curve it came from.

    `curve_*` are the probe's learning curve at `stage` (images per class, mean and std accuracy);
    `trained_per_class` the images per class each probe of the curve trained on (the other fold held
    out); `exponent` the fitted power law's; `head_acc` the head-only accuracy extrapolated to
    `per_class`; `gain` and `gain_se` the prediction (accuracy, a fraction) and its standard error.
    """

    per_class: float
    stage: int
    curve_per_class: tuple[float, ...]
    curve_acc: tuple[float, ...]
    curve_std: tuple[float, ...]
    trained_per_class: tuple[float, ...]
    exponent: float
    head_acc: float
    gain: float
    gain_se: float
    finetune: bool
    confidence: str  # clear | unclear
    min_gain: float
    break_even_per_class: float
    finetune_exponent: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GainPrediction:
        kept = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for name in ("curve_per_class", "curve_acc", "curve_std", "trained_per_class"):
            kept[name] = tuple(kept.get(name, ()))
        return cls(**kept)

    def head_acc_at(self, per_class: float) -> float:
        """The extrapolated head-only accuracy at `per_class` images per class (for the chart)."""
        last_n, last_acc = self._last()
        if per_class <= last_n:
            return last_acc
        return 1 - (1 - last_acc) * (per_class / last_n) ** -self.exponent

    def summary(self) -> str:
        """One line: the gain, its band, the verdict."""
        verdict = "fine-tune" if self.finetune else "head-only"
        return (
            f"predicted fine-tuning gain at {self.per_class:g}/class: {self.gain:+.3f} ± {self.gain_se:.3f} "
            f"(head-only {self.head_acc:.3f}, extrapolated from the probe at stage {self.stage}) vs "
            f"{self.min_gain:g} needed -> {verdict} ({self.confidence})"
        )

    def _last(self) -> tuple[float, float]:
        if self.trained_per_class:
            return self.trained_per_class[-1], self.curve_acc[-1]
        return self.per_class, self.head_acc


def predict_gain(stage: StageScores, per_class: float, num_classes: int, rules: GainRules) -> GainPrediction:
    """The predicted gain of fine-tuning at `per_class` images per class, from `stage`'s probe."""
    folds = max(stage.folds, 2)
    if stage.curve_acc:
        ns, accs, stds = stage.curve_per_class, stage.curve_acc, stage.curve_std
    else:  # scores without a curve: the probe itself, not extrapolated
        ns, accs, stds = (per_class,), (stage.probe_pretrained,), (stage.probe_pretrained_std,)
    trained = tuple(n * (folds - 1) / folds for n in ns)
    # Half an image of the subset: a perfect probe's error is below what the subset can show.
    floor = 0.5 / max(ns[-1] * num_classes, 1)
    errors = [max(1 - a, floor) for a in accs]
    exponent = _exponent(trained, errors, rules.curve_exponent_max) if len(errors) > 1 else 0.0
    # Extrapolate only upwards: at or below the last point the probe's own error stands.
    scale = (per_class / trained[-1]) ** -exponent if per_class > trained[-1] else 1.0
    head_error = errors[-1] * scale
    share = 1 - (rules.break_even_per_class / per_class) ** rules.finetune_exponent
    gain_se = abs(share) * scale * stds[-1] / math.sqrt(folds)
    # A loss is shown no larger than fine-tuning falling to chance (a display bound: a negative
    # gain is head-only whatever its size); the band shrinks with it.
    worst = -max(1 - head_error - 1 / num_classes, 0.0)
    gain = max(head_error * share, worst)
    gain_se *= gain / (head_error * share) if share < 0 and head_error > 0 else 1.0
    low, high = gain - rules.gain_sems * gain_se, gain + rules.gain_sems * gain_se
    clear = low >= rules.min_gain or high < rules.min_gain
    return GainPrediction(
        per_class=float(per_class),
        stage=stage.stage,
        curve_per_class=tuple(float(n) for n in stage.curve_per_class),
        curve_acc=tuple(stage.curve_acc),
        curve_std=tuple(stage.curve_std),
        trained_per_class=trained if stage.curve_acc else (),
        exponent=exponent,
        head_acc=1 - head_error,
        gain=gain,
        gain_se=gain_se,
        finetune=low >= rules.min_gain,
        confidence="clear" if clear else "unclear",
        min_gain=rules.min_gain,
        break_even_per_class=rules.break_even_per_class,
        finetune_exponent=rules.finetune_exponent,
        source=rules.finetune_source,
    )


def gain_reason(p: GainPrediction) -> str:
    """The reasoning line: the curve, the extrapolation, the gain and the verdict with its source."""
    points = " -> ".join(
        f"{a:.3f} ({n:g}/class)" for n, a in zip(p.curve_per_class, p.curve_acc, strict=True)
    )
    curve = f"learning curve of the probe at stage {p.stage}: {points}; " if points else "no learning curve; "
    if p.finetune:
        verdict = "fine-tuning should gain -> fine-tune"
    elif p.confidence == "unclear":
        verdict = "unclear -> head-only (cheaper, cannot collapse)"
    else:
        verdict = "fine-tuning would not gain enough -> head-only"
    return (
        f"{curve}error ~ n^-{p.exponent:.2f}, head-only at {p.per_class:g}/class {p.head_acc:.3f}; "
        f"predicted gain (error left) x (1 - ({p.break_even_per_class:g}/{p.per_class:g})^"
        f"{p.finetune_exponent:g}) = {p.gain:+.3f} ± {p.gain_se:.3f} vs {p.min_gain:g} -> {verdict} "
        f"(rule: {p.source})"
    )


def _exponent(counts: tuple[float, ...], errors: list[float], top: float) -> float:
    """The power law's exponent: minus the least-squares slope of log error on log count, clipped."""
    slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
    return float(min(max(-slope, 0.0), top))
