"""From evidence to a case: size of the data, where the pretrained features are best, whether they
beat a random network at all.

The policy (every threshold is a parameter of `decide`):

- **Size.** The median number of samples per class (the minimum is reported too) below
  `small_max_per_class` is *small*, otherwise *large*: reported, and deciding only scratch against
  pretrained for unrelated features (below). The threshold's source travels with the advice.
- **Best stage.** The one-standard-error rule of model selection (Breiman et al. 1984; Hastie,
  Tibshirani & Friedman, *Elements of Statistical Learning* §7.10): the peak is the stage with the
  highest cross-validated probe accuracy (LogME breaks exact ties); every stage within `tie_sems`
  standard errors of the peak's accuracy (its std over folds / sqrt(folds)), or within
  `tie_margin`, whichever is larger, is as good as the peak as far as the data can tell. When the
  full body is among them it stays (`full_body_on_tie`): cutting is the guide's departure from
  keeping the whole pretrained body, so it needs an earlier stage that is clearly better. Otherwise
  the most parsimonious wins: the narrowest features (the fewest head parameters to fit from the
  samples), then the shallowest stage (the fewest layers to run). LogME's own best stage is
  reported next to it as a second opinion.
- **Similarity.** *similar* when the best stage is the last (the full body), *different* when an
  earlier stage is better. *unrelated* when even the peak is not better than the best stage of the
  randomly initialised control by more than `related_margin`, and even `related_sems` standard
  errors of the difference above it (`unrelated_needs_evidence`) stays within `related_margin`: the
  pretrained weights clearly bring nothing a random network does not. A difference the data cannot
  resolve either way (too few images for the probes) is *unclear*, and unclear keeps the pretrained
  verdict of the best stage: fine-tuning everything on data that small loses to the head alone.
  A peak within `solved_margin` of perfect accuracy is never unrelated: those features already
  separate the classes (an easy task that random features solve too).
- **Fine-tuning or the head alone.** The predicted gain of fine-tuning at the user's N images per
  class, from the probe's learning curve at the best stage (`gain.predict_gain`): fine-tune only when
  it clearly clears `min_gain`, otherwise the head alone.
- **Case.** head-only & similar -> `small_similar`; head-only & different -> `small_different` cut
  after the best stage (`case.keep`); fine-tune & similar -> `large_similar`; fine-tune & different
  -> `large_different` (pretrained init); large & unrelated -> `large_different` with
  `case.init=scratch`; small & unrelated -> `large_different` (fine-tune from pretrained: frozen
  features that do not help are the worst option) with a warning that the data may be too small
  for any case.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from transfer_cases.advise.gain import GainPrediction, gain_reason, predict_gain
from transfer_cases.advise.scores import StageScores
from transfer_cases.utils.errors import DataError


@dataclass(frozen=True)
class Advice:
    """The recommended case and the evidence behind it; `overrides` go to `transfer-train`."""

    case: str
    overrides: tuple[str, ...]
    init: str  # pretrained | scratch
    keep: int | None  # stages kept (None: all)
    freeze: str  # all | none
    size: str  # small | large
    similarity: str  # similar | different | unrelated
    best_stage: int
    depth: int
    logme_best_stage: int
    per_class_median: float
    per_class_min: int
    small_max_per_class: float
    threshold_source: str
    num_classes: int
    samples_per_class: dict[str, int] = field(default_factory=dict)
    stages: tuple[StageScores, ...] = ()
    reasoning: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    control: str = ""  # how the random control was built
    gain: GainPrediction | None = None  # the predicted fine-tuning gain and its curve

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gain"] = None if self.gain is None else self.gain.to_dict()
        d["overrides"] = list(self.overrides)
        d["stages"] = [s.to_dict() for s in self.stages]
        d["reasoning"] = list(self.reasoning)
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Advice:
        d = dict(d)
        d["overrides"] = tuple(d["overrides"])
        d["stages"] = tuple(StageScores.from_dict(s) for s in d["stages"])
        d["reasoning"] = tuple(d["reasoning"])
        d["warnings"] = tuple(d["warnings"])
        d["samples_per_class"] = {str(k): int(v) for k, v in d["samples_per_class"].items()}
        d["gain"] = None if d.get("gain") is None else GainPrediction.from_dict(d["gain"])
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Rules:
    """Every threshold of the decision (see the module doc), each with its default and source."""

    # Size: only the scratch-or-pretrained choice for unrelated features reads it now.
    small_max_per_class: float = 100
    threshold_source: str = "rule-of-thumb default, not measured"
    # The best stage: the one-standard-error rule.
    tie_margin: float = 0.01
    tie_sems: float = 1.0
    # Changed after the crossover study (docs/advisor.md, "Changed after seeing results"): ties went
    # to the narrowest stage, and the cut lost to the full body in 6 of the 7 tied cells it decided.
    full_body_on_tie: bool = True
    # Similarity: the pretrained body against the random control.
    related_margin: float = 0.01
    related_sems: float = 1.0
    solved_margin: float = 0.02
    # Changed with it: "unrelated" needed only a difference within the noise; on 10 images per class
    # of the ants/bees that sent a task the frozen body serves well to fine-tuning everything.
    unrelated_needs_evidence: bool = True
    # Whether fine-tuning pays: the predicted gain (advise/gain.py; the family and its fit:
    # docs/advisor.md). Fixed: the gain that counts is the one point; one standard error
    # is the tie rule's yardstick; the extrapolation's exponent is capped at the steepest
    # learning-curve exponent Hestness et al. 2017 report for image classification.
    min_gain: float = 0.01
    gain_sems: float = 1.0
    curve_exponent_max: float = 0.5
    # Fitted: the break-even images per class n0 and the exponent beta, with their source.
    break_even_per_class: float = 150
    finetune_exponent: float = 2.0
    finetune_source: str = (
        "fitted by studies/crossover_fit.py on the crossover study (CIFAR-10, MNIST, ants/bees;"
        " partial, N <= 500, 47 cells); leave-one-data-set-out hits in"
        " notebooks/results/crossover_fit.md"
    )

    @property
    def rules(self) -> Rules:
        """These thresholds alone (a subclass, such as the advisor, carries more)."""
        return Rules(**{name: getattr(self, name) for name in Rules.__dataclass_fields__})


def decide(
    samples_per_class: Mapping[Any, int],
    stages: Sequence[StageScores],
    num_classes: int | None = None,
    rules: Rules | None = None,
    **changes: Any,
) -> Advice:
    """The case for data with `samples_per_class` whose stages scored `stages` (see the module doc).

    `num_classes` defaults to the number of entries of `samples_per_class`; `rules` (the defaults
    when None) with `changes` (`tie_sems=2`, ...) are the thresholds.
    """
    r = replace(rules or Rules(), **changes)
    counts = {str(k): int(v) for k, v in samples_per_class.items()}
    if len(counts) < 2:
        raise DataError(f"the advisor needs at least 2 classes, found {len(counts)}: {sorted(counts)}")
    if not stages:
        raise ValueError("no stage scores to decide from")
    rows = sorted(stages, key=lambda s: s.stage)
    if len({s.stage for s in rows}) != len(rows) or rows[0].stage < 1:
        raise ValueError(f"stage indices must be distinct and >= 1, got {[s.stage for s in rows]}")
    num_classes = num_classes or len(counts)
    depth = rows[-1].stage
    reasons: list[str] = []
    warnings: list[str] = []

    # Size.
    median = float(statistics.median(counts.values()))
    minimum = min(counts.values())
    size = "small" if median < r.small_max_per_class else "large"
    reasons.append(
        f"samples per class: median {median:g}, min {minimum} "
        f"{'<' if size == 'small' else '>='} {r.small_max_per_class:g} -> {size} "
        f"(threshold: {r.threshold_source})"
    )

    # Best stage: the most parsimonious stage within one standard error of the peak.
    peak, tolerance, ties, best = best_stage(rows, r)
    reasons.append(
        f"probe accuracy peaks at stage {peak.stage}/{depth}: {_acc(peak)}; stages within "
        f"{tolerance:.3f} of it (max of {r.tie_margin:g} and {r.tie_sems:g} standard error of the peak): "
        f"{[s.stage for s in ties]} -> best stage {best.stage}" + _tie_reason(ties, best, depth)
    )
    logme_best = max(rows, key=lambda s: (s.logme_pretrained, s.stage))
    agreement = "agrees" if logme_best.stage == best.stage else "differs"
    reasons.append(f"LogME peaks at stage {logme_best.stage} ({agreement})")
    if all(s.h_score_pretrained is not None for s in rows):
        h_best = max(rows, key=lambda s: (s.h_score_pretrained, s.stage))
        agreement = "agrees" if h_best.stage == best.stage else "differs"
        reasons.append(f"H-score peaks at stage {h_best.stage} ({agreement})")

    # Similarity, with the random network as the control.
    control = max(rows, key=lambda s: (s.probe_random, s.stage))
    noise = r.related_sems * math.hypot(peak.probe_pretrained_sem, control.probe_random_sem)
    margin = max(r.related_margin, noise)
    gain = peak.probe_pretrained - control.probe_random
    solved = peak.probe_pretrained >= 1 - r.solved_margin
    # Unrelated needs the whole band of the difference within related_margin (or, without
    # `unrelated_needs_evidence`, the difference alone within the band's width).
    unclear = r.unrelated_needs_evidence and gain <= margin and gain + noise > r.related_margin
    # Features that already separate the classes are not "unrelated", even if random ones do too.
    if gain <= margin and not solved and not unclear:
        similarity = "unrelated"
        reasons.append(
            f"pretrained peak {peak.probe_pretrained:.3f} vs the random network's best "
            f"{control.probe_random:.3f} (stage {control.stage}): gain {gain:+.3f} <= {margin:.3f} "
            "-> unrelated (the pretrained features help no more than random ones)"
        )
    else:
        similarity = "similar" if best.stage == depth else "different"
        where = "the full body" if best.stage == depth else f"stage {best.stage} of {depth}, before the end"
        if gain > margin:
            why = f"pretrained beats the random network by {gain:+.3f} (> {margin:.3f})"
        elif unclear and not solved:
            why = (
                f"gain over the random network {gain:+.3f} ± {noise:.3f}: too noisy to tell whether the "
                f"pretrained features help (unrelated needs it clearly within {r.related_margin:g}) -> "
                "unclear, kept as pretrained"
            )
        else:
            why = (
                f"gain over the random network {gain:+.3f} <= {margin:.3f}, but the pretrained features "
                f"already solve the task (peak {peak.probe_pretrained:.3f} >= 1 - {r.solved_margin:g}) "
                "-> not unrelated"
            )
        reasons.append(f"{why}; best features at {where} -> {similarity}")
    majority = max(counts.values()) / sum(counts.values())
    if peak.probe_pretrained <= majority + margin:
        warnings.append(
            f"no stage separates the classes: best probe accuracy {peak.probe_pretrained:.3f} vs "
            f"{majority:.3f} for always guessing the largest class; check the labels and the data"
        )

    gain = predict_gain(best, median, num_classes, r)
    if similarity != "unrelated":
        reasons.append(gain_reason(gain))
    case, init, keep = case_for(size, similarity, best.stage, gain.finetune)
    if size == "small" and similarity == "unrelated":
        warnings.append(
            f"with {median:g} samples per class and pretrained features no better than random ones, "
            "the data may be too small for any case: fine-tuning everything (large_different) is the "
            "best bet; more data or a backbone pretrained on closer data would help more"
        )
    overrides = [f"case={case}"]
    if keep is not None:
        overrides.append(f"case.keep={keep}")
    if init == "scratch":
        overrides.append("case.init=scratch")
    freeze = "all" if case.startswith("small_") else "none"
    reasons.append(f"-> {case}: {_describe(case, init, keep, depth)}")
    return Advice(
        case=case,
        overrides=tuple(overrides),
        init=init,
        keep=keep,
        freeze=freeze,
        size=size,
        similarity=similarity,
        best_stage=best.stage,
        depth=depth,
        logme_best_stage=logme_best.stage,
        per_class_median=median,
        per_class_min=minimum,
        small_max_per_class=r.small_max_per_class,
        threshold_source=r.threshold_source,
        num_classes=num_classes,
        samples_per_class=counts,
        stages=tuple(rows),
        reasoning=tuple(reasons),
        warnings=tuple(warnings),
        gain=gain,
    )


def best_stage(
    stages: Sequence[StageScores], rules: Rules | None = None
) -> tuple[StageScores, float, list[StageScores], StageScores]:
    """`(peak, tolerance, ties, best)` of the one-standard-error rule (see the module doc): the best
    stage is the most parsimonious of the stages within `tolerance` of the peak's probe accuracy."""
    r = rules or Rules()
    peak = max(stages, key=lambda s: (s.probe_pretrained, s.logme_pretrained))
    tolerance = max(r.tie_margin, r.tie_sems * peak.probe_pretrained_sem)
    ties = sorted(
        (s for s in stages if peak.probe_pretrained - s.probe_pretrained <= tolerance), key=lambda s: s.stage
    )
    full = max(stages, key=lambda s: s.stage)
    if r.full_body_on_tie and full in ties:
        return peak, tolerance, ties, full
    return peak, tolerance, ties, min(ties, key=lambda s: (s.width, s.stage))


