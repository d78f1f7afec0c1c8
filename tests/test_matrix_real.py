"""`make matrix-real` bookkeeping: the run plan, resuming, and the report's arithmetic (best case,
the advisor's hits, cost ratio). The matrix itself is hours of real training, not a test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from studies import matrix_real as mr


def test_plan_covers_every_cell_case_and_seed_small_cells_first() -> None:
    runs = mr.plan(mr.cells(20, 1000, [0, 1, 2], [0]))
    main = [r for r in runs if r.case not in mr.VARIANTS]
    assert len(main) == 2 * 3 * 5 + 2 * 1 * 5  # small: 3 seeds, large: 1 seed; four cases + auto
    assert len(runs) - len(main) == 2 * (3 + 1) * len(mr.VARIANTS)
    sizes = [r.cell.size for r in main]
    assert sizes == sorted(sizes, key=lambda s: s != "small")  # the cheap cells come first
    assert len({r.name for r in runs}) == len(runs)  # every run has its own folder
    only = mr.plan(mr.cells(20, 1000, [0, 1, 2], [0]), only="mnist_small/auto")
    assert [r.name for r in only] == [f"mnist_small/auto/seed{s}" for s in (0, 1, 2)]


def test_variant_runs_train_their_base_case_with_the_recipe() -> None:
    cell = mr.Cell("cifar10", "small", 20, (0,))
    overrides = mr.Run(cell, "large_similar+lpft", 0).overrides(0.04)
    assert "case=large_similar" in overrides and "case.probe_epochs=50" in overrides
    assert "data.samples_per_class=20" in overrides and "data=cifar10" in overrides


def _fake_run(out: Path, run: mr.Run, acc: float | None, wall: float, picked: str | None = None) -> None:
    d = out / run.name
    d.mkdir(parents=True)
    status = "ok" if acc is not None else "failed"
    summary = {"status": status, "metrics": {"test/acc": acc, "train/acc": 1.0}, "best_score": acc}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / mr.WALL_FILE).write_text(json.dumps({"wall_s": wall, "returncode": 0}))
    if picked:
        advice = {"case": picked, "keep": None, "timings": {"total_s": 2.0}}
        (d / "advice.json").write_text(json.dumps(advice))


def test_report_finds_best_case_hits_and_cost(tmp_path: Path) -> None:
    cell = mr.Cell("mnist", "small", 20, (0, 1))
    accs = {"small_similar": 0.80, "small_different": 0.86, "large_similar": 0.20, "large_different": 0.855}
    for seed in (0, 1):
        for case, acc in accs.items():
            _fake_run(tmp_path, mr.Run(cell, case, seed), acc + 0.01 * seed, wall=10.0)
        # seed 0 picks a case within 1 point of the best, seed 1 one that is not
        picked = "large_different" if seed == 0 else "small_similar"
        _fake_run(tmp_path, mr.Run(cell, "auto", seed), accs[picked], wall=12.0, picked=picked)
    unfinished = mr.Run(cell, "large_similar+lpft", 0)
    _fake_run(tmp_path, unfinished, None, wall=1.0)  # a failed run is left out, not reported as 0

    runs = mr.plan([cell])
    [result] = mr.report(
        runs,
        tmp_path,
        tmp_path / "results",
        {"small": 20, "large": 1000, "small_seeds": [0, 1], "large_seeds": [0], "val_fraction": 0.04},
    )
    assert result["best"] == "small_different"
    assert result["cases"]["small_different"]["mean"] == pytest.approx(0.865)
    assert result["cases"]["small_different"]["std"] == pytest.approx(0.00707, abs=1e-4)
    assert (result["hits"], result["pick_count"]) == (1, 2)
    assert result["cost_ratio"] == pytest.approx(2.0 / 40.0)
    assert "large_similar+lpft" not in result["cases"]
    md = (tmp_path / "results" / "matrix_real.md").read_text()
    assert "**0.865 ± 0.007**" in md and "1/2" in md
    assert (tmp_path / "results" / "matrix_real.png").stat().st_size > 0
    rows = json.loads((tmp_path / "results" / "matrix_real.json").read_text())["runs"]
    assert len(rows) == 10


def test_execute_records_wall_time_and_a_finished_run_is_not_rerun(tmp_path: Path) -> None:
    # A stand-in for transfer-train that writes what a finished run writes into hydra.run.dir.
    script = (
        "import json, sys, pathlib; "
        "d = pathlib.Path([a for a in sys.argv if a.startswith('hydra.run.dir=')][0].split('=', 1)[1]); "
        "(d / 'summary.json').write_text(json.dumps({'status': 'ok'}))"
    )
    run = mr.Run(mr.Cell("mnist", "small", 20, (0,)), "small_similar", 0)
    wall = mr.execute(run, tmp_path, 0.04, [sys.executable, "-c", script])
    assert wall["returncode"] == 0 and mr.finished(tmp_path / run.name)
    assert f"hydra.run.dir={tmp_path / run.name}" in wall["command"]
    failing = mr.Run(run.cell, "small_different", 0)
    mr.execute(failing, tmp_path, 0.04, [sys.executable, "-c", "raise SystemExit(2)"])
    assert not mr.finished(tmp_path / failing.name)  # no summary: run again next time


def test_dry_run_lists_runs_and_their_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = mr.Run(mr.Cell("mnist", "small", 20, (0,)), "small_similar", 0)
    _fake_run(tmp_path, run, 0.8, wall=1.0)
    assert (
        mr.main(["--dry-run", "--out-dir", str(tmp_path), "--only", "mnist_small/small_similar/seed0"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("[done] mnist_small/small_similar/seed0: transfer-train data=mnist")


def test_merge_fills_missing_run_folders_from_an_earlier_report_and_new_runs_win(tmp_path: Path) -> None:
    cell = mr.Cell("mnist", "small", 20, (0,))
    runs = mr.plan([cell], variants=False)
    fresh = mr.Run(cell, "auto", 0)
    _fake_run(tmp_path, fresh, 0.9, wall=5.0, picked="small_different")  # re-run here
    earlier = [
        {"cell": cell.name, "case": r.case, "seed": 0, "test_acc": 0.5, "wall_s": 9.0} for r in runs
    ] + [{"cell": "other_cell", "case": "auto", "seed": 0, "test_acc": 0.1}]  # not planned: dropped
    rows = mr.merged_rows(runs, tmp_path, earlier)
    assert [(r["case"], r["test_acc"]) for r in rows] == [(r.case, 0.9 if r == fresh else 0.5) for r in runs]
    assert rows[[r.case for r in runs].index("auto")]["picked"] == "small_different"


def test_only_limits_what_runs_not_what_the_report_covers(tmp_path: Path) -> None:
    earlier = json.loads((Path(__file__).parents[1] / "notebooks/results/matrix_real.json").read_text())
    merged = tmp_path / "earlier.json"
    merged.write_text(json.dumps(earlier))
    argv = ["--report-only", "--only", "mnist_small/auto", "--out-dir", str(tmp_path / "runs")]
    assert mr.main([*argv, "--results", str(tmp_path / "res"), "--merge", str(merged)]) == 0
    rows = json.loads((tmp_path / "res" / "matrix_real.json").read_text())["runs"]
    assert len(rows) == len(earlier["runs"]) > 3  # the whole committed report, not the 3 auto rows
