"""LogME against a brute-force evidence maximisation, and the properties any such score must have."""

from __future__ import annotations

import numpy as np
import pytest

from transfer_cases.advise.logme import h_score, ledoit_wolf, logme, logme_details


def brute_evidence(f: np.ndarray, y: np.ndarray, log_alpha: np.ndarray, log_beta: np.ndarray) -> np.ndarray:
    """log N(y; 0, I/beta + F F^T/alpha) from the explicit n x n covariance, for arrays of (alpha, beta)."""
    n = len(f)
    alpha, beta = np.exp(log_alpha)[..., None, None], np.exp(log_beta)[..., None, None]
    cov = np.eye(n) / beta + (f @ f.T) / alpha
    _, logdet = np.linalg.slogdet(cov)
    rhs = np.broadcast_to(y[:, None], (*cov.shape[:-1], 1))
    quad = np.einsum("i,...i->...", y, np.linalg.solve(cov, rhs)[..., 0])
    return -n / 2 * np.log(2 * np.pi) - logdet / 2 - quad / 2


def grid_max(f: np.ndarray, y: np.ndarray) -> float:
    """Maximum over (log alpha, log beta) by a coarse grid refined twice around the best point.

    log alpha up to 30 stands for alpha = infinity (the labels explained by noise alone)."""
    center, half, steps = np.array([7.5, 0.0]), np.array([22.5, 12.0]), 91
    best = -np.inf
    for _ in range(3):
        axes = [np.linspace(c - h, c + h, steps) for c, h in zip(center, half, strict=True)]
        la, lb = np.meshgrid(*axes, indexing="ij")
        values = brute_evidence(f, y, la, lb)
        i = np.unravel_index(np.argmax(values), values.shape)
        best, center, half = values[i], np.array([la[i], lb[i]]), half / 15
    return float(best)


# Both forms: F^T F (n > d, also rank-deficient) and F F^T (n <= d).
@pytest.mark.parametrize("n, d, duplicate", [(9, 3, False), (10, 4, True), (6, 10, False)])
def test_logme_is_the_maximum_of_the_brute_force_evidence(n: int, d: int, duplicate: bool) -> None:
    rng = np.random.default_rng(n * 100 + d)
    labels = np.arange(n) % 3
    f = rng.normal(size=(n, d))
    f[:, 0] += 1.5 * labels  # some classes explained by a feature, some not
    if duplicate:
        f[:, -1] = f[:, -2]  # a zero eigenvalue of F^T F
    result = logme_details(f, labels)
    for k in range(3):
        y = (labels == k).astype(float)
        # The closed form at the fixed point is the evidence there ...
        at_optimum = brute_evidence(f, y, np.log(result.alpha[k]), np.log(result.beta[k]))
        assert result.per_class[k] == pytest.approx(at_optimum / n, abs=1e-9)
        # ... and that point is the maximum.
        best = grid_max(f, y) / n
        assert result.per_class[k] >= best - 1e-9
        assert result.per_class[k] == pytest.approx(best, abs=1e-4)
    assert result.score == pytest.approx(result.per_class.mean())


def test_features_that_determine_the_labels_score_higher_than_noise() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    noise = rng.normal(size=(200, 32))
    informative = noise.copy()
    informative[:, :4] += 3 * np.eye(4)[labels]
    assert logme(informative, labels) > logme(noise, labels) + 0.2
    assert h_score(informative, labels) > h_score(noise, labels) + 1.0


def test_logme_is_invariant_to_sample_order_and_feature_scale() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 50)
    f = rng.normal(size=(50, 8)) + np.eye(3)[labels] @ rng.normal(size=(3, 8))
    perm = rng.permutation(50)
    score = logme(f, labels)
    assert logme(f[perm], labels[perm]) == pytest.approx(score, abs=1e-10)
    # The evidence depends on F only through F F^T / alpha, and alpha absorbs a global scale.
    assert logme(10.0 * f, labels) == pytest.approx(score, abs=1e-8)


def test_label_values_do_not_matter() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 40)
    f = rng.normal(size=(40, 5))
    assert logme(f, np.array([7, 11, 42])[labels]) == pytest.approx(logme(f, labels), abs=1e-12)


def test_h_score_by_hand() -> None:
    # One feature: H = var(E[f | y]) / var(f). f = 0, 2 | 4, 6: class means 1, 5; var(f) = 5, var(means) = 4.
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    assert h_score(f, np.array([0, 0, 1, 1])) == pytest.approx(0.8)


def test_shrunk_h_score_tells_features_apart_where_the_exact_one_is_pinned() -> None:
    # 40 samples of 100 features (a wide stage, few images): any n <= d + 1 points span their own
    # covariance, so the exact H-score is K - 1 = 1 for noise and signal alike.
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    noise = rng.normal(size=(40, 100))
    informative = noise.copy()
    informative[:, :10] += labels[:, None]
    assert h_score(noise, labels) == pytest.approx(1.0) == h_score(informative, labels)
    shrunk_noise, shrunk = h_score(noise, labels, shrink=True), h_score(informative, labels, shrink=True)
    assert 0 < shrunk_noise < shrunk < 1  # still bounded by K - 1
    assert shrunk > shrunk_noise + 0.05
    # Standardised first: a feature's unit does not matter.
    scaled = informative * rng.uniform(0.1, 10, size=100)
    assert h_score(scaled, labels, shrink=True) == pytest.approx(shrunk, rel=1e-9)


def test_ledoit_wolf_shrinks_little_with_many_samples_and_much_with_few() -> None:
    rng = np.random.default_rng(3)
    many = rng.normal(size=(5000, 10)) * np.arange(1, 11)
    cov, shrinkage = ledoit_wolf(many - many.mean(axis=0))
    assert shrinkage < 0.05 and np.allclose(np.diag(cov), np.arange(1, 11) ** 2, rtol=0.1)
    few = rng.normal(size=(10, 50))
    cov, shrinkage = ledoit_wolf(few - few.mean(axis=0))
    assert shrinkage > 0.5 and np.linalg.matrix_rank(cov) == 50  # invertible though n < d


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="labels"):
        logme(np.zeros((4, 2)), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="NaN"):
        logme(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]))
