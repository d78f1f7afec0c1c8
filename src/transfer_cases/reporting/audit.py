"""The data audit's findings from features alone: near-duplicate candidates, likely label errors,
class counts. Pure numpy/torch; `audit_run` feeds it the cached features and confirms duplicates.

Likely label errors follow confident learning (Northcutt, Jiang and Chuang, JAIR 2021): out-of-fold
probabilities of a linear probe on the frozen features; a sample is flagged when some other class
reaches that class's own average self-confidence (the per-class threshold) and beats its given
label, and flagged samples are ranked by normalised margin (given-label probability minus the best
other one). No library: cleanlab would add a dependency (and scikit-learn) for about 20 lines,
and the probe that gives the probabilities is the advisor's (one L-BFGS fit for all folds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from transfer_cases.advise.probe import fit_folds, stratified_folds

# Split pairs searched for duplicates: leakage across splits, and repeats inside train.
PAIRS = (("train", "val"), ("train", "test"), ("val", "test"), ("train", "train"))


@dataclass(frozen=True)
class Candidate:
    """Two images whose features are nearly parallel (cosine similarity `similarity`)."""

    split_a: str
    index_a: int
    split_b: str
    index_b: int
    similarity: float


def near_duplicate_candidates(
    features: Mapping[str, np.ndarray],
    threshold: float,
    *,
    neighbours: int = 3,
    max_pairs: int = 5000,
    block: int = 2048,
) -> list[Candidate]:
    """For each split pair of `PAIRS` present in `features`: each image's `neighbours` nearest images
    of the other split (cosine similarity of the features) at or above `threshold`, best first, at
    most `max_pairs`. Within a split an image is never its own neighbour and a pair is listed once.

    A resized or re-encoded copy is its original's nearest neighbour without being very close to
    it (the pooled features of a CNN are not scale invariant), so the features only nominate
    candidates: the pixel check decides."""
    found: dict[tuple[str, int, str, int], float] = {}
    unit = {k: _normalise(v) for k, v in features.items() if v is not None and len(v)}
    for a, b in PAIRS:
        if a not in unit or b not in unit:
            continue
        fa, fb = unit[a], unit[b]
        k = min(neighbours, len(fb) - (a == b))
        if k < 1:
            continue
        for start in range(0, len(fa), block):
            sims = fa[start : start + block] @ fb.T
            if a == b:
                rows = torch.arange(len(sims))
                sims[rows, rows + start] = -2  # not itself
            values, columns = sims.topk(k, dim=1)
            for i, j in (values >= threshold).nonzero().tolist():
                row, col = start + i, int(columns[i, j])
                key = (a, min(row, col), b, max(row, col)) if a == b else (a, row, b, col)
                found[key] = float(values[i, j])
    ranked = sorted(found.items(), key=lambda item: -item[1])[:max_pairs]
    return [Candidate(a, i, b, j, sim) for (a, i, b, j), sim in ranked]


def _normalise(x: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def out_of_fold_probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    l2: float = 1e-2,
    max_iter: int = 50,
) -> np.ndarray:
    """(n, C) probabilities of each sample from the probe fitted on the folds that do not hold it."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = np.asarray(labels).reshape(-1)
    classes, y_index = np.unique(y, return_inverse=True)
    tests = stratified_folds(y_index, folds, seed=seed)
    train = np.ones((len(y), len(tests)), dtype=bool)
    fold_of = np.empty(len(y), dtype=np.int64)
    for f, idx in enumerate(tests):
        train[idx, f] = False
        fold_of[idx] = f
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # skinny matrices: one thread (see advise.probe)
    try:
        logits = fit_folds(x, torch.as_tensor(y_index), torch.as_tensor(train), len(classes), l2, max_iter)
    finally:
        torch.set_num_threads(previous)
    own = logits[torch.arange(len(y)), torch.as_tensor(fold_of)]
    probs = torch.zeros(len(y), int(y.max()) + 1)
    probs[:, torch.as_tensor(classes)] = own.softmax(dim=1)
    return probs.numpy()


@dataclass(frozen=True)
class LabelIssue:
    index: int  # row of the audited matrix
    given: int
    suggested: int
    p_given: float
    p_suggested: float
    margin: float  # p_given - max other probability (negative: another class wins)
    flagged: bool  # in the off-diagonal of the confident joint


def label_issues(probs: np.ndarray, labels: np.ndarray) -> list[LabelIssue]:
    """Every sample whose given label is not the most probable, ranked by normalised margin (most
    negative first); `flagged` marks confident learning's off-diagonal of the confident joint."""
    labels = np.asarray(labels)
    n, c = probs.shape
    present = np.unique(labels)
    thresholds = np.full(c, np.inf)
    for k in present:
        thresholds[k] = probs[labels == k, k].mean()
    above = probs >= thresholds[None, :]
    # The confident class: the most probable among the classes at or above their threshold.
    confident = np.where(above.any(axis=1), np.where(above, probs, -1).argmax(axis=1), -1)
    p_given = probs[np.arange(n), labels]
    others = probs.copy()
    others[np.arange(n), labels] = -1
    suggested = others.argmax(axis=1)
    margin = p_given - others.max(axis=1)
    order = np.argsort(margin, kind="stable")
    return [
        LabelIssue(
            index=int(i),
            given=int(labels[i]),
            suggested=int(suggested[i]),
            p_given=float(p_given[i]),
            p_suggested=float(probs[i, suggested[i]]),
            margin=float(margin[i]),
            flagged=bool(confident[i] >= 0 and confident[i] != labels[i]),
        )
        for i in order
        if margin[i] < 0
    ]


def class_counts(labels: Mapping[str, np.ndarray], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """`{split: {class: count}}` for every split present."""
    return {
        split: {name: int((np.asarray(y) == i).sum()) for i, name in enumerate(classes)}
        for split, y in labels.items()
        if y is not None
    }


def imbalance(counts: Mapping[str, int]) -> float:
    """Largest over smallest class count (inf when a class is empty)."""
    values = list(counts.values())
    if not values:
        return 1.0
    return float("inf") if min(values) == 0 else max(values) / min(values)