def _tie_reason(ties: Sequence[StageScores], best: StageScores, depth: int) -> str:
    if len(ties) < 2:
        return ""
    if best.stage == depth:
        return " (the full body ties: it stays, a cut needs a clearly better stage)"
    return " (the narrowest features among them: the fewest head parameters)"


def case_for(size: str, similarity: str, best_stage: int, finetune: bool) -> tuple[str, str, int | None]:
    """(case, init, keep) for a size and similarity verdict, and whether the body should fine-tune."""
    if similarity == "unrelated":
        return "large_different", ("scratch" if size == "large" else "pretrained"), None
    if not finetune and similarity == "different":
        return "small_different", "pretrained", best_stage
    return f"{'large' if finetune else 'small'}_{similarity}", "pretrained", None


def _describe(case: str, init: str, keep: int | None, depth: int) -> str:
    if case == "small_similar":
        return "freeze the whole pretrained body, train a new head"
    if case == "small_different":
        return f"keep the first {keep} of {depth} stages, freeze them, train a new head"
    if init == "scratch":
        return "train the whole network from a random initialisation"
    return "fine-tune the whole pretrained network with a new head"


def _acc(s: StageScores) -> str:
    return f"{s.probe_pretrained:.3f} ± {s.probe_pretrained_std:.3f}"
