"""The crossover study's report: per (data set, N) the best head-only and the best fine-tuning case
(mean ± std over seeds), the fine-tuning gain with its spread, the crossover N per data set, wall
time per case; written as `crossover.{md,csv,json,png}` under the results folder."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studies.crossover_records import CASES, FINETUNE, GAIN_THRESHOLD, HEAD_ONLY, load_cells, mean_std


def _family_best(cells: Sequence[dict[str, Any]], family: Sequence[str]) -> tuple[str | None, list[float]]:
    """The family's best case by mean test accuracy over the seeds, and its accuracies.

    Chosen on the mean (one case for the whole (data set, N) row), not per seed: the per-seed
    best would add a max-of-noise bias to whichever family has more cases."""
    means = {}
    for case in family:
        accs = [c["test_acc"][case] for c in cells if case in c["test_acc"]]
        if accs:
            means[case] = (sum(accs) / len(accs), accs)
    if not means:
        return None, []
    # Only cases run on as many seeds as the family's most-run case: a mean over other seeds
    # (a case still to run on seeds 1 and 2) is not comparable.
    most = max(len(accs) for _, accs in means.values())
    best = max((k for k in means if len(means[k][1]) == most), key=lambda k: means[k][0])
    return best, means[best][1]


def summarise(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (data set, N): best head-only and best fine-tuning case, gain and its spread."""
    from studies.crossover import DATASETS

    order = list(DATASETS)
    rows = []
    keys = {(c["dataset"], c["per_class"]) for c in cells}
    for key in sorted(keys, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k)):
        group = [c for c in cells if (c["dataset"], c["per_class"]) == key]
        head, head_accs = _family_best(group, HEAD_ONLY)
        ft, ft_accs = _family_best(group, FINETUNE)
        # The gain per seed, between the two chosen cases, on the seeds that ran both.
        gains = [
            c["test_acc"][ft] - c["test_acc"][head]
            for c in group
            if head and ft and head in c["test_acc"] and ft in c["test_acc"]
        ]
        cases = {}
        for case in CASES:
            accs = [c["test_acc"][case] for c in group if case in c["test_acc"]]
            walls = [c["wall_s"][case] for c in group if c["wall_s"].get(case) is not None]
            if accs or walls:
                m, s = mean_std(accs) if accs else (None, None)
                cases[case] = {
                    "mean": m,
                    "std": s,
                    "n": len(accs),
                    "wall_s": sum(walls) / len(walls) if walls else None,
                }
        ratios = [
            c["advice_timings"]["total_s"] / c["forward_pass"]["seconds"]
            for c in group
            if c.get("advice_timings") and c.get("forward_pass") and c["forward_pass"].get("seconds")
        ]
        rows.append(
            {
                "dataset": key[0],
                "per_class": key[1],
                "seeds": sorted({c["seed"] for c in group}),
                "best_head_only": head,
                "head_only": mean_std(head_accs) if head_accs else None,
                "best_finetune": ft,
                "finetune": mean_std(ft_accs) if ft_accs else None,
                "gain": mean_std(gains) if gains else None,
                "gain_seeds": len(gains),
                "cases": cases,
                "gain_seed0_all_cases": next((c["gain"] for c in group if c["seed"] == 0), None),
                "advised": sorted({c["advice"]["case"] for c in group if c.get("advice")}),
                "advisor_cost_ratio": sum(ratios) / len(ratios) if ratios else None,
                "failed": sorted({f for c in group for f in c["failed"]}),
            }
        )
    return rows


def crossover_n(
    rows: Sequence[dict[str, Any]], dataset: str, threshold: float = GAIN_THRESHOLD
) -> int | None:
    """The smallest N from which the mean gain stays >= threshold at every larger N measured;
    None when the gain at the largest measured N is below it (none within the range)."""
    measured = sorted((r["per_class"], r["gain"][0]) for r in rows if r["dataset"] == dataset and r["gain"])
    found = None
    for n, gain in reversed(measured):
        if gain < threshold:
            break
        found = n
    return found


