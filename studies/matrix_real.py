"""`make matrix-real`: the guide's 2x2 measured on real data, with the advisor's pick in each cell.

Embedded ImageNet MobileNetV2 x {CIFAR-10 (similar to ImageNet), MNIST (different)} x {small,
large} x the four cases, plus `case=auto` (the advisor, then the case it picks). Every run is a real
`transfer-train` process with the case's own defaults; the score is the test-set accuracy of the
best-by-validation checkpoint. Runs already finished (summary.json with status ok) are skipped, so
an interrupted matrix resumes where it stopped. Long (about 1.5 h on 2 CPU cores): not a test.

    python -m studies.matrix_real            # run what is missing, then report
    python -m studies.matrix_real --dry-run  # list the runs and their commands
    python -m studies.matrix_real --report-only
    python -m studies.matrix_real --report-only --merge notebooks/results/matrix_real.json

`--merge` reads the runs of an earlier report (its JSON) for every run whose folder is missing here:
re-running a few runs (a changed advisor rule, say) then updates the committed report in place.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer_cases.training.cases import CASES

AUTO = "auto"
RUN_CASES = (*CASES, AUTO)
# The data sets and the side of the guide each stands for; image sizes keep 2 cores within hours.
DATASETS = {"cifar10": ("similar", 96), "mnist": ("different", 64)}
WALL_FILE = "matrix_wall.json"
# Recipes measured beside the defaults (run after the main matrix): LP-FT, the head trained to
# convergence on the frozen body (cached features) before fine-tuning (Kumar et al. 2022).
VARIANTS = {
    "large_similar+lpft": ("large_similar", ("case.probe_epochs=50",)),
    "large_different+lpft": ("large_different", ("case.probe_epochs=50",)),
}


@dataclass(frozen=True)
class Cell:
    dataset: str
    size: str  # small | large
    per_class: int
    seeds: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.size}"

    @property
    def similarity(self) -> str:
        return DATASETS[self.dataset][0]


@dataclass(frozen=True)
class Run:
    cell: Cell
    case: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cell.name}/{self.case}/seed{self.seed}"

    def overrides(self, val_fraction: float) -> list[str]:
        case, extra = VARIANTS.get(self.case, (self.case, ()))
        return [
            f"data={self.cell.dataset}",
            f"data.samples_per_class={self.cell.per_class}",
            f"data.val_fraction={val_fraction}",
            f"case={case}",
            *extra,
            f"seed={self.seed}",
            "callbacks.progress_bar.refresh_rate=0",
            "callbacks.model_summary=null",
        ]


def cells(small: int, large: int, small_seeds: Sequence[int], large_seeds: Sequence[int]) -> list[Cell]:
    return [
        Cell(d, size, n, tuple(seeds))
        for d in DATASETS
        for size, n, seeds in (("small", small, small_seeds), ("large", large, large_seeds))
    ]


def plan(all_cells: Iterable[Cell], only: str | None = None, variants: bool = True) -> list[Run]:
    """Every (cell, case, seed) run: the four cases and auto, small cells first (they are cheap),
    then the recipe variants; `only` is a substring filter on the run name."""
    all_cells = list(all_cells)
    runs = [Run(c, case, s) for c in all_cells for s in c.seeds for case in RUN_CASES]
    runs.sort(key=lambda r: (r.cell.size != "small", r.cell.name, r.seed))
    if variants:
        extra = [Run(c, v, s) for c in all_cells for s in c.seeds for v in VARIANTS]
        runs += sorted(extra, key=lambda r: (r.cell.size != "small", r.cell.name, r.seed))
    return [r for r in runs if only is None or only in r.name]


def finished(run_dir: Path) -> bool:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("status") == "ok" and (run_dir / WALL_FILE).is_file()


def execute(run: Run, out_dir: Path, val_fraction: float, train_cmd: Sequence[str]) -> dict[str, Any]:
    """Run one `transfer-train` process (a failed one is recorded, not raised: the matrix goes on)."""
    run_dir = out_dir / run.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run starts over (its summary says it did not end)
    run_dir.mkdir(parents=True)
    cmd = [*train_cmd, *run.overrides(val_fraction), f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    with open(run_dir / "matrix_log.txt", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = {"wall_s": round(time.perf_counter() - start, 2), "returncode": proc.returncode, "command": cmd}
    (run_dir / WALL_FILE).write_text(json.dumps(wall, indent=2) + "\n")
    return wall


def collect(run: Run, out_dir: Path) -> dict[str, Any] | None:
    """One finished run's figures, read back from its summary.json, advice.json and wall time."""
    run_dir = out_dir / run.name
    if not finished(run_dir):
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    wall = json.loads((run_dir / WALL_FILE).read_text())
    metrics = summary.get("metrics") or {}
    row: dict[str, Any] = {
        "cell": run.cell.name,
        "dataset": run.cell.dataset,
        "size": run.cell.size,
        "similarity": run.cell.similarity,
        "per_class": run.cell.per_class,
        "case": run.case,
        "seed": run.seed,
        "test_acc": metrics.get("test/acc"),
        "val_acc": summary.get("best_score"),
        "train_acc": metrics.get("train/acc"),
        "wall_s": wall["wall_s"],
        "warnings": len(summary.get("warnings") or []),
    }
    advice_file = run_dir / "advice.json"
    if run.case == AUTO and advice_file.is_file():
        advice = json.loads(advice_file.read_text())
        row["picked"] = advice["case"] + (f" keep={advice['keep']}" if advice.get("keep") is not None else "")
        row["picked_case"] = advice["case"]
        row["advisor_s"] = (advice.get("timings") or {}).get("total_s")
    return row


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarise(rows: Sequence[dict[str, Any]], tolerance: float = 0.01) -> list[dict[str, Any]]:
    """Per cell: each case's mean +- std test accuracy, the best case, the advisor's picks, whether the
    pick is within `tolerance` of the best (judged on the mean of the picked case's own runs), cost."""
    out = []
    for cell in dict.fromkeys(r["cell"] for r in rows):
        in_cell = [r for r in rows if r["cell"] == cell and r["test_acc"] is not None]
        by_case = {c: [r for r in in_cell if r["case"] == c] for c in (*RUN_CASES, *VARIANTS)}
        stats = {c: mean_std([r["test_acc"] for r in rs]) for c, rs in by_case.items() if rs}
        walls = {c: sum(r["wall_s"] for r in rs) / len(rs) for c, rs in by_case.items() if rs}
        four = [c for c in CASES if c in stats]
        if not four:
            continue
        best = max(four, key=lambda c: stats[c][0])
        autos = by_case[AUTO]
        picks = [r["picked_case"] for r in autos if r.get("picked_case")]
        hits = [p in stats and stats[best][0] - stats[p][0] <= tolerance for p in picks]
        advisor_s = [r["advisor_s"] for r in autos if r.get("advisor_s") is not None]
        four_cost = sum(walls[c] for c in four)
        first = in_cell[0]
        out.append(
            {
                "cell": cell,
                "similarity": first["similarity"],
                "size": first["size"],
                "per_class": first["per_class"],
                "seeds": max(len(rs) for rs in by_case.values()),
                "cases": {c: {"mean": stats[c][0], "std": stats[c][1], "wall_s": walls[c]} for c in stats},
                "best": best,
                "picks": [r.get("picked", "?") for r in autos],
                "hits": sum(hits),
                "pick_count": len(picks),
                "advisor_s": sum(advisor_s) / len(advisor_s) if advisor_s else None,
                "four_cases_s": four_cost,
                "cost_ratio": (sum(advisor_s) / len(advisor_s)) / four_cost if advisor_s else None,
                "warnings": {c: sum(r["warnings"] for r in rs) for c, rs in by_case.items() if rs},
            }
        )
    return out


