"""LogME and H-score: how well features fit labels, scored without training a head.

LogME (You et al., ICML 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning"). For features F (n x d) and each one-hot label column y, Bayesian linear regression
y = F w + noise with w ~ N(0, I/alpha) and noise ~ N(0, 1/beta) has the evidence

    log p(y | F, alpha, beta) = d/2 log alpha + n/2 log beta - n/2 log 2 pi - 1/2 log|A|
                                - beta/2 ||F m - y||^2 - alpha/2 ||m||^2,
    A = alpha I + beta F^T F,   m = beta A^-1 F^T y,

which equals log N(y; 0, I/beta + F F^T / alpha). (alpha, beta) are set by the paper's fixed point
(MacKay's updates), written in the eigenbasis of F^T F:

    gamma = sum_i beta s_i / (alpha + beta s_i),
    alpha <- gamma / ||m||^2,   beta <- (n - gamma) / ||F m - y||^2,

with s_i the eigenvalues of F^T F.

The score is the maximised evidence divided by n, averaged over classes. Only the spectrum of the
smaller Gram matrix (F F^T when n <= d, F^T F when n > d) and the projections of the labels on its
eigenvectors are needed, so one eigendecomposition serves every class and every iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# alpha and beta stay in this range: a label column orthogonal to every feature direction would
# send alpha to infinity (the evidence rises towards a finite limit); the clip keeps it finite.
_PRECISION_RANGE = (1e-12, 1e12)
# Eigenvalues of the Gram matrix below this fraction of the largest are treated as exact zeros.
_RELATIVE_RANK_CUTOFF = 1e-10


@dataclass(frozen=True)
class LogMEResult:
    """Per-class evidence (divided by n) and the (alpha, beta) that maximise it."""

    score: float
    per_class: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    iterations: int


def logme(features: np.ndarray, labels: np.ndarray, *, tol: float = 1e-10, max_iter: int = 100) -> float:
    """LogME of `features` (n x d) for integer class `labels` (n,): higher means more transferable.

    Comparable across feature extractors on the same labelled data (not across data sets).
    """
    return logme_details(features, labels, tol=tol, max_iter=max_iter).score


def logme_details(
    features: np.ndarray, labels: np.ndarray, *, tol: float = 1e-10, max_iter: int = 100
) -> LogMEResult:
    """LogME with its per-class evidence and optimal (alpha, beta); see the module docstring.

    The fixed point stops when no class's evidence per sample moves by more than `tol`, or after
    `max_iter` iterations (it usually takes fewer than 30).
    """
    f = _as_features(features)
    y = _one_hot(labels, len(f))
    n = len(f)
    sigma, x, residual = _spectrum(f, y)  # sigma (k,), x (k, K), residual (K,)
    sigma = sigma[:, None]
    x2 = x**2

    alpha = np.ones(y.shape[1])
    beta = np.ones(y.shape[1])
    evidence = _evidence(n, sigma, x2, residual, alpha, beta)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - `iterations` is reported
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum(axis=0)
        m2, res2 = _norms(sigma, x2, residual, t)
        alpha = np.clip(gamma / np.maximum(m2, 1e-300), *_PRECISION_RANGE)
        beta = np.clip((n - gamma) / np.maximum(res2, 1e-300), *_PRECISION_RANGE)
        previous, evidence = evidence, _evidence(n, sigma, x2, residual, alpha, beta)
        # Stop on the evidence, not on alpha/beta: when a class is best explained by noise alone
        # alpha climbs towards infinity for many steps while the evidence has already settled.
        if np.all(np.abs(evidence - previous) <= tol * n):
            break
    per_class = evidence / n
    return LogMEResult(float(per_class.mean()), per_class, alpha, beta, iterations)


def h_score(features: np.ndarray, labels: np.ndarray, *, shrink: bool = False) -> float:
    """H-score (Bao et al. 2019): tr(cov(f)^+ cov(E[f | y])), the share of feature variance the
    class means explain, summed over feature directions. Higher is better; at most K - 1.

    Exact (`shrink=False`), it is pinned at K - 1 whenever n <= d + 1: any n points span their
    own covariance, so the class means are "fully explained" whatever the features. `shrink=True`
    is the shrinkage-based H-score (Ibrahim et al., ICLR 2023): the features are standardised,
    cov(f) is replaced by its Ledoit-Wolf estimate (1 - s) cov(f) + s I (shrunk towards the identity
    by the amount s that minimises the expected error) and cov(E[f | y]) is scaled by (1 - s) alike,
    which keeps the bound and stays informative when n < d. The advisor uses that one.
    """
    f = _as_features(features)
    y = _one_hot(labels, len(f))
    f = f - f.mean(axis=0)
    n = len(f)
    class_means = (y.T @ f) / y.sum(axis=0)[:, None]  # (K, d)
    if not shrink:
        cov_f = f.T @ f / n
        g = y @ class_means  # each sample replaced by its class mean
        cov_g = g.T @ g / n
        return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True) @ cov_g))
    scale = f.std(axis=0)
    scale = np.where(scale > 1e-12 * max(scale.max(), 1e-300), scale, np.inf)  # constant: drop
    f, class_means = f / scale, class_means / scale
    cov_f, shrinkage = ledoit_wolf(f)
    # tr(cov_f^-1 (1 - s) cov_g) with cov_g = M^T diag(n_k / n) M (M: the class means).
    weighted = class_means * np.sqrt(y.sum(axis=0) / n)[:, None]
    solved = np.linalg.solve(cov_f, weighted.T)  # (d, K)
    return float((1 - shrinkage) * np.sum(weighted.T * solved))


def ledoit_wolf(f: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004) covariance of centred rows `f`, `((1 - s) S + s mu I, s)`: S the sample
    covariance, mu its mean eigenvalue, s the shrinkage that minimises the expected squared error."""
    n, d = f.shape
    s = f.T @ f / n
    mu = np.trace(s) / d
    if mu <= 0:
        return np.eye(d), 1.0
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d  # distance of S from the target
    f2 = f**2
    beta = (np.sum(f2.T @ f2) / n - np.sum(s**2)) / (d * n)  # variance of S's entries
    shrinkage = float(min(beta, delta) / delta) if delta > 0 else 1.0
    return (1 - shrinkage) * s + shrinkage * mu * np.eye(d), shrinkage


