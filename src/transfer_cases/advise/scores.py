"""Per-stage evidence: LogME and linear-probe accuracy of the pretrained body and of a random control.

One `StageScores` row per stage boundary is all `decide` needs; `score_stages` computes the rows
from feature matrices (one per stage, pooled), however they were extracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from transfer_cases.advise.logme import logme
from transfer_cases.advise.probe import linear_probe_accuracy

# Scoring uses at most this many samples (a stratified, seeded subset): the probe's accuracy is
# known to about a point with a few thousand samples, and the cost grows with n.
DEFAULT_MAX_SAMPLES = 3000


@dataclass(frozen=True)
class StageScores:
    """Evidence at the output of stage `stage` (1-based: keeping `stage` stages gives these features).

    `probe_*` are the mean and std of the cross-validated linear-probe accuracy over `folds` folds;
    `*_random` score the same architecture randomly initialised (the control).
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
        return cls(**{k: v for k, v in d.items() if k in names})


def score_stages(
    pretrained: Sequence[np.ndarray],
    random: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    strides: Sequence[int] | None = None,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    folds: int = 5,
    seed: int = 0,
) -> list[StageScores]:
    """Score each stage's pooled features (element i: the (n, width) features after stage i + 1).

    `pretrained` and `random` must hold the same samples in the same order as `labels`.
    """
    if len(pretrained) != len(random) or not pretrained:
        raise ValueError(f"{len(pretrained)} pretrained and {len(random)} random stages: need equal, > 0")
    if strides is not None and len(strides) != len(pretrained):
        raise ValueError(f"{len(strides)} strides for {len(pretrained)} stages")
    labels = np.asarray(labels).reshape(-1)
    subset = stratified_subset(labels, max_samples, seed=seed)
    y = labels[subset]
    rows = []
    for i, (f_pre, f_rand) in enumerate(zip(pretrained, random, strict=True)):
        f_pre, f_rand = np.asarray(f_pre)[subset], np.asarray(f_rand)[subset]
        probe_pre = linear_probe_accuracy(f_pre, y, folds=folds, seed=seed)
        probe_rand = linear_probe_accuracy(f_rand, y, folds=folds, seed=seed)
        rows.append(
            StageScores(
                stage=i + 1,
                width=int(f_pre.shape[1]),
                logme_pretrained=logme(f_pre, y),
                logme_random=logme(f_rand, y),
                probe_pretrained=probe_pre.mean,
                probe_pretrained_std=probe_pre.std,
                probe_random=probe_rand.mean,
                probe_random_std=probe_rand.std,
                folds=len(probe_pre.folds),
                stride=None if strides is None else int(strides[i]),
            )
        )
    return rows


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
