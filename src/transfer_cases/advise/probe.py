"""Cross-validated linear-probe accuracy: the accuracy a new head on frozen features would reach.

Multinomial logistic regression with an L2 penalty on centred, scaled features, fitted full batch
by L-BFGS for a fixed number of iterations (a convex problem: zero initialisation and full batch
make it deterministic), scored by stratified k-fold cross-validation. 50 iterations reach the
held-out accuracy of a fit run to convergence (500 iterations) within a sample or two per fold.
The centring and scaling are fitted on the training folds only: the held-out fold never leaks in.

`scaling` says how: `shared` (one scale for all features of a stage, the RMS of the centred
features) keeps the features as the head sees them, up to one factor that makes the L2 penalty
comparable across stages; `feature` standardises each feature, which inflates the many
low-variance features of a wide stage and, on small data, rated the full body below narrow early
stages that the trained head did worse on (docs/advisor.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from transfer_cases.utils.errors import DataError


@dataclass(frozen=True)
class ProbeResult:
    """Fold accuracies of a linear probe; `std` is their sample standard deviation (ddof=1)."""

    mean: float
    std: float
    folds: tuple[float, ...]

    @property
    def sem(self) -> float:
        """Standard error of the mean accuracy."""
        return self.std / math.sqrt(len(self.folds))


def linear_probe_accuracy(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    folds: int = 5,
    l2: float = 1e-2,
    max_iter: int = 50,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    threads: int | None = 1,
    scaling: str = "shared",
) -> ProbeResult:
    """Mean and std of the held-out accuracy of an L2 logistic regression over stratified folds.

    Args:
        features: (n, d) features, one row per sample.
        labels: (n,) class labels (any integers; they are re-indexed).
        folds: k of the k-fold; lowered to the size of the smallest class (at least 2) so that
            every fold can hold a sample of every class.
        l2: penalty on the weights, added to the mean cross-entropy as `l2 / 2 * ||W||^2`.
        max_iter: L-BFGS iterations (the folds are fitted together, see `fit_folds`).
        seed: seeds the fold assignment.
        scaling: `shared` (one scale per feature matrix) or `feature` (each feature standardised).
        threads: torch intra-op threads while fitting (restored after); None keeps the current
            setting. One by default: the matrices are skinny (C columns), so a second thread gains
            little on an idle machine, while on a busy one (parallel tests, data-loader workers)
            the threads wait for each other and the fit slows down many times over.
    """
    x = torch.as_tensor(np.asarray(features), dtype=dtype)
    y_raw = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or len(x) != len(y_raw):
        raise ValueError(f"features {tuple(x.shape)} and labels {y_raw.shape} do not match")
    classes, y_index = np.unique(y_raw, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"a linear probe needs at least 2 classes, the labels hold {len(classes)}")
    test_sets = stratified_folds(y_index, folds, seed=seed)
    train = np.ones((len(y_index), len(test_sets)), dtype=bool)
    for f, test_idx in enumerate(test_sets):
        train[test_idx, f] = False
    with torch_threads(threads):
        logits = fit_folds(
            x, torch.as_tensor(y_index), torch.as_tensor(train), len(classes), l2, max_iter, scaling
        )
    predicted = logits.argmax(dim=2).numpy()  # (n, k)
    acc = np.array([(predicted[t, f] == y_index[t]).mean() for f, t in enumerate(test_sets)])
    return ProbeResult(float(acc.mean()), float(acc.std(ddof=1)), tuple(float(a) for a in acc))


def stratified_folds(labels: np.ndarray, folds: int = 5, *, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each fold: every class shuffled (seeded) and dealt round-robin over the folds.

    k is `folds`, or the size of the smallest class when smaller (at least 2). Dealing the classes
    one after another in a single round-robin keeps both the class mix and the fold sizes balanced.
    """
    labels = np.asarray(labels).reshape(-1)
    classes, counts = np.unique(labels, return_counts=True)
    if len(labels) < 2:
        raise DataError(f"cross-validation needs at least 2 samples, got {len(labels)}")
    k = max(2, min(folds, int(counts.min())))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in classes])
    fold_of = np.empty(len(labels), dtype=np.int64)
    fold_of[order] = np.arange(len(order)) % k
    return [np.flatnonzero(fold_of == i) for i in range(k)]


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` (None: unchanged) inside, restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


SCALINGS = ("shared", "feature")


def fit_folds(
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int,
    scaling: str = "feature",
) -> torch.Tensor:
    """Fit one probe per fold (column of the boolean `train` mask) and return every probe's logits
    for every sample, (n, k, C).

    All k probes are fitted at once, as one objective (the sum of the folds' losses, which are
    independent, so each fold's optimum is unchanged): the features are read once per step for
    all folds, faster than k separate fits. Each fold's centring and scaling (mean and std of its
    training rows; with `scaling="shared"` one std, the RMS over the features) is folded into its
    weights: ((x - mu) / s) W = x (W / s) - (mu / s) W.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    n, d = x.shape
    k = train.shape[1]
    # A global shift and scale first: exact (each fold's own centring and scaling undo it) and it
    # keeps the folded-in standardisation free of cancellation in float32.
    spread = x.std(dim=0, correction=0)
    if scaling == "shared":
        spread = spread.pow(2).mean().sqrt()
    x = (x - x.mean(dim=0)) / spread.clamp_min(1e-12)
    weights = train.to(x.dtype) / train.sum(dim=0)  # (n, k): mean over each fold's training rows
    mu = weights.T @ x  # (k, d)
    variance = (weights.T @ x**2 - mu**2).clamp_min(0)  # (k, d)
    if scaling == "shared":
        variance = variance.mean(dim=1, keepdim=True).expand(k, d)
    std = variance.sqrt().clamp_min(1e-6)  # constant features -> 0
    w = torch.zeros(k, d, num_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(k, num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe"
    )
    targets = y.repeat_interleave(k)

    def logits() -> torch.Tensor:
        scaled = w / std[:, :, None]  # (k, d, C)
        shift = b - torch.einsum("kd,kdc->kc", mu, scaled)
        return (x @ scaled.permute(1, 0, 2).reshape(d, k * num_classes)).view(n, k, num_classes) + shift

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        ce = F.cross_entropy(logits().reshape(n * k, num_classes), targets, reduction="none").view(n, k)
        loss = (ce * weights).sum() + l2 / 2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return logits()
