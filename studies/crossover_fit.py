"""The advisor's fine-tuning rule fitted and validated on the crossover study, leave one data set out.

The rule family and this procedure are in docs/advisor.md ("The predicted fine-tuning gain"),
written down before any crossover result was read. Per cell (data set, N per class, seed) of
`studies.crossover.load_cells`, `decide` runs again on the advisor's stored evidence with candidate
parameters (n0 = `break_even_per_class`, beta = `finetune_exponent`); the pick is a *hit* when its
test accuracy is within `HIT_MARGIN` of the cell's best case. For each data set: fit on the
others (most hits, then least regret, then the most head-only parameters), count hits and list
every miss on it. Beside it: the fit on all data sets (the shipped defaults, in sample), the
unfitted first guess, and the old rule (large by count, the probe improving or leaving > 0.10).

    python -m studies.crossover_fit                         # outputs/crossover -> notebooks/results
    python -m studies.crossover_fit --partial               # also cells with some runs missing
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from studies.crossover import DATASETS, DERIVED, load_cells
from studies.crossover_records import CASES, FINETUNE, HEAD_ONLY
from transfer_cases.advise.decide import Advice, Rules, case_for, decide

HIT_MARGIN = 0.01  # the "best case or within 1 point of it"
BREAK_EVEN_GRID = (10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1000, 1500, 2000)
EXPONENT_GRID = (0.25, 0.5, 1.0, 2.0)
FIRST_GUESS = {"break_even_per_class": 100, "finetune_exponent": 1.0}  # before any fit
Picker = Callable[[dict[str, Any]], Advice]
# The cut and "unrelated" rules before they were changed after reading this study (docs/advisor.md).
BEFORE_CHANGE = Rules(full_body_on_tie=False, unrelated_needs_evidence=False)


def scored_cells(cells: Sequence[dict[str, Any]], partial: bool) -> tuple[list[dict[str, Any]], int]:
    """Cells with advice and, unless `partial`, a record for every case (ok or failed); and how many
    were left out. A partial cell needs one result of each family."""
    kept = []
    for cell in cells:
        done = set(cell["test_acc"]) | set(cell["failed"])
        has_families = any(c in cell["test_acc"] for c in HEAD_ONLY) and any(
            c in cell["test_acc"] for c in FINETUNE
        )
        if cell["advice"] and (done >= set(CASES) or (partial and has_families)):
            kept.append(cell)
    return kept, len(cells) - len(kept)


def rules_picker(rules: Rules) -> Picker:
    def pick(cell: dict[str, Any]) -> Advice:
        stored = Advice.from_dict(cell["advice"])
        return decide(stored.samples_per_class, stored.stages, stored.num_classes, rules)

    return pick


def old_rule(cell: dict[str, Any]) -> Advice:
    """The rule before issue 23: large by count (median >= 100) fine-tunes when the probe at the
    best stage still improves (last doubling > max(0.01, 1 SE)) or leaves > 0.10 error."""
    advice = rules_picker(Rules())(cell)
    best = next(s for s in advice.stages if s.stage == advice.best_stage)
    curve = best.curve_gain()
    improving = curve is None or curve[0] > max(0.01, curve[1])
    finetune = advice.per_class_median >= 100 and (improving or 1 - best.probe_pretrained > 0.10)
    case, init, keep = case_for(
        "large" if advice.per_class_median >= 100 else "small", advice.similarity, advice.best_stage, finetune
    )
    return replace(advice, case=case, init=init, keep=keep)


def outcome(cell: dict[str, Any], advice: Advice) -> dict[str, Any]:
    """The pick, the best case, their accuracies, hit and regret (None: the pick was not run)."""
    acc = cell["test_acc"]
    best = max(acc, key=acc.get)
    picked = advice.case if advice.init == "pretrained" else f"{advice.case} (scratch)"
    got = acc.get(picked)
    if picked == "small_different" and cell.get("cut") not in (None, advice.keep):
        got = cell.get("cut_acc", {}).get(advice.keep)  # the study's cut is another: an extra run, if any
    row = {
        "dataset": cell["dataset"],
        "per_class": cell["per_class"],
        "seed": cell["seed"],
        "pick": picked,
        "keep": advice.keep,
        "best": best,
        "pick_acc": got,
        "best_acc": acc[best],
        "test_acc": acc,
        "measured_gain": cell["gain"],
        "predicted_gain": None if advice.gain is None else round(advice.gain.gain, 4),
        "confidence": None if advice.gain is None else advice.gain.confidence,
    }
    row["hit"] = None if got is None else got >= acc[best] - HIT_MARGIN
    # The family alone (head-only or fine-tuning): its best case within the margin of the best.
    family = HEAD_ONLY if picked in HEAD_ONLY else FINETUNE
    family_best = max((acc[c] for c in family if c in acc), default=None)
    row["family_hit"] = None if family_best is None else family_best >= acc[best] - HIT_MARGIN
    row["regret"] = None if got is None else acc[best] - got
    return row


def evaluate(cells: Sequence[dict[str, Any]], picker: Picker) -> list[dict[str, Any]]:
    return [outcome(cell, picker(cell)) for cell in cells]


def fit(cells: Sequence[dict[str, Any]], base: Rules) -> tuple[Rules, int]:
    """The grid's best parameters on `cells`: most hits, then least regret, then larger n0, then
    smaller beta (the more head-only rule); and their hit count."""
    best_key, best_rules, best_hits = None, base, 0
    for n0, beta in itertools.product(BREAK_EVEN_GRID, EXPONENT_GRID):
        rules = replace(base, break_even_per_class=n0, finetune_exponent=beta)
        rows = [r for r in evaluate(cells, rules_picker(rules)) if r["hit"] is not None]
        hits = sum(r["hit"] for r in rows)
        key = (hits, -round(sum(r["regret"] for r in rows), 6), n0, -beta)
        if best_key is None or key > best_key:
            best_key, best_rules, best_hits = key, rules, hits
    return best_rules, best_hits


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in rows if r["hit"] is not None]
    return {
        "hits": sum(r["hit"] for r in scored),
        "cells": len(scored),
        "unscored": len(rows) - len(scored),
        "family_hits": sum(bool(r["family_hit"]) for r in rows),
        "misses": [r for r in scored if not r["hit"]],
    }


def source(dataset: str) -> str:
    """The data set a task's images come from: a derived task is held out with its source."""
    return DATASETS[dataset].config if dataset in DATASETS else dataset


