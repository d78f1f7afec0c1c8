"""Does the advisor's probe rank the stages the way the trained head does? A diagnostic of the
crossover study's cut misses (docs/advisor.md).

For cells of the crossover study that have an advice record, train the head-only case at every
stage (`small_different` with `case.keep=k`, and `small_similar` for the full body) with the
template's head recipe as it is (the data module's batch size, 128) and with smaller batches
(`data.batch_size` so that an epoch holds at least `MIN_STEPS` steps: the same 50 epochs, more
optimizer steps), and set each stage's test accuracy beside the probe's cross-validated accuracy
from the advice record. Every run is a real `transfer-train` on cached features, forked like the
study's.

    python -m studies.head_vs_probe --cells mnist_oe48/n20/seed0 cifar10_av/n20/seed0
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studies.crossover import DATASETS, Step, run_forked, train_child
from studies.crossover_records import advice_path, read_json, write_json
from transfer_cases.advise.scores import StageScores

MIN_STEPS = 10  # optimizer steps per epoch in the small-batch column
DEFAULT_BATCH = 128  # the data configs' batch_size


def parse_cell(name: str) -> tuple[str, int, int]:
    dataset, n, seed = name.strip("/").split("/")
    return dataset, int(n.removeprefix("n")), int(seed.removeprefix("seed"))


def run_stage(cell: tuple[str, int, int], keep: int | None, batch: int, out_dir: Path) -> dict[str, Any]:
    dataset, n, seed = cell
    kind = "small_similar" if keep is None else "small_different"
    step = Step(dataset, n, seed, kind)
    run_dir = out_dir / "runs" / dataset / f"n{n}" / f"seed{seed}" / f"{kind}-k{keep}-b{batch}"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = [*step.overrides(keep), f"data.batch_size={batch}", f"hydra.run.dir={run_dir}"]
    code, wall = run_forked(train_child(argv), run_dir.with_suffix(".log"), 600)
    if code != 0:
        print(f"{run_dir.name}: exit {code}, see {run_dir.with_suffix('.log')}", flush=True)
    summary = read_json(run_dir / "summary.json") or {}
    metrics = summary.get("metrics") or {}
    for ckpt in run_dir.rglob("*.ckpt"):
        ckpt.unlink()
    return {"test_acc": metrics.get("test/acc"), "train_acc": metrics.get("train/acc"), "wall_s": wall}


def diagnose(cell: tuple[str, int, int], study_dir: Path, out_dir: Path) -> dict[str, Any]:
    record = read_json(advice_path(study_dir, *cell))
    if record is None:
        raise SystemExit(f"no advice record for {cell} under {study_dir}: run the crossover study first")
    advice = record["advice"]
    train_images = cell[1] * DATASETS[cell[0]].num_classes
    small = max(1, math.ceil(train_images / MIN_STEPS))
    rows = []
    for stage in advice["stages"]:
        keep = None if stage["stage"] == advice["depth"] else stage["stage"]
        scores = StageScores.from_dict(stage)
        row = {"stage": scores.stage, "width": scores.width, "probe": scores.probe_pretrained}
        row["probe_sem"] = scores.probe_pretrained_sem
        for label, batch in (("default", DEFAULT_BATCH), ("small", small)):
            result = run_stage(cell, keep, batch, out_dir)
            row[label] = result["test_acc"]
            row[f"{label}_train"] = result["train_acc"]
            print(f"{'/'.join(map(str, cell))} stage {stage['stage']} batch {batch}: {result}", flush=True)
        rows.append(row)
    return {"cell": cell, "small_batch": small, "advice_case": advice["case"], "rows": rows}


def markdown(results: Sequence[dict[str, Any]]) -> str:
    out = [
        "# The probe against the trained head, stage by stage (`python -m studies.head_vs_probe`)",
        "",
        f"Test accuracy of the head-only case at every stage (`small_different` with `case.keep`, the "
        f"full body `small_similar`), 50 head epochs on cached features, with the data module's batch "
        f"({DEFAULT_BATCH}) and with batches small enough for {MIN_STEPS} optimizer steps per epoch; "
        "beside it the advisor's probe from the cell's advice record (5-fold cross-validated, scaled "
        "as the advice was computed: per feature in round 1 of the derived tasks). Train accuracy in "
        "brackets.",
        "",
    ]
    for r in results:
        dataset, n, seed = r["cell"]
        out += [
            f"## {dataset}, {n} per class, seed {seed} (advisor: `{r['advice_case']}`)",
            "",
            f"| stage | width | probe | head, batch {DEFAULT_BATCH} | head, batch {r['small_batch']} |",
            "|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            out.append(
                f"| {row['stage']} | {row['width']} | {row['probe']:.3f} ± {row['probe_sem']:.3f} | "
                f"{_acc(row['default'], row['default_train'])} | {_acc(row['small'], row['small_train'])} |"
            )
        out.append("")
    return "\n".join(out)


def _acc(test: float | None, train: float | None) -> str:
    if test is None:
        return "failed"
    return f"{test:.3f} ({train:.2f})" if train is not None else f"{test:.3f}"


def main(argv: Sequence[str] | None = None) -> None:
    from transfer_cases.commands import train  # noqa: F401 - imported once here, not in every child

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", required=True, help="data set/nN/seedS of the crossover study")
    p.add_argument("--study-dir", type=Path, default=Path("outputs/crossover"))
    p.add_argument("--out-dir", type=Path, default=Path("outputs/head_vs_probe"))
    p.add_argument("--results", type=Path, default=Path("notebooks/results"))
    args = p.parse_args(argv)
    results = [diagnose(parse_cell(c), args.study_dir, args.out_dir) for c in args.cells]
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "head_vs_probe.json", results)
    (args.results / "head_vs_probe.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
