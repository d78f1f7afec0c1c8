"""A resume with a longer `trainer.max_epochs` follows the learning-rate schedule of the new plan from
the restored epoch: the restored cosine must not keep the old `T_max` and climb back up."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.test_resume import metric_rows, overrides
from transfer_cases.commands.train import train

LR = 0.01
KEY = "lr-AdamW/head"


def cosine(epoch: int, epochs: int) -> float:
    """CosineAnnealingLR's closed form (eta_min 0)."""
    return LR * (1 + math.cos(math.pi * epoch / epochs)) / 2


def test_resume_with_more_epochs_follows_the_longer_cosine(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    base = overrides(image_folder, f"model.optimizer.lr={LR}")
    train(compose_train(*base, "trainer.max_epochs=2"))
    last = run / "checkpoints" / "last.ckpt"
    train(compose_train(*base, "trainer.max_epochs=4", f"ckpt_path={last}"))
    lrs = [float(r[KEY]) for r in metric_rows(run) if r.get(KEY)]
    assert len(lrs) == 4, lrs
    # Epochs 0 and 1 ran on the 2-epoch plan; 2 and 3 on the 4-epoch plan at those epochs.
    expected = [cosine(0, 2), cosine(1, 2), cosine(2, 4), cosine(3, 4)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-9), lrs
    assert all(a >= b for a, b in itertools.pairwise(lrs)), lrs  # never climbs back