def run(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    base = Rules(finetune_source="fitted by studies/crossover_fit.py")
    datasets = sorted({c["dataset"] for c in cells})
    loo = {}
    for held in sorted({source(d) for d in datasets}):
        train = [c for c in cells if source(c["dataset"]) != held]
        rules, train_hits = fit(train, base)
        rows = evaluate([c for c in cells if source(c["dataset"]) == held], rules_picker(rules))
        loo[held] = {
            "fitted_on": sorted({c["dataset"] for c in train}),
            "break_even_per_class": rules.break_even_per_class,
            "finetune_exponent": rules.finetune_exponent,
            "train_hits": train_hits,
            "train_cells": len(train),
            **summary(rows),
            "rows": rows,
        }
    final, _ = fit(cells, base)
    others = {
        "fitted on all (in sample)": rules_picker(final),
        "shipped defaults (fitted before the derived tasks ran)": rules_picker(Rules()),
        "shipped, with the cut and unrelated rules before the change": rules_picker(BEFORE_CHANGE),
        "first guess (n0=100, beta=1; not fitted)": rules_picker(replace(base, **FIRST_GUESS)),
        "old rule (count + improving/headroom)": old_rule,
    }
    compare = {}
    for name, picker in others.items():
        rows = evaluate(cells, picker)
        compare[name] = {d: summary([r for r in rows if r["dataset"] == d]) for d in datasets}
    validation = {}
    for round_ in sorted(set(DERIVED.values())):
        fresh = [c for c in cells if DERIVED.get(c["dataset"]) == round_]
        if fresh:
            validation[round_] = {
                "datasets": sorted({c["dataset"] for c in fresh}),
                "rules": {
                    name: summary(evaluate(fresh, rules_picker(rules)))
                    for name, rules in (
                        ("shipped", Rules()),
                        ("shipped, cut and unrelated rules as before round 1", BEFORE_CHANGE),
                    )
                },
            }
    return {
        "datasets": datasets,
        "cells": len(cells),
        "validation": validation,
        "leave_one_out": loo,
        "final": {
            "break_even_per_class": final.break_even_per_class,
            "finetune_exponent": final.finetune_exponent,
        },
        "compare": compare,
        "grid": {"break_even_per_class": BREAK_EVEN_GRID, "finetune_exponent": EXPONENT_GRID},
    }


def _keep(row: dict[str, Any]) -> str:
    return f" (keep {row['keep']})" if row.get("keep") is not None else ""


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def miss_lines(misses: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for m in misses:
        accs = ", ".join(f"{c} {a:.3f}" for c, a in sorted(m["test_acc"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {m['dataset']} | {m['per_class']} | {m['seed']} | "
            f"`{m['pick']}`{_keep(m)} {_fmt(m['pick_acc'])} | "
            f"`{m['best']}` {_fmt(m['best_acc'])} | {_fmt(m['predicted_gain'])} | "
            f"{_fmt(m['measured_gain'])} | {accs} |"
        )
    return lines


def markdown(result: dict[str, Any], left_out: int, partial: bool) -> str:
    loo = result["leave_one_out"]
    out = [
        "# The advisor's fine-tuning rule, leave one data set out (`python -m studies.crossover_fit`)",
        "",
        "Rule family and procedure: [docs/advisor.md](../../docs/advisor.md#the-predicted-fine-tuning-gain). "
        f"A hit: the pick's test accuracy within {HIT_MARGIN:g} of the cell's best case. "
        f"Cells: {result['cells']} scored ({'with' if partial else 'without'} partial cells), "
        f"{left_out} left out (no advice or runs missing).",
        "",
        *validation_lines(result["validation"]),
        "## Leave one data source out",
        "",
        "A derived task is held out with the data set its images come from (fitting on CIFAR-10 to "
        "predict CIFAR-10 animals against vehicles would not be held out).",
        "",
        "| held out | fitted on | n0 | beta | hits on the fit's data | held-out hits | right family "
        "| unscored |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d, r in loo.items():
        out.append(
            f"| {d} | {', '.join(r['fitted_on']) or '(nothing)'} | {r['break_even_per_class']:g} | "
            f"{r['finetune_exponent']:g} | {r['train_hits']}/{r['train_cells']} | "
            f"**{r['hits']}/{r['cells']}** | {r['family_hits']}/{r['cells'] + r['unscored']} | "
            f"{r['unscored']} |"
        )
    total = sum(r["hits"] for r in loo.values()), sum(r["cells"] for r in loo.values())
    family = sum(r["family_hits"] for r in loo.values())
    everything = total[1] + sum(r["unscored"] for r in loo.values())
    out += [
        f"| all | | | | | **{total[0]}/{total[1]}** | {family}/{everything} | |",
        "",
        "*right family*: the best case of the picked family (head-only or fine-tuning) is within the "
        "margin of the best, whichever case of it the advisor named (its cut is the best-stage rule's).",
        "",
    ]
    header = "| data set | N/class | seed | pick | best | predicted gain | measured gain | all cases |"
    rule = "|---|---|---|---|---|---|---|---|"
    misses = [m for r in loo.values() for m in r["misses"]]
    out += (
        ["## Every held-out miss", "", header, rule, *miss_lines(misses), ""] if misses else ["No miss.", ""]
    )
    final = result["final"]
    out += [
        f"## Other rules on all cells (the final fit: n0 = {final['break_even_per_class']:g}, "
        f"beta = {final['finetune_exponent']:g})",
        "",
        "| rule | " + " | ".join(result["datasets"]) + " |",
        "|---|" + "---|" * len(result["datasets"]),
    ]
    for name, per in result["compare"].items():
        cells = (
            f"{s['hits']}/{s['cells']}" + (f" ({s['unscored']} unscored)" if s["unscored"] else "")
            for s in per.values()
        )
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    shipped = [m for s in next(iter(result["compare"].values())).values() for m in s["misses"]]
    out += ["", "Misses of the fit on all (in sample):", ""]
    out += [header, rule, *miss_lines(shipped), ""] if shipped else ["None.", ""]
    out += ["## Predicted against measured gain (held-out fits)", "", *gain_table(loo), ""]
    return "\n".join(out)


# What each round of derived tasks was run to validate (docs/advisor.md).
ROUND_VALIDATES = {
    1: "the cut and *unrelated* rules changed after reading the first study's misses",
    2: "the probe's shared scaling, changed after reading round 1's misses",
}


def validation_lines(validation: dict[int, dict[str, Any]]) -> list[str]:
    """The shipped rule on each round of derived tasks, run after the change it validates."""
    if not validation:
        return []
    out = [
        "## Validation on data not yet used: the derived tasks",
        "",
        "Each round of derived tasks ran after the change it validates was committed. The picks are "
        "the shipped advisor's on the stored evidence (n0 and beta fitted on CIFAR-10, MNIST and the "
        "ants/bees); beside them the same with the cut and *unrelated* rules as before round 1. "
        "A later round's change also applies to the earlier rounds' picks: those are then no longer "
        "fresh (the figures when each round was fresh are in docs/advisor.md).",
        "",
        "| round | tasks | validates | rule | hits | right family | unscored |",
        "|---|---|---|---|---|---|---|",
    ]
    header = "| data set | N/class | seed | pick | best | predicted gain | measured gain | all cases |"
    rule = "|---|---|---|---|---|---|---|---|"
    misses = []
    for round_, r in validation.items():
        for name, v in r["rules"].items():
            out.append(
                f"| {round_} | {', '.join(r['datasets'])} | {ROUND_VALIDATES.get(round_, '')} | {name} | "
                f"**{v['hits']}/{v['cells']}** | {v['family_hits']}/{v['cells'] + v['unscored']} | "
                f"{v['unscored']} |"
            )
        misses += r["rules"]["shipped"]["misses"]
    out += ["", "Misses of the shipped rule there:", ""]
    out += [header, rule, *miss_lines(misses), ""] if misses else ["None.", ""]
    return out


def gain_table(loo: dict[str, Any]) -> list[str]:
    """Per data set and N: the predicted gain (each data set's held-out fit) against the measured
    one (best fine-tuning - best head-only), means over seeds; the picks and hits."""
    lines = [
        "| data set | N/class | seeds | predicted gain | measured gain | picks | hits |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = sorted((r for d in loo.values() for r in d["rows"]), key=lambda r: (r["dataset"], r["per_class"]))
    for (dataset, n), group in itertools.groupby(rows, key=lambda r: (r["dataset"], r["per_class"])):
        group = list(group)
        pred = [r["predicted_gain"] for r in group if r["predicted_gain"] is not None]
        meas = [r["measured_gain"] for r in group if r["measured_gain"] is not None]
        picks = ", ".join(sorted({r["pick"] for r in group}))
        hits = sum(bool(r["hit"]) for r in group)
        lines.append(
            f"| {dataset} | {n} | {len(group)} | {_fmt(_mean(pred))} | {_fmt(_mean(meas))} | {picks} | "
            f"{hits}/{sum(r['hit'] is not None for r in group)} |"
        )
    return lines


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="outputs/crossover", help="the study's records")
    parser.add_argument("--results", default="notebooks/results", help="where crossover_fit.{md,json} go")
    parser.add_argument("--partial", action="store_true", help="also score cells with some runs missing")
    args = parser.parse_args(argv)
    cells, left_out = scored_cells(load_cells(args.out_dir), args.partial)
    if not cells:
        raise SystemExit(f"no scored cell under {args.out_dir} (run the study, or try --partial)")
    result = run(cells)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "crossover_fit.json").write_text(json.dumps({**result, "left_out": left_out}, indent=2) + "\n")
    (results / "crossover_fit.md").write_text(markdown(result, left_out, args.partial))
    print(markdown(result, left_out, args.partial))


if __name__ == "__main__":
    main()