def _pm(stat: tuple[float, float] | None, seeds: int, scale: float = 1.0, signed: bool = False) -> str:
    if stat is None:
        return "-"
    fmt = "+.1f" if signed else ".1f"
    m = format(stat[0] * scale, fmt)
    return f"{m} ± {stat[1] * scale:.1f}" if seeds > 1 else m


def not_run(out_dir: Path) -> list[str]:
    """The planned steps without a record, per data set: `N=10 (all)`, `N=200 seed 1: <cases>`.
    `small_different` is not counted when its cell's advice cuts nothing (it is not run then)."""
    from studies.crossover import ADVICE, advised_keep, pending, plan

    missing: dict[tuple[str, int], dict[int, list[str]]] = {}
    for st in pending(plan(), out_dir):
        if st.kind == "small_different" and advised_keep(out_dir, st) == (True, None):
            continue
        missing.setdefault((st.dataset, st.per_class), {}).setdefault(st.seed, []).append(st.kind)
    lines: dict[str, list[str]] = {}
    for (d, n), by_seed in sorted(missing.items()):
        for seed, kinds in sorted(by_seed.items()):
            what = "all" if ADVICE in kinds else ", ".join(f"`{k}`" for k in kinds)
            lines.setdefault(d, []).append(f"N={n} seed {seed}: {what}")
    return [f"{d}: " + "; ".join(parts) for d, parts in lines.items()]


