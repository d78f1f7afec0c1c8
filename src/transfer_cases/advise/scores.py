"""Per-stage evidence: LogME, H-score and linear-probe accuracy of the pretrained body and of a
random control, and the pretrained probe's learning curve.

One `StageScores` row per stage boundary is all `decide` needs; `score_stages` computes the rows
from feature matrices (one per stage, pooled), however they were extracted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from transfer_cases.advise.logme import h_score, logme
from transfer_cases.advise.probe import ProbeResult, linear_probe_accuracy, torch_threads

# Scoring uses at most this many samples (a stratified, seeded subset): the probe's accuracy is
# known to about a point with a few thousand samples, and the cost grows with n.
DEFAULT_MAX_SAMPLES = 3000
# The learning curve: the probe on nested subsets of these fractions of each class's samples (the
# last is all of them, the probe itself). Whether the probe still gains from n/2 to n per class
# tells whether the head is still hungry for data (see `decide`).
CURVE_FRACTIONS = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class StageScores:
    """Evidence at the output of stage `stage` (1-based: keeping `stage` stages gives these features).

    `probe_*` are the mean and std of the cross-validated linear-probe accuracy over `folds` folds;
    `*_random` score the same architecture randomly initialised (the control). `h_score_*` is the
    H-score with a shrunk covariance (`logme.h_score`). `curve_*` is the pretrained probe's learning
    curve: samples per class (median over classes), mean and std of the accuracy, on nested subsets.
    """

    stage: int
    width: int
    logme_pretrained: float
    logme_random: float
    probe_pretrained: float
    probe_pretrained_std: float
    probe_random: float
    probe_random_std: float
    folds: int = 5
    stride: int | None = None
    h_score_pretrained: float | None = None
    h_score_random: float | None = None
    curve_per_class: tuple[float, ...] = ()
    curve_acc: tuple[float, ...] = ()
    curve_std: tuple[float, ...] = ()

    @property
    def probe_pretrained_sem(self) -> float:
        return self.probe_pretrained_std / np.sqrt(self.folds)

    @property
    def probe_random_sem(self) -> float:
        return self.probe_random_std / np.sqrt(self.folds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageScores:
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        for k in ("curve_per_class", "curve_acc", "curve_std"):
            kept[k] = tuple(kept.get(k, ()))
        return cls(**kept)

    def curve_gain(self) -> tuple[float, float] | None:
        """`(gain, se)`: the probe's accuracy gain over the last doubling of the samples per class
        (n/2 -> n) and the standard error of that difference; None without a curve."""
        if len(self.curve_acc) < 2:
            return None
        gain = self.curve_acc[-1] - self.curve_acc[-2]
        se = float(np.hypot(self.curve_std[-1], self.curve_std[-2]) / np.sqrt(self.folds))
        return gain, se


def score_stages(
    pretrained: Sequence[np.ndarray],
    random: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    strides: Sequence[int] | None = None,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    folds: int = 5,
    seed: int = 0,
    curve_at: Callable[[Sequence[StageScores]], int] | None = None,
    probe_scaling: str = "shared",
) -> list[StageScores]:
    """Score each stage's pooled features (element i: the (n, width) features after stage i + 1).

    The pretrained probe's learning curve is fitted at every stage, or, with `curve_at`, only at the
    stage it names once it has seen the rows without curves (the advisor's best stage: the only
    curve its decision reads).

    `pretrained` and `random` must hold the same samples in the same order as `labels`.
    """
    if len(pretrained) != len(random) or not pretrained:
        raise ValueError(f"{len(pretrained)} pretrained and {len(random)} random stages: need equal, > 0")
    if strides is not None and len(strides) != len(pretrained):
        raise ValueError(f"{len(strides)} strides for {len(pretrained)} stages")
    labels = np.asarray(labels).reshape(-1)
    subset = stratified_subset(labels, max_samples, seed=seed)
    y = labels[subset]
    nested = nested_subsets(y, CURVE_FRACTIONS[:-1], seed=seed)
    pre = [np.asarray(f)[subset] for f in pretrained]
    rand = [np.asarray(f)[subset] for f in random]

    def probe(f: np.ndarray, rows: np.ndarray | None = None) -> ProbeResult:
        f, labels = (f, y) if rows is None else (f[rows], y[rows])
        return linear_probe_accuracy(f, labels, folds=folds, seed=seed, threads=None, scaling=probe_scaling)

    # Every fit and score is independent: one task each, on as many threads as torch may use, each
    # on one intra-op thread (the probes' matrices are skinny; set once here: the setting is global).
    workers = max(1, torch.get_num_threads())  # read before the setting drops to 1 below
    with torch_threads(1), ThreadPoolExecutor(workers) as pool:
        jobs = [
            [
                pool.submit(probe, f_pre),
                pool.submit(probe, f_rand),
                pool.submit(logme, f_pre, y),
                pool.submit(logme, f_rand, y),
                pool.submit(h_score, f_pre, y, shrink=True),
                pool.submit(h_score, f_rand, y, shrink=True),
            ]
            for f_pre, f_rand in zip(pre, rand, strict=True)
        ]
        curves = (
            {}
            if curve_at is not None
            else {i: [pool.submit(probe, f, s) for s in nested] for i, f in enumerate(pre)}
        )
        rows = []
        for i, job in enumerate(jobs):
            probe_pre, probe_rand, logme_pre, logme_rand, h_pre, h_rand = (j.result() for j in job)
            rows.append(
                StageScores(
                    stage=i + 1,
                    width=int(pre[i].shape[1]),
                    logme_pretrained=logme_pre,
                    logme_random=logme_rand,
                    probe_pretrained=probe_pre.mean,
                    probe_pretrained_std=probe_pre.std,
                    probe_random=probe_rand.mean,
                    probe_random_std=probe_rand.std,
                    folds=len(probe_pre.folds),
                    stride=None if strides is None else int(strides[i]),
                    h_score_pretrained=h_pre,
                    h_score_random=h_rand,
                )
            )
        if curve_at is not None:
            i = curve_at(rows) - 1
            curves = {i: [pool.submit(probe, pre[i], s) for s in nested]}
        for i, points in curves.items():
            last = (_per_class(y), rows[i].probe_pretrained, rows[i].probe_pretrained_std)
            fits = [p.result() for p in points]
            curve = [(_per_class(y[s]), f.mean, f.std) for s, f in zip(nested, fits, strict=True)]
            n, acc, std = zip(*curve, last, strict=True)
            rows[i] = replace(rows[i], curve_per_class=n, curve_acc=acc, curve_std=std)
    return rows


def nested_subsets(labels: np.ndarray, fractions: Sequence[float], *, seed: int = 0) -> list[np.ndarray]:
    """Sorted indices of nested subsets: `fractions[i]` of every class (rounded up), each subset
    holding the smaller ones (one seeded order per class). A fraction that would leave a class with
    fewer than 2 samples (no cross-validation) is skipped."""
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    subsets = []
    for fraction in sorted(fractions):
        takes = [int(np.ceil(len(o) * fraction)) for o in orders]
        if min(takes) >= 2:
            subsets.append(np.sort(np.concatenate([o[:t] for o, t in zip(orders, takes, strict=True)])))
    return subsets


def _per_class(labels: np.ndarray) -> float:
    return float(np.median(np.unique(labels, return_counts=True)[1]))


def stratified_subset(labels: np.ndarray, max_samples: int | None, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `max_samples` samples keeping the class proportions (all if fewer)."""
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if max_samples is None or n <= max_samples:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = max(1, round(len(members) * max_samples / n))
        keep.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(keep))
