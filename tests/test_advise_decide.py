"""The advisor's policy: on per-stage rows, and on feature matrices whose answer is known by construction."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import pytest
import torch

from transfer_cases.advise import StageScores, decide, score_stages, scores
from transfer_cases.advise.decide import Rules, best_stage
from transfer_cases.advise.scores import nested_subsets, stratified_subset
from transfer_cases.utils.errors import DataError

SMALL = {c: 20 for c in ("a", "b", "c", "d")}
LARGE = {c: 2000 for c in ("a", "b", "c", "d")}


def rows(
    pretrained: Iterable[float], random: Iterable[float] | None = None, std: float = 0.02
) -> list[StageScores]:
    pretrained = list(pretrained)
    random = list(random) if random is not None else [0.3] * len(pretrained)
    return [
        StageScores(
            stage=i + 1,
            width=16 * 2**i,
            logme_pretrained=p,  # LogME follows the probe here; it only breaks exact ties
            logme_random=r,
            probe_pretrained=p,
            probe_pretrained_std=std,
            probe_random=r,
            probe_random_std=std,
        )
        for i, (p, r) in enumerate(zip(pretrained, random, strict=True))
    ]


@pytest.mark.parametrize(
    "counts, accuracies, case, overrides, keep, freeze",
    [
        (SMALL, [0.5, 0.7, 0.8, 0.9], "small_similar", ["case=small_similar"], None, "all"),
        (SMALL, [0.5, 0.9, 0.7, 0.6], "small_different", ["case=small_different", "case.keep=2"], 2, "all"),
        (LARGE, [0.5, 0.7, 0.8, 0.9], "large_similar", ["case=large_similar"], None, "none"),
        (LARGE, [0.5, 0.9, 0.7, 0.6], "large_different", ["case=large_different"], None, "none"),
    ],
)
def test_the_four_cases(counts, accuracies, case, overrides, keep, freeze) -> None:
    advice = decide(counts, rows(accuracies))
    assert (advice.case, list(advice.overrides), advice.keep, advice.freeze) == (
        case,
        overrides,
        keep,
        freeze,
    )
    assert advice.init == "pretrained"
    assert advice.warnings == ()


def test_size_uses_the_median_and_reports_the_minimum_and_the_threshold_source() -> None:
    counts = {"a": 5, "b": 150, "c": 160}
    advice = decide(counts, rows([0.5, 0.9]), small_max_per_class=100, threshold_source="measured by test")
    assert advice.size == "large"
    assert (advice.per_class_median, advice.per_class_min) == (150, 5)
    assert "measured by test" in advice.reasoning[0] and "min 5" in advice.reasoning[0]
    assert decide(counts, rows([0.5, 0.9]), small_max_per_class=151).size == "small"


def test_a_tie_with_the_full_body_keeps_it() -> None:
    # Stage 2 peaks, the full body is within a point of it: cutting needs a clearly better stage.
    advice = decide(SMALL, rows([0.5, 0.900, 0.7, 0.895], std=0.001))
    assert (advice.case, advice.best_stage, advice.keep) == ("small_similar", 4, None)
    assert "the full body ties" in advice.reasoning[1]
    # The rule before the crossover study: the narrowest of the tied stages.
    advice = decide(SMALL, rows([0.5, 0.900, 0.7, 0.895], std=0.001), full_body_on_tie=False)
    assert (advice.case, advice.best_stage, advice.keep) == ("small_different", 2, 2)
    # Within one standard error of the peak (std 0.1 over 5 folds: 0.045) is a tie too ...
    assert decide(SMALL, rows([0.5, 0.7, 0.90, 0.86], std=0.1)).best_stage == 4
    # ... but a clear gap is not: the body is cut at the peak.
    advice = decide(SMALL, rows([0.5, 0.7, 0.90, 0.85], std=0.02))
    assert (advice.case, advice.best_stage, advice.keep) == ("small_different", 3, 3)


def test_ties_without_the_full_body_go_to_the_narrowest_features() -> None:
    # Stage 3 peaks, stage 2 is within a point of it, the full body is not: the narrower features
    # win (a head with fewer parameters to fit from 20 samples per class).
    advice = decide(SMALL, rows([0.5, 0.895, 0.900, 0.7], std=0.001))
    assert (advice.case, advice.best_stage, advice.keep) == ("small_different", 2, 2)
    assert "narrowest" in advice.reasoning[1]


def test_the_tolerance_is_the_standard_error_of_the_peak_not_of_the_difference() -> None:
    # Peak std 0.05 (SE 0.022); stage 1 std 0.2 (SE 0.089): 0.04 below the peak is inside the
    # combined SE (0.092) but outside the peak's own, so the noisier stage does not tie.
    noisy = rows([0.86], std=0.2)[0]
    peak = replace(rows([0.90], std=0.05)[0], stage=2)
    assert decide(SMALL, [noisy, peak]).best_stage == 2


def test_parsimony_is_width_first_then_depth() -> None:
    # A deeper stage with narrower features (a bottleneck) is the more parsimonious tie ...
    first, second, last = rows([0.80, 0.80, 0.70], std=0.001)
    assert decide(SMALL, [replace(first, width=512), second, last]).best_stage == 2
    # ... and at equal width the shallower stage (fewer layers to run).
    assert decide(SMALL, [first, replace(second, width=first.width), last]).best_stage == 1


def test_tie_thresholds_are_parameters() -> None:
    accuracies = [0.5, 0.7, 0.87, 0.90, 0.60]
    assert decide(SMALL, rows(accuracies, std=0.0)).best_stage == 4
    assert decide(SMALL, rows(accuracies, std=0.0), tie_margin=0.05).best_stage == 3
    assert decide(SMALL, rows(accuracies, std=0.05)).best_stage == 4
    assert decide(SMALL, rows(accuracies, std=0.05), tie_sems=2).best_stage == 3


def test_how_clear_a_gain_over_random_must_be_is_a_parameter() -> None:
    # Gain 0.05; standard error of the difference hypot(0.05, 0.05) / sqrt(5) = 0.032.
    pretrained, random = [0.6, 0.85], [0.6, 0.80]
    assert decide(SMALL, rows(pretrained, random, std=0.05)).similarity == "similar"
    # Two standard errors (0.063) make the gain unclear: too noisy to call the features unrelated ...
    unclear = decide(SMALL, rows(pretrained, random, std=0.05), related_sems=2)
    assert (unclear.similarity, unclear.case) == ("similar", "small_similar")
    assert "too noisy to tell" in unclear.reasoning[3]
    # ... which the rule before the crossover study did.
    old = decide(SMALL, rows(pretrained, random, std=0.05), related_sems=2, unrelated_needs_evidence=False)
    assert old.similarity == "unrelated"
    assert decide(SMALL, rows(pretrained, random, std=0.0), related_margin=0.06).similarity == "unrelated"


def test_unrelated_needs_the_whole_band_within_the_margin() -> None:
    # Pretrained 0.01 behind random: with std 0.02 (band 0.013) clearly no better -> unrelated;
    # with std 0.1 (band 0.063) the probes cannot tell -> the pretrained verdict stands.
    pretrained, random = [0.6, 0.80], [0.6, 0.81]
    assert decide(SMALL, rows(pretrained, random, std=0.02)).similarity == "unrelated"
    noisy = decide(SMALL, rows(pretrained, random, std=0.1))
    assert (noisy.similarity, noisy.case, noisy.init) == ("similar", "small_similar", "pretrained")
    assert noisy.warnings == ()


def test_pretrained_no_better_than_random_is_unrelated() -> None:
    pretrained, random = [0.6, 0.8, 0.7], [0.6, 0.81, 0.5]
    large = decide(LARGE, rows(pretrained, random))
    assert large.similarity == "unrelated"
    assert list(large.overrides) == ["case=large_different", "case.init=scratch"]
    assert (large.init, large.freeze) == ("scratch", "none")
    small = decide(SMALL, rows(pretrained, random))
    assert (small.case, list(small.overrides), small.init) == (
        "large_different",
        ["case=large_different"],
        "pretrained",
    )
    assert any("too small for any case" in w for w in small.warnings)


def test_the_control_is_the_random_network_at_its_own_best_stage() -> None:
    # Pretrained peaks at stage 1 (random there: 0.5), but a random network cut at stage 2 does as well.
    advice = decide(LARGE, rows([0.9, 0.7], [0.5, 0.9], std=0.0))
    assert advice.similarity == "unrelated"
    assert "stage 2" in advice.reasoning[3]


def test_features_that_separate_nothing_are_flagged() -> None:
    advice = decide(SMALL, rows([0.26, 0.25, 0.24], [0.25, 0.26, 0.25], std=0.005))
    assert advice.similarity == "unrelated"
    assert any("no stage separates the classes" in w for w in advice.warnings)


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match="at least 2 classes"):
        decide({"a": 10}, rows([0.9]))
    with pytest.raises(ValueError, match="distinct"):
        decide(SMALL, rows([0.9]) * 2)


# --- feature matrices whose answer is known by construction ------------------------------------------


def stage_features(
    labels: np.ndarray,
    informative: Iterable[int],
    depth: int = 4,
    width: int = 16,
    seed: int = 0,
    strength: float = 6.0,
) -> list[np.ndarray]:
    """Noise at every stage, plus class means `strength` noise units apart at the `informative` stages."""
    rng = np.random.default_rng(seed)
    onehot = np.eye(labels.max() + 1)[labels]
    features = [rng.normal(size=(len(labels), width)) for _ in range(depth)]
    for stage in informative:
        features[stage - 1][:, : onehot.shape[1]] += strength * onehot
    return features


def advise_on(
    per_class: int,
    informative: Iterable[int],
    random_informative: Iterable[int] = (),
    strength: float = 6.0,
):
    labels = np.repeat(np.arange(4), per_class)
    pretrained = stage_features(labels, informative, seed=1, strength=strength)
    random = stage_features(labels, random_informative, seed=2, strength=strength)
    counts = {f"class{c}": per_class for c in range(4)}
    return decide(counts, score_stages(pretrained, random, labels))


def test_labels_separable_at_stage_2_only_cut_there() -> None:
    advice = advise_on(20, informative=[2])
    assert (advice.case, advice.keep, advice.freeze) == ("small_different", 2, "all")
    assert advice.logme_best_stage == 2


def test_labels_separable_at_the_last_stage_keep_the_body() -> None:
    assert advise_on(20, informative=[4]).case == "small_similar"


def test_many_samples_and_a_saturated_probe_train_the_head_alone() -> None:
    # Well-separated classes: the probe is perfect from a quarter of the samples on. 300 per class
    # is large by count, but no error is left for fine-tuning to remove: the cheaper head-only case.
    similar = advise_on(300, informative=[4])
    assert similar.stages[3].curve_acc == (1.0, 1.0, 1.0)
    assert (similar.size, similar.case, similar.freeze, similar.keep) == (
        "large",
        "small_similar",
        "all",
        None,
    )
    assert "-> fine-tuning would not gain enough -> head-only" in similar.reasoning[-2]
    assert similar.gain is not None and similar.gain.gain < 0.01 and similar.gain.confidence == "clear"
    different = advise_on(300, informative=[2])
    assert (different.case, different.keep, different.freeze) == ("small_different", 2, "all")


def test_many_samples_and_features_far_from_solving_the_task_fine_tune() -> None:
    # Half-separated classes: the probe stays near 0.7 however many samples it gets, far from what
    # adapted features could reach: with 300 per class (twice the break-even count), fine-tuning.
    similar = advise_on(300, informative=[4], strength=1.5)
    assert similar.stages[3].probe_pretrained < 0.85
    assert (similar.size, similar.case, similar.freeze) == ("large", "large_similar", "none")
    assert "-> fine-tuning should gain -> fine-tune" in similar.reasoning[-2]
    assert advise_on(300, informative=[2], strength=1.5).case == "large_different"


def curve_rows(curve: Iterable[float], std: float = 0.01) -> list[StageScores]:
    """Two stages; the full body's probe has the learning curve `curve` (25, 50, 100 per class)."""
    curve = tuple(curve)
    first, last = rows([0.5, curve[-1]], std=std)
    last = replace(last, curve_per_class=(25, 50, 100), curve_acc=curve, curve_std=(std,) * len(curve))
    return [first, last]