def _evidence(
    n: int, sigma: np.ndarray, x2: np.ndarray, residual: np.ndarray, alpha: np.ndarray, beta: np.ndarray
) -> np.ndarray:
    """Log evidence of each label column at (alpha, beta), the module docstring's formula."""
    m2, res2 = _norms(sigma, x2, residual, alpha / beta)
    k = sigma.shape[0]
    return (
        k / 2 * np.log(alpha)  # d/2 log alpha, less the log(alpha) of the d - k zero eigenvalues in log|A|
        + n / 2 * np.log(beta)
        - 0.5 * np.log(alpha + beta * sigma).sum(axis=0)
        - beta / 2 * res2
        - alpha / 2 * m2
        - n / 2 * np.log(2 * np.pi)
    )


def _norms(
    sigma: np.ndarray, x2: np.ndarray, residual: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """||m||^2 and ||F m - y||^2 at alpha / beta = t, from the spectrum and the label projections."""
    m2 = (sigma * x2 / (sigma + t) ** 2).sum(axis=0)
    res2 = (x2 * (t / (sigma + t)) ** 2).sum(axis=0) + residual
    return m2, res2


def _spectrum(f: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nonzero-or-zero eigenvalues s_i of F^T F (k = min(n, d) of them), the labels' coordinates
    x = U^T y on the left singular vectors, and ||y||^2 - ||x||^2 (the part of y outside F's span)."""
    n, d = f.shape
    if n <= d:
        sigma, u = np.linalg.eigh(f @ f.T)
        sigma = np.clip(sigma, 0.0, None)
        x = u.T @ y
    else:
        sigma, v = np.linalg.eigh(f.T @ f)
        sigma = np.clip(sigma, 0.0, None)
        rank = sigma > _RELATIVE_RANK_CUTOFF * max(sigma.max(), 1e-300)
        sigma = np.where(rank, sigma, 0.0)
        # U = F V / sqrt(s): x = U^T y without forming U; null directions carry no label signal.
        x = np.zeros((d, y.shape[1]))
        x[rank] = (v[:, rank].T @ (f.T @ y)) / np.sqrt(sigma[rank])[:, None]
    residual = np.clip((y**2).sum(axis=0) - (x**2).sum(axis=0), 0.0, None)
    return sigma, x, residual


def _as_features(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) == 0:
        raise ValueError(f"features must be a non-empty (n, d) matrix, got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or infinite values")
    return f


def _one_hot(labels: np.ndarray, n: int) -> np.ndarray:
    """One column per class present in `labels` (absent classes would have no evidence to score)."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} feature rows")
    classes, index = np.unique(labels, return_inverse=True)
    return np.eye(len(classes))[index]
