"""A sweep's jobs as rows: what each job was (case, backbone, overrides) and what it scored.

Each job of a `transfer-train -m` sweep leaves `summary.json` (and `csv/metrics.csv`). Failed or
crashed jobs stay as failed rows naming their error, so a sweep never silently loses a case.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from transfer_cases.training.summary import read_summary

# Overrides with a column of their own; the label only repeats them when they vary.
SHOWN_KEYS = ("case", "backbone", "case.init")


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job folder (a subfolder with `.hydra/`), in job-number order.

    Keys: job (folder name), num, dir, case, backbone, init, status ("ok" | "failed"), val_acc,
    val_f1, train_time_s, trainable_params, epochs, error, curve ([(epoch, val acc)]), overrides
    (those that vary across jobs) and label (for charts). A job without `summary.json` crashed
    hard (or is still running): it is a failed row, not skipped.
    """
    sweep = Path(sweep_dir)
    jobs = sorted((d for d in sweep.iterdir() if (d / ".hydra").is_dir()), key=_job_order)
    rows = [_job_row(d) for d in jobs]
    _add_labels(rows)
    return rows


def _job_num(job_dir: Path) -> int | None:
    """Hydra names job folders `<job.num>_<overrides>`; other names sort after, by name."""
    prefix = job_dir.name.split("_", 1)[0]
    return int(prefix) if prefix.isdigit() else None


def _job_order(job_dir: Path) -> tuple[float, str]:
    num = _job_num(job_dir)
    return (math.inf if num is None else num, job_dir.name)


def _job_row(job_dir: Path) -> dict[str, Any]:
    # A file of this job that cannot be read makes it a failed row that names the file, not a crash
    # of the whole report.
    broken: list[str] = []
    cfg = _load_yaml(job_dir / ".hydra" / "config.yaml", dict, broken)
    overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml", list, broken)
    history = _val_history(job_dir, broken)
    try:
        summary = read_summary(job_dir)
    except ValueError as e:
        summary = {"status": "failed", "error": f"unreadable summary.json: {e}"}
    if summary is None:
        summary = {"status": "failed", "error": "no summary.json: the job crashed hard or is still running"}
    elif not isinstance(summary, dict):
        summary = {"status": "failed", "error": "unreadable summary.json: not a JSON object"}
    else:
        # Fields read as mappings below: another shape (a hand edit, another tool) fails this row only.
        odd = [
            k
            for k in ("metrics", "params")
            if summary.get(k) is not None and not isinstance(summary[k], dict)
        ]
        if odd:
            summary = {
                **{k: v for k, v in summary.items() if k not in odd},
                "status": "failed",
                "error": f"unreadable summary.json: {', '.join(odd)} is not a mapping",
            }
    if broken:
        summary = {**summary, "status": "failed", "error": "; ".join(broken)}
    case = cfg.get("case") or {}
    backbone = cfg.get("backbone") or {}
    ok = summary.get("status") == "ok"
    metrics = summary.get("metrics") or {}
    val_acc, val_f1 = metrics.get("val/acc"), metrics.get("val/f1")
    # The checkpoint callback monitors `optimized_metric`: its best score is the accuracy of the
    # kept model only when that metric is val/acc; F1 is then taken from the same epoch.
    if summary.get("best_score") is not None and cfg.get("optimized_metric", "val/acc") == "val/acc":
        val_acc = summary["best_score"]
        best_epoch = max(sorted(history), key=lambda e: history[e]["val/acc"], default=None)  # first best
        if best_epoch is not None and "val/f1" in history[best_epoch]:
            val_f1 = history[best_epoch]["val/f1"]
    return {
        "job": job_dir.name,
        "num": _job_num(job_dir),
        "dir": job_dir,
        "case": summary.get("case") or case.get("name"),
        "backbone": summary.get("backbone")
        or backbone.get("arch")
        or str(backbone.get("_target_", "")).rsplit(".", 1)[-1],
        "init": summary.get("init") or case.get("init"),
        "all_overrides": [str(o) for o in overrides],
        "status": "ok" if ok else "failed",
        "val_acc": val_acc if ok else None,
        "val_f1": val_f1 if ok else None,
        "train_time_s": summary.get("train_time_s"),
        "trainable_params": (summary.get("params") or {}).get("trainable"),
        "epochs": summary.get("epochs"),
        "error": None if ok else summary.get("error") or "failed without an error message",
        "curve": [(epoch, values["val/acc"]) for epoch, values in sorted(history.items())],
    }


def _load_yaml(path: Path, kind: type, broken: list[str]) -> Any:
    """Plain data of type `kind`, interpolations left unresolved (resolvers such as `${asset:...}`
    are not needed). A file that does not parse as `kind` is named in `broken`, with the reason,
    and read as empty."""
    if not path.is_file():
        return kind()
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        broken.append(f"unreadable {path.parent.name}/{path.name}: {reason}")
        return kind()
    if not isinstance(data, kind):
        broken.append(f"unreadable {path.parent.name}/{path.name}: not a YAML {kind.__name__}")
        return kind()
    return data


def _val_history(job_dir: Path, broken: list[str] | None = None) -> dict[int, dict[str, float]]:
    """`{epoch: {"val/acc": ..., "val/f1": ...}}` from the job's `csv/metrics.csv`, read whole
    (every session of a resumed run appends to it); empty if there is none.

    The CSV logger writes one row per logging event with blanks elsewhere; the last value of an
    epoch wins, so an epoch repeated by a resume counts once. A value that is not a number is
    skipped (and named in `broken`).
    """
    path = job_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    history: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            if line.get("epoch") and line.get("val/acc"):
                try:
                    values = {k: float(line[k]) for k in ("val/acc", "val/f1") if line.get(k)}
                    history[int(float(line["epoch"]))] = values
                except ValueError as e:
                    if broken is not None:
                        broken.append(f"unreadable csv/metrics.csv: {e}")
                    break
    return history


def _add_labels(rows: list[dict[str, Any]]) -> None:
    """Short chart labels: the case, plus whatever else varies across the sweep's jobs."""
    common = set.intersection(*(set(r["all_overrides"]) for r in rows)) if rows else set()
    for row in rows:
        row["overrides"] = ",".join(
            o for o in row["all_overrides"] if o not in common and o.split("=", 1)[0] not in SHOWN_KEYS
        )
        parts = [row["case"] or row["job"]]
        parts += [row[k] for k in ("backbone", "init") if len({r[k] for r in rows}) > 1 and row[k]]
        row["label"] = " · ".join([*parts, row["overrides"]] if row["overrides"] else parts)