def test_fine_tuning_needs_error_left_at_the_users_count_not_a_count_alone() -> None:
    # The same probe (0.80 at 100 per class, flat): 2000 per class fine-tunes, 20 per class does
    # not (below the break-even), and a saturated probe (0.995) does not at 2000 either.
    flat = curve_rows([0.80, 0.80, 0.80])
    assert decide(LARGE, flat).case == "large_similar"
    assert decide(SMALL, flat).case == "small_similar"
    assert decide(LARGE, curve_rows([0.995, 0.995, 0.995], std=0.001)).case == "small_similar"
    # Unclear evidence (a band straddling the gain that pays) goes to the head alone, and says so.
    unclear = decide(LARGE, curve_rows([0.97, 0.97, 0.97], std=0.05))
    assert unclear.case == "small_similar" and unclear.gain.confidence == "unclear"
    assert "unclear -> head-only (cheaper, cannot collapse)" in unclear.reasoning[-2]


def test_the_gain_rule_is_shown_with_its_source() -> None:
    advice = decide(LARGE, curve_rows([0.80, 0.80, 0.80]), finetune_source="from a test")
    assert "(rule: from a test)" in advice.reasoning[-2] and advice.gain.source == "from a test"
    # Scores without a learning curve: the probe's own error, not extrapolated.
    line = decide(LARGE, rows([0.5, 0.9])).reasoning[-2]
    assert line.startswith("no learning curve; error ~ n^-0.00, head-only at 2000/class 0.900")


