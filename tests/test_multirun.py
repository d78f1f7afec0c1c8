"""Hydra multirun: the four cases, distinct run directories, a failing job, Optuna; gpu-check's code path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CASES
from tests.test_configs import TINY_OVERRIDES, run_cli
from transfer_cases.tools import gpu_check

QUIET = (*TINY_OVERRIDES, "debug=fdr", "callbacks.progress_bar.refresh_rate=0")


def summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))}


def test_multirun_glob_runs_the_four_cases_in_their_own_directories(
    tmp_path: Path, image_folder: Path
) -> None:
    sweep = tmp_path / "sweep"
    run = run_cli(
        "transfer-train",
        "-m",
        "case=glob(*,exclude=auto)",
        *QUIET,
        f"data.root={image_folder}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for case in CASES:  # each job's parameter-count line at fit start
        assert f"case={case} body=" in run.stdout + run.stderr
    assert run.stdout.count("val/acc") >= len(CASES)  # and its final metrics table
    found = summaries(sweep)
    assert sorted(s["case"] for s in found.values()) == sorted(CASES)
    assert all(s["status"] == "ok" for s in found.values())
    assert sorted(found) == sorted(
        f"{i}_{c}" for i, c in enumerate(sorted(CASES))
    )  # Hydra sorts glob matches
    # The fully frozen cases trained on cached features; the fine-tuning cases on images.
    for s in found.values():
        cache = s["feature_cache"]
        if s["case"].startswith("small"):
            assert {f["hit"] for f in cache["files"].values()} == {False}, s["case"]  # built once each
        else:
            assert cache is None, s["case"]


def test_a_sweep_of_head_settings_extracts_the_features_once(tmp_path: Path, image_folder: Path) -> None:
    sweep = tmp_path / "sweep"
    run = run_cli(
        "transfer-train",
        "-m",
        "model.optimizer.lr=0.01,0.1,0.001",
        *QUIET,
        f"data.root={image_folder}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    hits = [sorted(f["hit"] for f in s["feature_cache"]["files"].values()) for s in summaries(sweep).values()]
    assert hits == [[False, False], [True, True], [True, True]]
    assert len(list((tmp_path / ".cache" / "features").glob("*/features.npy"))) == 2  # train and val


def test_a_failing_job_does_not_stop_the_sweep(tmp_path: Path, image_folder: Path) -> None:
    sweep = tmp_path / "sweep"
    run = run_cli(
        "transfer-train",
        "-m",
        "case.keep=9,null",
        *QUIET,
        f"data.root={image_folder}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = (summaries(sweep)[name] for name in ("0_small_similar", "1_small_similar"))
    assert first["status"] == "failed" and "case.keep=9 does not fit" in first["error"]
    assert second["status"] == "ok" and second["metrics"]["val/acc"] >= 0


@pytest.mark.slow  # two real runs started together
def test_runs_started_in_the_same_second_do_not_collide(tmp_path: Path, image_folder: Path) -> None:
    exe = Path(sys.executable).with_name("transfer-train")
    args = [str(exe), *QUIET, f"data.root={image_folder}"]
    procs = [
        subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read()[-2000:] for p in procs]
    runs = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").is_file() for r in runs)


def test_optuna_search_two_trials(tmp_path: Path, image_folder: Path) -> None:
    sweep = tmp_path / "optuna"
    run = run_cli(
        "transfer-train",
        "hparams_search=small_similar_optuna",
        "hydra.sweeper.n_trials=2",
        *QUIET,
        f"data.root={image_folder}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(summaries(sweep)) == 2
    lrs = [
        yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        for d in sorted(sweep.glob("*/.hydra/.."))
    ]
    tried = [float(o.split("=")[1]) for ov in lrs for o in ov if o.startswith("model.optimizer.lr=")]
    assert len(tried) == 2 and all(1e-3 <= lr <= 1e-1 for lr in tried)  # the small_similar range
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.optimizer.lr", "model.optimizer.weight_decay"}


def test_gpu_check_code_path_on_cpu(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = gpu_check.main(
        [
            "--accelerator",
            "cpu",
            "--precisions",
            "bf16-mixed",
            "--cases",
            "small_similar",
            "large_similar",
            "--out",
            str(tmp_path),
            *TINY_OVERRIDES,
            f"data.root={image_folder}",
            "data.batch_size=2",
        ]
    )
    out = capsys.readouterr().out
    assert "small_similar" in out and "large_similar" in out and "bf16-mixed" in out
    # ThroughputMonitor's rate (6 batches of 2: 3 warm-up batches, then the window) reaches the table.
    assert [(r["case"], r["precision"]) for r in results] == [
        ("small_similar", "bf16-mixed"),
        ("large_similar", "bf16-mixed"),
    ]
    assert all(math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0 for r in results)
    assert all(f"{r['img_per_s']:.1f}" in out for r in results)
    assert (tmp_path / "small_similar" / "bf16-mixed" / "metrics.csv").is_file()