def _fmt(stat: dict[str, float] | None, seeds: int) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if seeds > 1 else f"{stat['mean']:.3f}"


def markdown(cells_: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = [
        "# The 2×2 on real data (`make matrix-real`)",
        "",
        "Embedded ImageNet MobileNetV2; CIFAR-10 stands for *similar* data (natural photos, "
        f"{DATASETS['cifar10'][1]} px), MNIST for *different* data (digits, {DATASETS['mnist'][1]} px). "
        f"Small = {settings['small']} train images per class ({len(settings['small_seeds'])} seeds: mean ± std), "
        f"large = {settings['large']} per class ({len(settings['large_seeds'])} seed). Each case runs with its own "
        "defaults (small cases: 50 head epochs on cached `bf16_channels_last` features; large cases: 5 epochs "
        "of fine-tuning, fp32). Figures are test-set accuracy (10,000 images) of the best-by-validation "
        f"checkpoint (validation: {settings['val_fraction']:.0%} of the training set). `auto` is "
        "`case=auto`: the advisor, then the case it picks. Cost ratio: the advisor's time ÷ the wall time of "
        "running the four cases. Generated by `python -m studies.matrix_real`.",
        "",
        "| cell | "
        + " | ".join(f"`{c}`" for c in RUN_CASES)
        + " | best | advisor's pick | hit (≤ 1 pt) | advisor s | cost ratio |",
        "|---|" + "---|" * (len(RUN_CASES) + 5),
    ]
    for c in cells_:
        accs = []
        for case in RUN_CASES:
            cell = _fmt(c["cases"].get(case), c["seeds"])
            accs.append(f"**{cell}**" if case == c["best"] else cell)
        picks = ", ".join(sorted(set(c["picks"])))
        ratio = f"{c['cost_ratio']:.1%}" if c["cost_ratio"] is not None else "–"
        adv = f"{c['advisor_s']:.1f}" if c["advisor_s"] is not None else "–"
        lines.append(
            f"| {c['similarity']}, {c['size']} ({c['cell']}, {c['per_class']}/class) | "
            + " | ".join(accs)
            + f" | `{c['best']}` | {picks} | {c['hits']}/{c['pick_count']} | {adv} | {ratio} |"
        )
    if any(v in c["cases"] for c in cells_ for v in VARIANTS):
        lines += ["", "LP-FT beside the default fine-tuning (test accuracy; same seeds):", ""]
        cols = [k for pair in zip(["large_similar", "large_different"], VARIANTS, strict=True) for k in pair]
        lines.append("| cell | " + " | ".join(f"`{k}`" for k in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for c in cells_:
            lines.append(
                f"| {c['cell']} | " + " | ".join(_fmt(c["cases"].get(k), c["seeds"]) for k in cols) + " |"
            )
    lines += ["", "Mean wall time per run (s, process start to end, this machine):", ""]
    all_runs = (*RUN_CASES, *VARIANTS)
    lines.append("| cell | " + " | ".join(f"`{c}`" for c in all_runs) + " |")
    lines.append("|---|" + "---|" * len(all_runs))
    for c in cells_:
        walls = [f"{c['cases'][k]['wall_s']:.0f}" if k in c["cases"] else "–" for k in all_runs]
        lines.append(f"| {c['cell']} | " + " | ".join(walls) + " |")
    warned = [f"{c['cell']}: " + ", ".join(f"{k} {n}" for k, n in c["warnings"].items() if n) for c in cells_]
    warned = [w for w in warned if not w.endswith(": ")]
    lines += ["", "Collapse warnings raised (runs): " + ("; ".join(warned) if warned else "none") + "."]
    return "\n".join(lines) + "\n"


def plot(cells_: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells_), figsize=(3.2 * len(cells_), 3.4), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], cells_, strict=True):
        names = [k for k in (*RUN_CASES, *VARIANTS) if k in c["cases"]]
        means = [c["cases"][k]["mean"] for k in names]
        stds = [c["cases"][k]["std"] for k in names]
        colors = [
            "tab:orange"
            if k == AUTO
            else "tab:green"
            if k == c["best"]
            else "tab:gray"
            if k in VARIANTS
            else "tab:blue"
            for k in names
        ]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(names)), [k.replace("_", "\n") for k in names], fontsize=7)
        ax.set_title(f"{c['similarity']}, {c['size']}\n{c['cell']}", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle("The 2×2 on real data: best case green, case=auto orange, LP-FT grey", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merged_rows(
    runs: Sequence[Run], out_dir: Path, earlier: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Each planned run's row: from its folder when it finished here, else from an earlier report."""
    stored = {(r["cell"], r["case"], r["seed"]): r for r in earlier}
    rows = []
    for run in runs:
        row = collect(run, out_dir) or stored.get((run.cell.name, run.case, run.seed))
        if row is not None:
            rows.append(row)
    return rows


def report(
    runs: Sequence[Run],
    out_dir: Path,
    results: Path,
    settings: dict[str, Any],
    earlier: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    rows = merged_rows(runs, out_dir, earlier)
    cells_ = summarise(rows)
    results.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(results / "matrix_real.csv", "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in rows for k in r))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    (results / "matrix_real.json").write_text(
        json.dumps({"settings": settings, "cells": cells_, "runs": rows}, indent=2) + "\n"
    )
    (results / "matrix_real.md").write_text(markdown(cells_, settings))
    if cells_:
        plot(cells_, results / "matrix_real.png")
    return cells_


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("outputs/matrix_real"), help="run folders")
    p.add_argument("--results", type=Path, default=Path("notebooks/results"), help="report folder")
    p.add_argument("--small", type=int, default=20, help="train images per class, small cells")
    p.add_argument("--large", type=int, default=1000, help="train images per class, large cells")
    p.add_argument("--small-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--large-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--val-fraction", type=float, default=0.04, help="of the training set, for validation")
    p.add_argument("--no-variants", action="store_true", help="skip the LP-FT runs")
    p.add_argument(
        "--only", help="run only the runs whose name contains this (e.g. mnist_small); the report covers all"
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from finished runs")
    p.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="an earlier report's JSON: its runs stand in for run folders missing here",
    )
    args = p.parse_args(argv)
    # Read before anything is run: the report written at the end may overwrite the same file.
    earlier = [row for path in args.merge for row in json.loads(path.read_text())["runs"]]

    settings = {
        "small": args.small,
        "large": args.large,
        "small_seeds": args.small_seeds,
        "large_seeds": args.large_seeds,
        "val_fraction": args.val_fraction,
    }
    all_cells = cells(args.small, args.large, args.small_seeds, args.large_seeds)
    # `--only` picks what runs; the report always covers the whole plan (a partial one would
    # overwrite the committed table with a few rows).
    runs = plan(all_cells, args.only, not args.no_variants)
    train_cmd = [str(Path(sys.executable).with_name("transfer-train"))]
    if args.dry_run:
        for run in runs:
            state = "done" if finished(args.out_dir / run.name) else "todo"
            print(f"[{state}] {run.name}: transfer-train {' '.join(run.overrides(args.val_fraction))}")
        return 0
    if not args.report_only:
        todo = [r for r in runs if not finished(args.out_dir / r.name)]
        print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to go", flush=True)
        for i, run in enumerate(todo, 1):
            wall = execute(run, args.out_dir, args.val_fraction, train_cmd)
            ok = (
                "ok"
                if finished(args.out_dir / run.name)
                else f"FAILED (see {args.out_dir / run.name}/matrix_log.txt)"
            )
            print(f"[{i}/{len(todo)}] {run.name}: {wall['wall_s']:.0f} s {ok}", flush=True)
    cells_ = report(
        plan(all_cells, None, not args.no_variants), args.out_dir, args.results, settings, earlier
    )
    print((args.results / "matrix_real.md").read_text())
    return 0 if cells_ else 1


if __name__ == "__main__":
    sys.exit(main())