def test_solved_features_no_better_than_random_ones_say_so_without_a_contradiction() -> None:
    # The random network solves it too: the gain (+0.005) is no clear gain, but the pretrained
    # features already separate the classes, which is why they are not "unrelated".
    advice = decide(SMALL, rows([0.7, 0.995], [0.6, 0.99], std=0.01))
    assert advice.similarity == "similar"
    line = advice.reasoning[3]
    assert "beats" not in line
    assert line.startswith("gain over the random network +0.005 <= 0.010, but the pretrained features")
    assert "already solve the task (peak 0.995 >= 1 - 0.02) -> not unrelated" in line


def test_pretrained_features_no_better_than_random_ones_recommend_fine_tuning_or_scratch() -> None:
    # Random features half-separate the classes, pretrained ones not at all: clearly unrelated, and
    # with 150 per class (large) trained from scratch.
    large = advise_on(150, informative=[], random_informative=[2], strength=1.5)
    assert max(s.probe_pretrained for s in large.stages) < 0.4 < max(s.probe_random for s in large.stages)
    assert (large.similarity, large.case, large.init) == ("unrelated", "large_different", "scratch")
    # Both half-separate them (about 0.6-0.8 probe accuracy), on 20 per class: the probes cannot
    # tell the networks apart, so the head alone on the pretrained features (the rule before the
    # crossover study fine-tuned everything here).
    small = advise_on(20, informative=[2], random_informative=[2], strength=1.5)
    assert small.stages[1].probe_pretrained < 0.95
    assert (small.similarity, small.case, small.keep) == ("different", "small_different", 2)
    assert any("too noisy to tell" in line for line in small.reasoning)
    old = decide(small.samples_per_class, small.stages, rules=Rules(unrelated_needs_evidence=False))
    assert (old.similarity, old.case, old.init) == ("unrelated", "large_different", "pretrained")


