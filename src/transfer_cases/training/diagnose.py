"""Warnings about a finished fit that a user would otherwise miss: a model that learned its training
images but predicts the validation images little better than chance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Val must keep at least this share of train's gain over chance, or the fit "did not generalise".
MIN_KEPT_GAIN = 0.25


def collapse_warning(metrics: Mapping[str, float], val_labels: Sequence[int] | np.ndarray) -> str | None:
    """A message when train accuracy is high and val accuracy close to chance, else None.

    Chance is the rate of the most frequent val class (what always answering it scores). "High" is
    more than halfway from chance to 1. "Close to chance" is relative to what training achieved:
    val keeps less than `MIN_KEPT_GAIN` of train's gain over chance (binary, train 1.0: val < 0.625;
    10 classes, train 1.0: val < 0.325), so the rule means the same for 2 classes or 100.
    """
    train, val = metrics.get("train/acc"), metrics.get("val/acc")
    labels = np.asarray(val_labels)
    if train is None or val is None or labels.size == 0:
        return None
    chance = float(np.bincount(labels).max() / labels.size)
    if train < chance + 0.5 * (1 - chance) or val - chance >= MIN_KEPT_GAIN * (train - chance):
        return None
    return (
        f"train accuracy {train:.3f} but val accuracy {val:.3f}, close to chance ({chance:.3f}, always "
        "answering the largest class): the model fits its training images and does not generalise. "
        "Likely causes: too few images to fine-tune the body (try a small_* case, or let the advisor "
        "choose: transfer-advise, or case=auto); BatchNorm statistics adapted to small batches of "
        "different images (try case.bn_mode=eval); a body learning rate that is too high or too low "
        "(case.body_lr_scale); train and val images that differ (preprocessing, classes, sources)."
    )
