"""A resumed run continues with the body it was trained with, on real pretrained weights.

The embedded MobileNetV2's un-restored body (built without its weights file, as a resume builds it)
differs from the restored one, so features extracted before the checkpoint's weights are in the body
would be a random network's: these tests compare a resumed run with an uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from tests.helpers.lightning import Interrupted
from tests.test_resume import EVERY_EPOCH, QUIET
from transfer_cases import build
from transfer_cases.commands.train import train
from transfer_cases.training.callbacks import frozen_digest
from transfer_cases.training.module import TransferModule

REAL = (
    "data=hymenoptera",
    "backbone=mobilenet_v2",
    "data.image_size=64",  # small images keep the passes short; the body is the real one
    "data.num_workers=0",
    "cache.extraction=fp32",
    *QUIET,
    EVERY_EPOCH,
)
STOP = "+callbacks.stop._target_=tests.helpers.lightning.StopAt"


def run(
    compose: Callable[..., DictConfig], tmp: Path, name: str, *extra: str, cache: str = "cache"
) -> dict[str, Any]:
    """A run in folder `name` with feature cache `cache` (relative to it): the resumed runs get their
    own, so that what they compare is what they extracted themselves."""
    out = tmp / name
    return train(compose(*REAL, f"paths.output_dir={out}", f"paths.cache_dir={out}/{cache}", *extra))


def train_features(report: dict[str, Any]) -> torch.Tensor:
    return torch.from_numpy(np.load(Path(report["files"]["train"]["path"]) / "features.npy"))


def test_a_resumed_head_trains_on_the_pretrained_body_features(
    compose_train: Callable[..., DictConfig], tmp_path: Path
) -> None:
    case = ("case=small_similar", "trainer.max_epochs=10")
    whole = run(compose_train, tmp_path, "whole", *case)
    with pytest.raises(Interrupted):
        run(compose_train, tmp_path, "cut", *case, STOP, "+callbacks.stop.epoch=5", cache="../whole/cache")
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    restored, _ = build(compose_train(*REAL, *case, f"ckpt_path={last}"))
    unrestored = TransferModule(**{**restored.hparams, "load_pretrained": False})  # before the restore
    assert frozen_digest(unrestored) != frozen_digest(restored)  # so a too-early extraction would show
    resumed = run(compose_train, tmp_path, "cut", *case, f"ckpt_path={last}", cache="resumed_cache")
    assert resumed["epochs"] == whole["epochs"] == 10
    assert not resumed["feature_cache"]["files"]["train"]["hit"]  # extracted by the resumed run itself
    assert torch.equal(train_features(resumed["feature_cache"]), train_features(whole["feature_cache"]))
    assert whole["metrics"]["val/acc"] > 0.7  # the pretrained body's features, far above chance (0.5)
    assert abs(resumed["metrics"]["val/acc"] - whole["metrics"]["val/acc"]) <= 0.03


def test_lp_ft_resumed_in_its_warm_up_probes_the_pretrained_body(
    compose_train: Callable[..., DictConfig], tmp_path: Path
) -> None:
    case = ("case=large_similar", "case.probe_epochs=10", "trainer.max_epochs=1")
    with pytest.raises(Interrupted):
        run(compose_train, tmp_path, "cut", *case, STOP, "+callbacks.stop.epoch=5")
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["phase"] == "probe"
    resumed = run(compose_train, tmp_path, "cut", *case, f"ckpt_path={last}", cache="resumed_cache")
    probe = resumed["phases"]["probe"]
    path = Path(probe["feature_cache"]["files"]["train"]["path"])
    assert path.parent.parent.name == "resumed_cache"  # extracted by the resumed run itself
    # The interrupted run probed the pretrained body: the resumed run's file has the same key (the
    # body's fingerprint is part of it) and the same features.
    before = tmp_path / "cut" / "cache" / "features" / path.name
    assert torch.equal(
        train_features(probe["feature_cache"]), torch.from_numpy(np.load(before / "features.npy"))
    )
    assert probe["val/acc"] > 0.7  # the pretrained body's features (a random body's probe: about 0.5)