def test_features_that_already_separate_the_classes_are_not_unrelated() -> None:
    # Random features solve this easy task too, but the pretrained ones do: keep them frozen.
    advice = advise_on(20, informative=[2], random_informative=[2])
    assert advice.stages[1].probe_pretrained >= 0.98
    assert (advice.similarity, advice.case, advice.keep) == ("different", "small_different", 2)


def test_score_stages_fills_every_row() -> None:
    labels = np.repeat(np.arange(3), 10)
    pretrained = stage_features(labels, [1], depth=2, width=8)
    random = [np.zeros_like(f) for f in pretrained]
    scores = score_stages(pretrained, random, labels, strides=[4, 8])
    assert [(s.stage, s.width, s.stride, s.folds) for s in scores] == [(1, 8, 4, 5), (2, 8, 8, 5)]
    assert scores[0].probe_pretrained > scores[1].probe_pretrained
    assert scores[0].logme_pretrained > scores[1].logme_pretrained
    assert scores[0].probe_random == pytest.approx(1 / 3, abs=0.1)  # constant features: one class wins
    # H-score (shrinkage-based) beside LogME, and the probe's learning curve on nested subsets.
    assert scores[0].h_score_pretrained > scores[1].h_score_pretrained
    assert scores[0].h_score_random == pytest.approx(0.0, abs=1e-12)  # constant features explain nothing
    assert [s.curve_per_class for s in scores] == [(3, 5, 10)] * 2
    assert scores[0].curve_acc[-1] == scores[0].probe_pretrained  # the last point is the probe itself
    assert scores[0].curve_std[-1] == scores[0].probe_pretrained_std


