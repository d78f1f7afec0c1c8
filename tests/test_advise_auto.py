"""`case=auto` around the advisor: the config checked before it runs, the user's settings kept or
dropped with a note, one advisor under DDP, and the equivalent command with the user's overrides."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from transfer_cases.advise import Advice, StageScores, auto, decide, read_advice, write_advice
from transfer_cases.commands.train import train
from transfer_cases.training.cases import Case
from transfer_cases.utils.errors import ConfigError

RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_LOCALID", "GROUP_RANK")


def advice_for(per_class: int) -> Advice:
    """A full-body advice: head-only (small_similar) for 20 per class, fine-tuning for 2000."""
    rows = [StageScores(i + 1, 16 * 2**i, a, -1.0, a, 0.02, 0.3, 0.02) for i, a in enumerate((0.6, 0.9))]
    return decide({"ants": per_class, "bees": per_class}, rows)


class FakeAdvisor:
    """Stands in for `advise_from_config`: records its calls, returns a fixed advice."""

    def __init__(self, advice: Advice) -> None:
        self.advice = advice
        self.calls: list[dict[str, Any]] = []

    def __call__(self, cfg: DictConfig, **kwargs: Any) -> tuple[Advice, dict[str, float]]:
        self.calls.append(kwargs)
        return self.advice, {"total_s": 1.0}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[[Advice], FakeAdvisor]:
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)

    def install(advice: Advice) -> FakeAdvisor:
        advisor = FakeAdvisor(advice)
        monkeypatch.setattr(auto, "advise_from_config", advisor)
        return advisor

    return install


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.optimizer.lr=-1", r"model\.optimizer\.lr=-1"),
        ("case.probe_epochs=-2", r"case\.probe_epochs=-2 is not a whole number >= 0"),
        ("case.epochs=0", r"case\.epochs=0 is not a whole number >= 1"),
    ],
    ids=["lr", "probe_epochs", "epochs"],
)
def test_case_auto_checks_the_config_before_the_advisor_runs(
    compose_train: Callable[..., DictConfig],
    fake: Callable[[Advice], FakeAdvisor],
    override: str,
    message: str,
) -> None:
    advisor = fake(advice_for(20))
    cfg = compose_train("case=auto", override)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert advisor.calls == []  # refused before any feature was extracted


@pytest.mark.parametrize("per_class, probe_epochs", [(20, 0), pytest.param(2000, 3, marks=pytest.mark.slow)])
def test_probe_epochs_on_case_auto_is_dropped_with_a_note_when_the_pick_trains_the_head_alone(
    compose_train: Callable[..., DictConfig],
    fake: Callable[[Advice], FakeAdvisor],
    caplog: pytest.LogCaptureFixture,
    per_class: int,
    probe_epochs: int,
) -> None:
    fake(advice_for(per_class))
    cfg = compose_train("case=auto", "case.probe_epochs=3")
    with caplog.at_level(logging.INFO, logger=auto.__name__):
        advice = auto.resolve_auto_case(cfg)
    assert cfg.case.probe_epochs == probe_epochs  # kept when the pick fine-tunes (LP-FT)
    case = Case.from_config(OmegaConf.to_container(cfg.case))  # a case that trains
    assert case.name == advice.case
    dropped = "case.probe_epochs=3 dropped: the advisor picked small_similar, which trains the head alone"
    assert (dropped in caplog.text) == (advice.case == "small_similar")


def test_the_equivalent_command_carries_the_users_overrides(
    compose_train: Callable[..., DictConfig],
    fake: Callable[[Advice], FakeAdvisor],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    fake(advice_for(20))
    cfg = compose_train("case=auto", "data.samples_per_class=7", "trainer.max_epochs=2")
    with caplog.at_level(logging.INFO, logger=auto.__name__):
        auto.resolve_auto_case(cfg)
    command = (
        f"transfer-train paths.cache_dir={tmp_path / 'cache'} data.samples_per_class=7 trainer.max_epochs=2 "
        "case=small_similar"
    )
    assert f"equivalent to: {command};" in caplog.text
    assert json.loads((tmp_path / "run" / "advice.json").read_text())["command"] == command


def test_only_global_rank_zero_advises_on_its_own_gpu_and_writes_the_advice(
    compose_train: Callable[..., DictConfig],
    fake: Callable[[Advice], FakeAdvisor],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    advisor = fake(advice_for(20))
    cfg = compose_train("case=auto", "trainer.accelerator=auto")
    write_advice(advice_for(2000), tmp_path / "run")  # stale, from an earlier run in the folder
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun's global rank 0
    assert auto.resolve_auto_case(cfg).case == "small_similar"
    assert advisor.calls == [{"device": torch.device("cuda", 0)}]  # its own GPU, by index
    assert read_advice(tmp_path / "run").case == "small_similar"  # the stale advice replaced


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "1", "LOCAL_RANK": "1"},  # torchrun
        {"NODE_RANK": "0", "LOCAL_RANK": "1"},  # a child of Lightning's launcher
        {"NODE_RANK": "1"},  # Lightning's launcher, the first process of the second node
        {"SLURM_PROCID": "3"},
    ],
)
def test_other_ranks_wait_for_rank_zeros_advice_and_train_the_same_case(
    compose_train: Callable[..., DictConfig],
    fake: Callable[[Advice], FakeAdvisor],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    advisor = fake(advice_for(20))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose_train("case=auto")
    with pytest.raises(ConfigError, match=r"waited 0\.2 s for rank 0's advice in .*advice\.json"):
        auto.resolve_auto_case(cfg, wait_s=0.2)
    write_advice(advice_for(2000), tmp_path / "run")  # what rank 0 wrote
    advice = auto.resolve_auto_case(cfg, wait_s=0.2)
    assert advisor.calls == []  # this rank never advises
    assert (advice.case, cfg.case.name, cfg.case.freeze) == ("large_similar", "large_similar", "none")


@pytest.mark.parametrize(
    "env, zero",
    [
        ({}, True),
        ({"LOCAL_RANK": "0"}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "2", "LOCAL_RANK": "0"}, False),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
        ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, False),
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # Lightning's child inside a SLURM shell
    ],
)
def test_global_rank_zero_from_the_launchers_environment(env: dict[str, str], zero: bool) -> None:
    assert auto.is_global_rank_zero(env) is zero
