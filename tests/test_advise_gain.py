"""The predicted fine-tuning gain: its extrapolation, each parameter moving the decision, and
synthetic features where fine-tuning must win and where the head alone must."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transfer_cases.advise import StageScores, decide, score_stages
from transfer_cases.advise.decide import Advice, Rules
from transfer_cases.advise.gain import predict_gain

# The rule's free parameters as these tests assume them (the shipped ones are refitted on studies).
RULES = Rules(break_even_per_class=100, finetune_exponent=1.0)
# The probe's error falls exactly as n^-0.5 (0.2, 0.141, 0.1 at 20, 40, 80 images trained on).
POWER_LAW = (0.8, 1 - 0.2 / math.sqrt(2), 0.9)


def stage(curve=POWER_LAW, std: float = 0.01) -> StageScores:
    return StageScores(
        stage=1,
        width=16,
        logme_pretrained=0.0,
        logme_random=0.0,
        probe_pretrained=curve[-1],
        probe_pretrained_std=std,
        probe_random=0.3,
        probe_random_std=std,
        curve_per_class=(25, 50, 100),
        curve_acc=tuple(curve),
        curve_std=(std,) * len(curve),
    )


def test_the_head_only_error_is_the_probes_power_law_extrapolated_to_the_users_count() -> None:
    p = predict_gain(stage(), 400, 10, RULES)
    assert p.trained_per_class == (20, 40, 80)  # each probe trains on 4 of its 5 folds
    assert p.exponent == pytest.approx(0.5)
    assert p.head_acc == pytest.approx(1 - 0.1 * (400 / 80) ** -0.5)
    assert p.gain == pytest.approx((1 - p.head_acc) * (1 - 100 / 400))  # n0 = 100, beta = 1
    assert p.head_acc_at(80) == pytest.approx(0.9) and p.head_acc_at(400) == pytest.approx(p.head_acc)
    # At or below the probe's own count nothing is extrapolated; below n0 the gain is negative.
    low = predict_gain(stage(), 50, 10, RULES)
    assert low.head_acc == pytest.approx(0.9) and low.gain < 0 and not low.finetune
    # The exponent is capped: a curve falling as n^-1 is extrapolated as n^-0.5.
    steep = predict_gain(stage((0.6, 0.8, 0.9)), 400, 10, RULES)
    assert steep.exponent == 0.5


@pytest.mark.parametrize(
    "changes",
    [
        {"min_gain": 0.04},  # the gain (0.034) no longer pays
        {"min_gain": 0.03, "gain_sems": 3},  # 0.034 - 3 x 0.0015 < 0.03: unclear
        {"break_even_per_class": 350},  # 400 per class is barely past the break-even
        {"finetune_exponent": 0.1},  # fine-tuning takes the head's error slowly
    ],
)
def test_each_parameter_moves_the_decision_to_the_head_alone(changes: dict) -> None:
    counts = {f"c{i}": 400 for i in range(10)}
    assert decide(counts, [stage()], rules=RULES).case == "large_similar"
    advice = decide(counts, [stage()], rules=RULES, **changes)
    assert advice.case == "small_similar" and not advice.gain.finetune


def test_a_lower_cap_on_the_exponent_leaves_the_head_more_error_and_fine_tunes() -> None:
    counts = {f"c{i}": 400 for i in range(10)}
    assert decide(counts, [stage()], rules=RULES, min_gain=0.05).case == "small_similar"
    assert (
        decide(counts, [stage()], rules=RULES, min_gain=0.05, curve_exponent_max=0.1).case == "large_similar"
    )


def features(labels: np.ndarray, strength: float, width: int, seed: int) -> np.ndarray:
    """Gaussian classes whose means are `strength` noise units apart, spread over `width` dimensions."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(labels.max() + 1, width)) * strength / np.sqrt(width)
    return rng.normal(size=(len(labels), width)) + means[labels]


def advise(strength: float, width: int, per_class: int) -> Advice:
    """The advisor's view: 100 images per class extracted, `per_class` in the user's data."""
    labels = np.repeat(np.arange(10), 100)
    pretrained = [features(labels, 0.5, 16, 1), features(labels, strength, width, 2)]
    random = [features(labels, 0.3, 16, 3), features(labels, 0.3, 16, 4)]
    return decide({f"c{c}": per_class for c in range(10)}, score_stages(pretrained, random, labels))


def test_features_that_need_adapting_and_many_images_fine_tune() -> None:
    # Classes spread thin over 256 dimensions: the probe is far from solving the task at 100 per
    # class and still climbing; with 1000 per class fine-tuning should gain, clearly.
    advice = advise(strength=2.5, width=256, per_class=1000)
    acc = advice.stages[-1].curve_acc
    assert acc[-1] < 0.75 and acc[-1] - acc[0] > 0.05
    assert (advice.case, advice.gain.finetune, advice.gain.confidence) == ("large_similar", True, "clear")
    assert advice.gain.gain > 0.05
    # The same features with 20 images per class: the head alone.
    assert advise(strength=2.5, width=256, per_class=20).case == "small_similar"


def test_a_saturated_probe_with_high_accuracy_trains_the_head_alone() -> None:
    # Well-separated classes: the probe is near perfect from a quarter of the images on; however
    # many images there are, fine-tuning has nothing left to gain.
    advice = advise(strength=8.0, width=16, per_class=1000)
    assert min(advice.stages[-1].curve_acc) > 0.98
    assert (advice.case, advice.gain.finetune, advice.gain.confidence) == ("small_similar", False, "clear")
    assert advice.gain.gain < 0.01


def test_advice_round_trips_the_prediction_and_its_curve() -> None:
    advice = decide({f"c{i}": 400 for i in range(10)}, [stage()], rules=RULES)
    record = advice.to_dict()
    assert tuple(record["gain"]["curve_acc"]) == POWER_LAW and record["gain"]["per_class"] == 400
    again = Advice.from_dict(record)
    assert again == advice and again.gain.curve_per_class == (25, 50, 100)
    old = {k: v for k, v in record.items() if k != "gain"}  # advice.json written before the gain
    assert Advice.from_dict(old).gain is None