def test_the_curve_can_be_fitted_at_the_best_stage_alone_with_the_same_points() -> None:
    labels = np.repeat(np.arange(3), 12)
    pretrained = stage_features(labels, [1, 3], depth=3, width=8)
    random = [np.zeros_like(f) for f in pretrained]
    every = score_stages(pretrained, random, labels)
    asked = []

    def at_best(rows: list) -> int:
        asked.append([r.curve_acc for r in rows])  # the probes are done, no curve yet
        return best_stage(rows)[3].stage

    best = score_stages(pretrained, random, labels, curve_at=at_best)
    assert asked == [[(), (), ()]]
    chosen = best_stage(every)[3].stage
    for full, lean in zip(every, best, strict=True):
        assert replace(full, curve_per_class=(), curve_acc=(), curve_std=()) == replace(
            lean, curve_per_class=(), curve_acc=(), curve_std=()
        )
        assert lean.curve_acc == (full.curve_acc if full.stage == chosen else ())
    lean, full = (decide({"a": 12, "b": 12, "c": 12}, rows) for rows in (best, every))
    assert (lean.case, lean.keep, lean.gain, lean.reasoning) == (
        full.case,
        full.keep,
        full.gain,
        full.reasoning,
    )


def test_the_stages_are_scored_on_torchs_threads_one_intra_op_thread_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    labels = np.repeat(np.arange(3), 12)
    pretrained = stage_features(labels, [1, 3], depth=3, width=8)
    random = [np.zeros_like(f) for f in pretrained]
    alone = score_stages(pretrained, random, labels)
    fitted = scores.linear_probe_accuracy
    seen: list[tuple[str, int]] = []

    def recording(*args: object, **kwargs: object) -> object:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.05)  # long enough that an idle second worker takes the next task
        return fitted(*args, **kwargs)

    monkeypatch.setattr(scores, "linear_probe_accuracy", recording)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = score_stages(pretrained, random, labels)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(previous)
    assert len({name for name, _ in seen}) == 2 and {n for _, n in seen} == {1}
    assert together == alone  # independent fits: the same scores whichever thread ran them


def test_learning_curve_subsets_are_nested_and_stratified() -> None:
    labels = np.array([0] * 40 + [1] * 20 + [2] * 7)
    quarter, half = nested_subsets(labels, (0.25, 0.5), seed=1)
    assert set(quarter) < set(half)
    assert [np.sum(labels[quarter] == c) for c in range(3)] == [10, 5, 2]  # rounded up
    assert [np.sum(labels[half] == c) for c in range(3)] == [20, 10, 4]
    # A fraction leaving a class with one sample (no cross-validation) is skipped.
    assert [len(s) for s in nested_subsets(np.repeat([0, 1], 4), (0.25, 0.5))] == [4]


def test_stratified_subset_keeps_class_proportions() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    subset = stratified_subset(labels, 200, seed=0)
    assert (np.sum(labels[subset] == 0), np.sum(labels[subset] == 1)) == (180, 20)
    assert np.all(np.diff(subset) > 0)
    assert len(stratified_subset(labels, None)) == 1000
