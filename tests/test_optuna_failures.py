"""An Optuna search loses no work to a failing trial: the trial is recorded as failed and the others
run; sweeper settings it would crash on, and a search whose every trial failed, are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.test_configs import TINY_OVERRIDES, run_cli

QUIET = (*TINY_OVERRIDES, "debug=fdr", "callbacks.progress_bar.refresh_rate=0")


def search(tmp_path: Path, image_folder: Path, *extra: str) -> tuple[int, str, Path]:
    sweep = tmp_path / "optuna"
    run = run_cli(
        "transfer-train",
        "-m",
        "hparams_search=small_similar_optuna",
        *QUIET,
        f"data.root={image_folder}",
        f"hydra.sweep.dir={sweep}",
        *extra,
        cwd=tmp_path,
    )
    return run.returncode, run.stderr, sweep


def statuses(sweep: Path) -> list[tuple[str, str]]:
    """(status, case.keep override) of each trial, in the order they ran."""
    found = []
    for job in sorted(sweep.glob("*/summary.json"), key=lambda p: int(p.parent.name.split("_")[0])):
        overrides = yaml.safe_load((job.parent / ".hydra" / "overrides.yaml").read_text())
        keep = next(o.split("=")[1] for o in overrides if o.startswith("case.keep="))
        found.append((json.loads(job.read_text())["status"], keep))
    return found


def test_a_failing_trial_is_recorded_and_the_other_trials_run(tmp_path: Path, image_folder: Path) -> None:
    # case.keep=9 does not fit tiny_cnn (3 stages): a ConfigError in the trials that draw it. With
    # seed=2, TPE's random start draws 9, 9, then -1: the trial after the failures must still run.
    code, stderr, sweep = search(
        tmp_path, image_folder, "case.keep=choice(9,-1,3)", "seed=2", "hydra.sweeper.n_trials=3"
    )
    assert code == 0, stderr[-3000:]
    found = statuses(sweep)
    assert len(found) == 3, found
    assert all((status == "failed") == (keep == "9") for status, keep in found), found
    assert found[0][0] == "failed" and found[-1][0] == "ok", found  # trials ran after a failure
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"]["case.keep"] != 9


def test_a_search_whose_every_trial_failed_is_one_line(tmp_path: Path, image_folder: Path) -> None:
    code, stderr, sweep = search(tmp_path, image_folder, "case.keep=choice(9,10)", "hydra.sweeper.n_trials=2")
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count("error:") == 1
    assert "error: all 2 trials of the search failed, so it has no best parameters" in stderr
    assert [status for status, _ in statuses(sweep)] == ["failed", "failed"]


@pytest.mark.parametrize(
    "setting", ["hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=-1", "hydra.sweeper.n_jobs=0"]
)
def test_sweeper_settings_below_one_are_one_line_before_any_trial(
    tmp_path: Path, image_folder: Path, setting: str
) -> None:
    code, stderr, sweep = search(tmp_path, image_folder, setting)
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count("error:") == 1
    key, value = setting.split("=")
    assert f"error: {key}={value} is not a whole number >= 1" in stderr
    assert not list(sweep.glob("*/summary.json"))  # no trial ran
