"""The crossover study's pure parts: planning, resume, records, aggregation, crossover N.

No training runs here: records are written by hand, as the driver writes them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from studies.crossover import ADVICE, DATASETS, Step, advised_keep, pending, plan, tier
from studies.crossover_records import advice_path, load_cells, read_json, train_path, write_json
from studies.crossover_report import crossover_n, report, summarise
from transfer_cases.advise import StageScores, decide


def _train(out: Path, d: str, n: int, seed: int, case: str, acc: float | None, status: str = "ok") -> None:
    write_json(
        train_path(out, d, n, seed, case),
        {"status": status, "test_acc": acc, "val_acc": acc, "wall_s": 10.0, "num_classes": 10},
    )


def _advice(
    out: Path, d: str, n: int, seed: int, probes: Sequence[float] = (0.5, 0.6, 0.7, 0.9, 0.8)
) -> None:
    """A real advice record: `decide` on stages whose probes score `probes` (std 0.001)."""
    stages = [
        StageScores(
            stage=i + 1,
            width=16 * 2**i,
            logme_pretrained=p,
            logme_random=0.1,
            probe_pretrained=p,
            probe_pretrained_std=0.001,
            probe_random=0.1,
            probe_random_std=0.001,
        )
        for i, p in enumerate(probes)
    ]
    advice = decide({f"c{c}": n for c in range(10)}, stages)
    write_json(
        advice_path(out, d, n, seed),
        {
            "advice": advice.to_dict(),
            "timings": {"total_s": 3.0},
            "forward_pass": {"images": 200, "seconds": 2.0},
        },
    )


def _cell(out: Path, d: str, n: int, seed: int, head: float, ft: float) -> None:
    _advice(out, d, n, seed)
    _train(out, d, n, seed, "small_similar", head - 0.05)
    _train(out, d, n, seed, "small_different", head)
    _train(out, d, n, seed, "large_different", ft)
    _train(out, d, n, seed, "large_different+lpft", ft - 0.02)


def test_plan_runs_coarse_grid_with_one_seed_first_and_advice_before_each_cells_cases() -> None:
    steps = plan()
    first_other_seed = next(i for i, st in enumerate(steps) if st.seed != 0)
    coarse = {(st.dataset, st.per_class) for st in steps[:first_other_seed] if tier(st) == 0}
    assert {("cifar10", 20), ("mnist", 100), ("hymenoptera", 122), ("cifar10", 500)} <= coarse
    assert all(tier(st) == 0 for st in steps[: len([s for s in steps if tier(s) == 0])])
    # Within a cell the advice comes first: small_different needs its cut.
    seen: set[tuple[str, int, int]] = set()
    for st in steps:
        key = (st.dataset, st.per_class, st.seed)
        if st.kind == ADVICE:
            seen.add(key)
        else:
            assert key in seen, st.name
    # Three seeds up to 200 per class, one above; N=1000 and large_similar come last.
    assert {st.seed for st in steps if st.per_class == 200} == {0, 1, 2}
    assert {st.seed for st in steps if st.per_class == 500} == {0}
    assert tier(Step("cifar10", 1000, 0, "large_different")) > tier(
        Step("cifar10", 200, 2, "large_different")
    )
    assert tier(Step("mnist", 20, 0, "large_similar")) > tier(Step("mnist", 20, 2, "small_similar"))
    # LP-FT runs with the other cases only in the middle of the grid.
    assert tier(Step("mnist", 100, 0, "large_different+lpft")) == tier(
        Step("mnist", 100, 0, "large_different")
    )
    assert tier(Step("mnist", 20, 0, "large_different+lpft")) > tier(Step("mnist", 200, 2, "large_different"))
    assert len(steps) == len({st.name for st in steps})


def test_plan_only_filters_by_name() -> None:
    steps = plan(only="mnist/n20/seed1/")
    assert steps and all(st.dataset == "mnist" and st.per_class == 20 and st.seed == 1 for st in steps)


def test_overrides_name_the_data_set_size_and_case() -> None:
    o = Step("hymenoptera", 122, 1, "large_different+lpft").overrides()
    assert "data.samples_per_class=null" in o  # the full ants/bees set
    assert "case=large_different" in o and "case.probe_epochs=50" in o and "seed=1" in o
    assert not any(x.startswith("+data.test_per_class") for x in o)  # tested on its val split
    o = Step("cifar10", 50, 0, "small_different").overrides(keep=3)
    assert "case.keep=3" in o and "data.samples_per_class=50" in o
    assert f"data.image_size={DATASETS['cifar10'].image_size}" in o
    assert "+data.test_per_class=200" in o
    assert not any(x.startswith("case") for x in Step("mnist", 10, 0, ADVICE).overrides())


def test_resume_skips_finished_and_failed_records(tmp_path: Path) -> None:
    steps = plan(only="mnist/n20/seed0/")
    assert pending(steps, tmp_path) == steps
    _advice(tmp_path, "mnist", 20, 0)
    _train(tmp_path, "mnist", 20, 0, "large_different", None, status="failed")
    left = {st.kind for st in pending(steps, tmp_path)}
    assert ADVICE not in left and "large_different" not in left and "small_similar" in left


def test_advised_keep_cuts_at_the_narrowest_tie_even_when_the_full_body_ties(tmp_path: Path) -> None:
    step = Step("mnist", 20, 0, "small_different")
    assert advised_keep(tmp_path, step) == (False, None)
    # Stage 3 peaks, the full body ties with it: the advisor keeps the full body, but the cut the
    # rule before would have made is still run, so that both rules can be scored.
    _advice(tmp_path, "mnist", 20, 0, probes=[0.5, 0.6, 0.80, 0.7, 0.795])
    assert advised_keep(tmp_path, step) == (True, 3)
    _advice(tmp_path, "mnist", 20, 0, probes=[0.5, 0.6, 0.7, 0.7, 0.9])
    assert advised_keep(tmp_path, step) == (True, None)


def test_write_json_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    write_json(path, {"x": 1})
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})  # fails mid-dump: the old file stays whole
    assert read_json(path) == {"x": 1}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_load_cells_joins_records_and_computes_the_gain(tmp_path: Path) -> None:
    _cell(tmp_path, "mnist", 20, 0, head=0.88, ft=0.50)
    _train(tmp_path, "mnist", 20, 0, "large_similar", 0.2, status="failed")
    _advice(tmp_path, "cifar10", 50, 1)  # advice only: a partial cell
    cells = load_cells(tmp_path)
    assert [(c["dataset"], c["per_class"], c["seed"]) for c in cells] == [
        ("cifar10", 50, 1),
        ("mnist", 20, 0),
    ]
    partial, cell = cells
    assert partial["gain"] is None and partial["test_acc"] == {} and partial["advice"]["best_stage"] == 4
    assert cell["best_head_only"] == "small_different" and cell["best_finetune"] == "large_different"
    assert cell["gain"] == pytest.approx(0.50 - 0.88)
    assert cell["failed"] == ["large_similar"] and "large_similar" not in cell["test_acc"]
    assert cell["num_classes"] == 10 and cell["advice_path"].endswith("mnist/n20/seed0.json")
    assert json.loads(Path(cell["advice_path"]).read_text())["advice"]["case"] == "small_different"


def test_summarise_takes_mean_and_spread_over_seeds(tmp_path: Path) -> None:
    for seed, (head, ft) in enumerate([(0.80, 0.82), (0.80, 0.84), (0.80, 0.86)]):
        _cell(tmp_path, "cifar10", 100, seed, head, ft)
    (row,) = summarise(load_cells(tmp_path))
    assert row["seeds"] == [0, 1, 2] and row["gain_seeds"] == 3
    assert row["gain"][0] == pytest.approx(0.04) and row["gain"][1] == pytest.approx(0.02)
    assert row["best_finetune"] == "large_different" and row["advisor_cost_ratio"] == pytest.approx(1.5)


def _rows(dataset: str, gains: dict[int, float]) -> list[dict]:
    return [{"dataset": dataset, "per_class": n, "gain": (g, 0.0)} for n, g in gains.items()]


def test_crossover_n_is_where_the_gain_stays_above_one_point() -> None:
    assert crossover_n(_rows("a", {20: -0.3, 100: 0.02, 200: 0.005, 500: 0.03, 1000: 0.05}), "a") == 500
    assert crossover_n(_rows("a", {20: -0.3, 100: 0.02, 500: 0.03}), "a") == 100
    assert crossover_n(_rows("a", {20: -0.3, 100: 0.02, 500: 0.0}), "a") is None  # falls back below
    assert crossover_n(_rows("a", {20: 0.02}), "a") == 20
    assert crossover_n(_rows("a", {20: 0.02}), "b") is None


def test_report_writes_table_csv_json_and_plot(tmp_path: Path) -> None:
    out, results = tmp_path / "out", tmp_path / "results"
    _cell(out, "mnist", 20, 0, head=0.88, ft=0.50)
    _cell(out, "mnist", 500, 0, head=0.95, ft=0.98)
    report(out, results)
    md = (results / "crossover.md").read_text()
    assert "**mnist**: N = 500" in md and "| mnist | 500 | 1 | `small_different` | 95.0 |" in md
    data = json.loads((results / "crossover.json").read_text())
    assert data["crossover_n"] == {"mnist": 500}
    assert all(c["advice_path"] for c in data["cells"])
    assert (results / "crossover.csv").read_text().count("\n") == 3
    assert (results / "crossover.png").stat().st_size > 1000


def test_family_best_ignores_a_case_not_yet_run_on_every_seed(tmp_path: Path) -> None:
    for seed in (0, 1):
        _cell(tmp_path, "mnist", 50, seed, head=0.90, ft=0.60)
    # LP-FT better, but only on seed 1 so far: not comparable with a two-seed mean.
    train_path(tmp_path, "mnist", 50, 0, "large_different+lpft").unlink()
    _train(tmp_path, "mnist", 50, 1, "large_different+lpft", 0.70)
    (row,) = summarise(load_cells(tmp_path))
    assert row["best_finetune"] == "large_different" and row["gain"][0] == pytest.approx(-0.30)


def test_a_derived_task_merges_classes_into_groups_and_checks_them() -> None:
    from studies.crossover_data import Grouped
    from transfer_cases.data.sources import ImageSource
    from transfer_cases.data.splits import Splits

    class Source(ImageSource):
        def load(self, index: int) -> None:
            raise AssertionError("no image is read")

        def fingerprint(self) -> str:
            return "source"

    class Base:
        def __init__(self) -> None:
            self.classes = ["car", "cat", "dog"]

        def _load_splits(self) -> Splits:
            return Splits(train=Source([0, 1, 2, 2]), test=Source([2, 0]))

    class Task(Grouped, Base):
        groups = {"animal": ("cat", "dog"), "vehicle": ("car",)}

    task = Task()
    assert task.classes == ["animal", "vehicle"]  # the model is sized from these before setup
    splits = task._load_splits()
    assert splits.train.labels.tolist() == [1, 0, 0, 0] and splits.test.labels.tolist() == [0, 1]

    class Missing(Grouped, Base):
        groups = {"animal": ("cat",), "vehicle": ("car",)}

    with pytest.raises(ValueError, match="do not cover"):
        Missing()._load_splits()


def test_a_derived_task_is_held_out_with_its_source_and_scored_on_its_own_cut(tmp_path: Path) -> None:
    from studies.crossover_fit import outcome, rules_picker, source
    from transfer_cases.advise.decide import Rules

    assert (source("cifar10_av"), source("mnist_oe48"), source("hymenoptera")) == (
        "cifar10",
        "mnist",
        "hymenoptera",
    )
    # Stage 3 peaks and the full body does not tie: the pick is small_different cut at 3.
    _advice(tmp_path, "mnist", 20, 0, probes=[0.5, 0.6, 0.9, 0.7, 0.7])
    for case, acc in (("small_similar", 0.80), ("small_different", 0.85), ("large_different", 0.5)):
        _train(tmp_path, "mnist", 20, 0, case, acc)
    (cell,) = load_cells(tmp_path)
    assert cell["cut"] is None  # a record without overrides: the cut is unknown, taken as the pick's
    row = outcome(cell, rules_picker(Rules())(cell))
    assert (row["pick"], row["hit"]) == ("small_different", True)
    # A run cut elsewhere is not this pick: unscored, not a hit or a miss.
    path = train_path(tmp_path, "mnist", 20, 0, "small_different")
    write_json(path, {**read_json(path), "overrides": ["case=small_different", "case.keep=2"]})
    (cell,) = load_cells(tmp_path)
    assert cell["cut"] == 2
    row = outcome(cell, rules_picker(Rules())(cell))
    assert (row["pick"], row["pick_acc"], row["hit"]) == ("small_different", None, None)


def test_an_advice_that_cuts_elsewhere_gets_its_cut_run_and_scored(tmp_path: Path) -> None:
    from studies.crossover import extra_cuts
    from studies.crossover_fit import outcome, rules_picker
    from transfer_cases.advise.decide import Rules

    # The advice (recomputed after the runs) cuts at stage 3; the study's run cut at 2.
    _advice(tmp_path, "mnist", 20, 0, probes=[0.5, 0.6, 0.9, 0.7, 0.7])
    _train(tmp_path, "mnist", 20, 0, "small_similar", 0.80)
    path = train_path(tmp_path, "mnist", 20, 0, "small_different")
    _train(tmp_path, "mnist", 20, 0, "small_different", 0.70)
    write_json(path, {**read_json(path), "overrides": ["case=small_different", "case.keep=2"]})
    steps = plan(["mnist"], only="mnist/n20/seed0/")
    assert [(st.name, keep) for st, keep in extra_cuts(steps, tmp_path)] == [
        ("mnist/n20/seed0/small_different", 3)
    ]
    # Its run is recorded apart: scored for the pick, not a case of its own.
    extra = train_path(tmp_path, "mnist", 20, 0, "small_different-k3")
    write_json(extra, {"status": "ok", "test_acc": 0.85, "overrides": ["case.keep=3"], "num_classes": 10})
    assert extra_cuts(steps, tmp_path) == []
    (cell,) = load_cells(tmp_path)
    assert set(cell["test_acc"]) == {"small_similar", "small_different"}
    assert cell["cut_acc"] == {2: 0.70, 3: 0.85}
    row = outcome(cell, rules_picker(Rules())(cell))
    assert (row["pick"], row["pick_acc"], row["hit"]) == ("small_different", 0.85, True)
