"""Cross-validated linear probe: accuracy on data whose answer is known, folds, per-fold standardisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transfer_cases.advise.probe import fit_folds, linear_probe_accuracy, stratified_folds, torch_threads
from transfer_cases.utils.errors import DataError


def blobs(n: int, classes: int, d: int, strength: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    features = rng.normal(size=(n, d))
    features[:, :classes] += strength * np.eye(classes)[labels]
    return features, labels


def test_linearly_separable_features_reach_full_accuracy() -> None:
    features, labels = blobs(200, 4, 20, strength=8.0)
    result = linear_probe_accuracy(features, labels)
    assert result.mean >= 0.99
    assert len(result.folds) == 5


def test_random_labels_stay_near_chance() -> None:
    features, _ = blobs(400, 4, 20, strength=0.0)
    labels = np.random.default_rng(1).integers(0, 4, 400)
    result = linear_probe_accuracy(features, labels)
    assert 0.15 <= result.mean <= 0.35
    assert result.std > 0
    assert result.sem == pytest.approx(result.std / np.sqrt(5))


@pytest.mark.parametrize("scaling", ["shared", "feature"])
def test_large_feature_offsets_do_not_change_the_result(scaling: str) -> None:
    # Pooled activations can sit far from zero; the folded-in standardisation must not cancel in float32.
    features, labels = blobs(120, 3, 10, strength=1.5)
    shifted = features + 1e6
    # What float32 keeps of the shifted features, shifted back exactly: the same input, offset.
    kept = shifted.astype(np.float32).astype(np.float64) - 1e6
    assert linear_probe_accuracy(shifted, labels, scaling=scaling).folds == (
        linear_probe_accuracy(kept, labels, scaling=scaling).folds
    )


@pytest.mark.parametrize("scaling", ["feature", "shared"])
def test_folds_are_fitted_like_separate_probes_on_train_scaled_features(scaling: str) -> None:
    """The batched fit equals k independent fits, each centred and scaled with its training rows only."""
    with torch_threads(1):  # tiny matrices: extra threads only wait for each other
        _check_batched_fit_against_separate_fits(scaling)


def test_shared_scaling_keeps_the_features_as_the_head_sees_them() -> None:
    # A wide stage: 4 informative features of unit spread beside 200 of pure noise a hundred times
    # smaller. Standardising each feature blows the noise up to the signal's size and the probe of
    # 20 samples per class falls towards chance; one shared scale leaves it where the head finds it.
    features, labels = blobs(40, 2, 4, strength=3.0, seed=5)
    noise = np.random.default_rng(6).normal(scale=0.01, size=(40, 200))
    wide = np.concatenate([features, noise], axis=1)
    shared = linear_probe_accuracy(wide, labels, scaling="shared").mean
    standardised = linear_probe_accuracy(wide, labels, scaling="feature").mean
    assert shared >= 0.9 and shared >= standardised + 0.1


def _check_batched_fit_against_separate_fits(scaling: str) -> None:
    features, labels = blobs(60, 3, 6, strength=1.0, seed=3)
    features = features * np.linspace(0.5, 5, 6) + np.linspace(-3, 3, 6)  # unequal scales and offsets
    x = torch.as_tensor(features)
    y = torch.as_tensor(labels)
    tests = stratified_folds(labels, 5, seed=0)
    train = torch.ones(60, len(tests), dtype=torch.bool)
    for f, t in enumerate(tests):
        train[t, f] = False
    l2 = 0.05
    batched = fit_folds(x, y, train, 3, l2, max_iter=500, scaling=scaling)
    for f in range(len(tests)):
        rows = train[:, f]
        mean, std = x[rows].mean(0), x[rows].std(0, correction=0)
        if scaling == "shared":
            std = std.pow(2).mean().sqrt()
        z = (x - mean) / std
        w = torch.zeros(6, 3, dtype=x.dtype, requires_grad=True)
        b = torch.zeros(3, dtype=x.dtype, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

        def closure(z: torch.Tensor = z, rows: torch.Tensor = rows, w=w, b=b, opt=optimizer) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z[rows] @ w + b, y[rows]) + l2 / 2 * w.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        expected = (z @ w + b).detach()
        torch.testing.assert_close(batched[:, f], expected, atol=1e-4, rtol=1e-4)


def test_stratified_folds_partition_every_class_evenly() -> None:
    labels = np.array([0] * 12 + [1] * 7 + [2] * 5)
    folds = stratified_folds(labels, 5, seed=0)
    assert len(folds) == 5
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
    for c in range(3):
        per_fold = [int((labels[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1
    assert [f.tolist() for f in stratified_folds(labels, 5, seed=0)] == [f.tolist() for f in folds]
    assert [f.tolist() for f in stratified_folds(labels, 5, seed=1)] != [f.tolist() for f in folds]


def test_fewer_folds_when_a_class_is_small() -> None:
    labels = np.array([0] * 10 + [1] * 3)
    assert len(stratified_folds(labels, 5)) == 3
    assert len(stratified_folds(np.array([0, 0, 0, 1]), 5)) == 2  # never fewer than 2
    features, _ = blobs(13, 2, 4, strength=6.0)
    assert len(linear_probe_accuracy(features, labels).folds) == 3


def test_one_class_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="at least 2 classes"):
        linear_probe_accuracy(np.zeros((10, 3)), np.zeros(10, dtype=int))


def test_thread_setting_is_restored() -> None:
    features, labels = blobs(40, 2, 4, strength=2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        linear_probe_accuracy(features, labels, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
