"""The crossover study's records on disk and the per-cell view of them (`load_cells`).

Layout under the output folder (default `outputs/crossover/`), one JSON file per finished step:

    train/<dataset>/n<N>/seed<S>/<case>.json   one training run (test/val accuracy, wall time, ...)
    advice/<dataset>/n<N>/seed<S>.json         the advisor on that training set (refreshable alone)

Training and advice records live apart so that recomputing the advice (`--advice-only`) never
touches a training result. Every file is written atomically (temporary file, then rename): a killed
study leaves finished records whole and nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HEAD_ONLY = ("small_similar", "small_different")
FINETUNE = ("large_similar", "large_different", "large_different+lpft")
CASES = (*HEAD_ONLY, *FINETUNE)
# A gain of at least this much (test accuracy, fraction) counts as "fine-tuning pays".
GAIN_THRESHOLD = 0.01
CUT_PREFIX = "small_different"  # records small_different.json and small_different-k<keep>.json


def train_path(out_dir: Path, dataset: str, per_class: int, seed: int, case: str) -> Path:
    return Path(out_dir) / "train" / dataset / f"n{per_class}" / f"seed{seed}" / f"{case}.json"


def advice_path(out_dir: Path, dataset: str, per_class: int, seed: int) -> Path:
    return Path(out_dir) / "advice" / dataset / f"n{per_class}" / f"seed{seed}.json"


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader (or a killed writer) never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def best_of(test_acc: dict[str, float], cases: Sequence[str]) -> tuple[str | None, float | None]:
    """The case with the highest test accuracy among `cases` that have one."""
    have = [c for c in cases if test_acc.get(c) is not None]
    if not have:
        return None, None
    best = max(have, key=lambda c: test_acc[c])
    return best, test_acc[best]


def cell_view(
    dataset: str, per_class: int, seed: int, runs: dict[str, dict[str, Any]], advice: dict[str, Any] | None
) -> dict[str, Any]:
    """One (data set, N, seed) cell from its training records (case -> record) and advice record."""
    ok = {c: r for c, r in runs.items() if r.get("status") == "ok" and r.get("test_acc") is not None}
    # Extra cuts (`small_different-k<keep>`, run where the advice cuts elsewhere than the study's
    # own cut) score a pick; they are not cases of their own.
    cut_acc = {_cut(r): float(r["test_acc"]) for c, r in ok.items() if c.startswith(CUT_PREFIX)}
    runs = {c: r for c, r in runs.items() if c in CASES}
    ok = {c: r for c, r in ok.items() if c in CASES}
    test_acc = {c: float(r["test_acc"]) for c, r in ok.items()}
    head, head_acc = best_of(test_acc, HEAD_ONLY)
    ft, ft_acc = best_of(test_acc, FINETUNE)
    num_classes = next((r.get("num_classes") for r in runs.values() if r.get("num_classes")), None)
    if num_classes is None and advice:
        num_classes = (advice.get("advice") or {}).get("num_classes")
    return {
        "dataset": dataset,
        "per_class": per_class,
        "seed": seed,
        "num_classes": num_classes,
        "advice": (advice or {}).get("advice"),
        "advice_timings": (advice or {}).get("timings"),
        "forward_pass": (advice or {}).get("forward_pass"),
        "advice_path": (advice or {}).get("path"),
        "test_acc": test_acc,
        "cut": _cut(runs.get("small_different")),
        "cut_acc": cut_acc,
        "val_acc": {c: r.get("val_acc") for c, r in ok.items()},
        "wall_s": {c: r.get("wall_s") for c, r in runs.items()},
        "failed": sorted(c for c, r in runs.items() if r.get("status") != "ok"),
        "best_head_only": head,
        "best_head_only_acc": head_acc,
        "best_finetune": ft,
        "best_finetune_acc": ft_acc,
        "gain": ft_acc - head_acc if head_acc is not None and ft_acc is not None else None,
    }


def load_cells(out_dir: Path | str = "outputs/crossover") -> list[dict[str, Any]]:
    """Every (data set, N per class, seed) cell that has a training or an advice record.

    Each cell is a dict:
        dataset (str: cifar10 | mnist | hymenoptera | ...), per_class (int: train images per class),
        seed (int: drives the training subset and the runs), num_classes (int | None),
        advice (dict | None: `Advice.to_dict()` of the advisor run on this training set: case, keep,
            best_stage, depth, per-stage probe scores with their learning curve, ...),
        advice_timings (dict | None: the advisor's timings, seconds, from its first, cold run),
        forward_pass (dict | None: {"images", "seconds"}: one plain forward pass of the pretrained
            body over the advisor's subset, for the advisor's cost ratio),
        advice_path (str | None: the advice record's file, to join on),
        test_acc (dict case -> test accuracy, finished runs only; cases are `CASES`),
        cut (int | None: the stages `small_different` kept, `case.keep` of its run),
        cut_acc (dict keep -> test accuracy of `small_different` at that cut: the study's own and
            any extra cut run for a pick, `small_different-k<keep>.json`),
        val_acc (dict case -> best validation accuracy), wall_s (dict case -> seconds),
        failed (list of cases whose run failed),
        best_head_only / best_finetune (str | None: the best case of each family, by test accuracy),
        best_head_only_acc / best_finetune_acc (float | None),
        gain (float | None: best_finetune_acc - best_head_only_acc, a fraction; >= 0.01 means
            fine-tuning gained at least one point).
    Cells are sorted by data set, N, seed. A cell whose runs are still missing has partial dicts.
    """
    out_dir = Path(out_dir)
    keys: set[tuple[str, int, int]] = set()
    runs: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for path in sorted((out_dir / "train").glob("*/n*/seed*/*.json")):
        record = read_json(path)
        if record is None:
            continue
        key = (path.parts[-4], int(path.parts[-3][1:]), int(path.parts[-2][4:]))
        keys.add(key)
        runs.setdefault(key, {})[path.stem] = record
    advices: dict[tuple[str, int, int], dict[str, Any]] = {}
    for path in sorted((out_dir / "advice").glob("*/n*/seed*.json")):
        record = read_json(path)
        if record is None:
            continue
        key = (path.parts[-3], int(path.parts[-2][1:]), int(path.stem[4:]))
        keys.add(key)
        advices[key] = {**record, "path": str(path)}
    return [cell_view(*key, runs.get(key, {}), advices.get(key)) for key in sorted(keys)]


def _cut(record: dict[str, Any] | None) -> int | None:
    """`case.keep` of a `small_different` run, from its overrides."""
    for override in (record or {}).get("overrides", ()):
        if override.startswith("case.keep="):
            return int(override.split("=", 1)[1])
    return None