def markdown(rows: Sequence[dict[str, Any]], settings: dict[str, Any], missing: Sequence[str] = ()) -> str:
    from studies.crossover import DATASETS

    lines = [
        "# Where fine-tuning starts to pay: the crossover study (`make crossover`)",
        "",
        settings["what"],
        "",
        "Crossover N (the smallest N per class from which the fine-tuning gain stays ≥ +1 point at "
        "every larger N measured):",
        "",
    ]
    for d in DATASETS:
        if any(r["dataset"] == d for r in rows):
            n = crossover_n(rows, d)
            lines.append(f"- **{d}**: " + (f"N = {n}" if n is not None else "none within the range measured"))
    lines += [
        "",
        "Test accuracy (%, mean ± std over seeds) of the best head-only case and of the best "
        "fine-tuning case (each chosen on its mean over the seeds, among the cases run on as many seeds as "
        "any of its family), and the gain (best fine-tuning - "
        "best head-only, points, mean ± std of the per-seed differences). Last but one column: the gain "
        "on seed 0 alone with every case that ran on it (cases run on seed 0 only are left out of the "
        "three-seed comparison):",
        "",
        "| data set | N/class | seeds | best head-only | acc | best fine-tuning | acc | gain (pts) "
        "| gain, seed 0, all cases | advisor picked |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = len(r["seeds"])
        head, ft = _pm(r["head_only"], k, 100), _pm(r["finetune"], k, 100)
        gain = _pm(r["gain"], r["gain_seeds"], 100, True)
        g0 = "-" if r["gain_seed0_all_cases"] is None else f"{r['gain_seed0_all_cases'] * 100:+.1f}"
        lines.append(
            f"| {r['dataset']} | {r['per_class']} | {k} | `{r['best_head_only']}` | {head} "
            f"| `{r['best_finetune']}` | {ft} | {gain} | {g0} | {', '.join(r['advised']) or '-'} |"
        )
    lines += [
        "",
        "Every case (test accuracy %, mean over seeds; in brackets the wall time per run, s, mean: "
        "the 2 cores were shared with other work, so times vary by up to several-fold between "
        "like runs):",
        "",
    ]
    lines.append("| data set | N/class | " + " | ".join(f"`{c}`" for c in CASES) + " |")
    lines.append("|---|---|" + "---|" * len(CASES))
    for r in rows:
        vals = []
        for c in CASES:
            s = r["cases"].get(c)
            acc = f"{s['mean'] * 100:.1f}" if s and s["mean"] is not None else "-"
            wall = f" ({s['wall_s']:.0f} s)" if s and s["wall_s"] is not None else ""
            vals.append(acc + wall)
        lines.append(f"| {r['dataset']} | {r['per_class']} | " + " | ".join(vals) + " |")
    ratios = [r["advisor_cost_ratio"] for r in rows if r["advisor_cost_ratio"] is not None]
    if ratios:
        lines += [
            "",
            f"Advisor cost ÷ one plain forward pass over its subset (cold cache, per cell): "
            f"{min(ratios):.2f}-{max(ratios):.2f} (mean {sum(ratios) / len(ratios):.2f}); by cell "
            "(the subset holds min(N, 100) images per class):",
            "",
            "| data set | advisor cost ÷ one pass, by N per class (mean over seeds) |",
            "|---|---|",
        ]
        for d in dict.fromkeys(r["dataset"] for r in rows):
            cells = [r for r in rows if r["dataset"] == d and r["advisor_cost_ratio"] is not None]
            lines.append(
                f"| {d} | "
                + " · ".join(f"{r['per_class']}: {r['advisor_cost_ratio']:.2f}" for r in cells)
                + " |"
            )
    failed = [f"{r['dataset']} N={r['per_class']}: {', '.join(r['failed'])}" for r in rows if r["failed"]]
    lines += ["", "Failed runs: " + ("; ".join(failed) if failed else "none") + "."]
    lines += ["", settings["cut"], ""]
    if missing:
        lines += ["Planned but not run (no record):", "", *[f"- {m}" for m in missing], ""]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for ax in axes:
        for d in dict.fromkeys(r["dataset"] for r in rows):
            pts = [
                (r["per_class"], r["gain"][0] * 100, r["gain"][1] * 100)
                for r in rows
                if r["dataset"] == d and r["gain"]
            ]
            if pts:
                xs, ys, es = zip(*pts, strict=True)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=d)
        ax.axhline(GAIN_THRESHOLD * 100, color="k", linestyle="--", linewidth=1, label="+1 point")
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("training images per class (N)")
    axes[0].set_ylabel("fine-tuning gain (points of test accuracy)")
    axes[0].set_title("Best fine-tuning - best head-only (error bars: std over seeds)", fontsize=9)
    axes[1].set_ylim(-12, 12)
    axes[1].set_title("The same, gains within ±12 points", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out_dir: Path, results: Path, settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write crossover.{md,csv,json,png} from the records under `out_dir`; returns the rows."""
    from studies.crossover import study_settings

    settings = settings or study_settings()
    cells = load_cells(out_dir)
    rows = summarise(cells)
    results.mkdir(parents=True, exist_ok=True)
    flat = [
        {
            "dataset": c["dataset"],
            "per_class": c["per_class"],
            "seed": c["seed"],
            **{f"test_acc/{k}": c["test_acc"].get(k) for k in CASES},
            **{f"wall_s/{k}": c["wall_s"].get(k) for k in CASES},
            "best_head_only": c["best_head_only"],
            "best_finetune": c["best_finetune"],
            "gain": c["gain"],
            "advised_case": (c["advice"] or {}).get("case"),
            "advice_path": c["advice_path"],
        }
        for c in cells
    ]
    if flat:
        with open(results / "crossover.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
    crossovers = {d: crossover_n(rows, d) for d in dict.fromkeys(r["dataset"] for r in rows)}
    (results / "crossover.json").write_text(
        json.dumps({"settings": settings, "crossover_n": crossovers, "rows": rows, "cells": flat}, indent=2)
        + "\n"
    )
    (results / "crossover.md").write_text(markdown(rows, settings, not_run(out_dir)))
    if rows:
        plot(rows, results / "crossover.png")
    return rows
