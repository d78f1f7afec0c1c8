"""`transfer-report SWEEP_DIR [--out DIR]`: one table and two charts for a `transfer-train -m` sweep.

Each job of a sweep leaves `summary.json` (and `csv/metrics.csv`); this gathers them so the four
cases can be compared side by side: accuracy against training cost, and how each one learned.
Failed or crashed jobs stay in the report as failed rows, so a sweep never silently loses a case.
"""

from __future__ import annotations

import argparse
import csv
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf
from rich import box
from rich.table import Table

from transfer_cases.commands.cli import console, friendly_errors
from transfer_cases.training.summary import read_summary
from transfer_cases.utils.atomic import atomic_text, atomic_write, atomic_write_text
from transfer_cases.utils.errors import DataError

MULTIRUNS_DIR = Path("outputs/train/multiruns")
CSV_FIELDS = (
    "job",
    "case",
    "backbone",
    "init",
    "overrides",
    "status",
    "val_acc",
    "val_f1",
    "train_time_s",
    "trainable_params",
    "epochs",
    "error",
)
# Overrides with a column of their own; the label only repeats them when they vary.
SHOWN_KEYS = ("case", "backbone", "case.init")
TEXT_COLUMNS = ("job", "case", "backbone", "init", "other overrides", "status")
DPI = 120
FAILED_COLOR = "tab:red"


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


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.csv, report.png and learning_curves.png; returns them by kind.

    Each atomically (whole or absent; a full disk or read-only folder is one message naming --out),
    names of any bytes kept (see transfer_cases.utils.atomic)."""
    out = Path(out_dir)
    paths = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "chart": out / "report.png",
        "curves": out / "learning_curves.png",
    }
    atomic_write_text(paths["markdown"], _markdown(rows), what="report", setting="--out")
    with atomic_text(paths["csv"], what="report CSV", setting="--out") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for key, figure in (("chart", results_figure(rows)), ("curves", curves_figure(rows))):
        save = lambda f, fig=figure: fig.savefig(f, dpi=DPI, format="png")  # noqa: E731
        atomic_write(paths[key], save, what="report chart", setting="--out")
    return paths


def _table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    extra = ["other overrides"] if any(r["overrides"] for r in rows) else []
    scores = ["val acc", "F1", "train time", "trainable params", "epochs", "status"]
    return ["job", "case", "backbone", "init", *extra, *scores]


def _table_cells(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    cells = {
        "job": _job_id(row),
        "case": row["case"] or "-",
        "backbone": row["backbone"] or "-",
        "init": row["init"] or "-",
        "other overrides": row["overrides"],
        "val acc": _fmt_score(row["val_acc"]),
        "F1": _fmt_score(row["val_f1"]),
        "train time": _fmt_time(row["train_time_s"]),
        "trainable params": f"{row['trainable_params']:,}" if row["trainable_params"] is not None else "-",
        "epochs": str(row["epochs"]) if row["epochs"] is not None else "-",
        "status": "ok" if row["status"] == "ok" else f"failed: {_short(row['error'])}",
    }
    return [cells[c] for c in columns]


def _job_id(row: dict[str, Any]) -> str:
    return row["job"] if row["num"] is None else str(row["num"])


def _markdown(rows: Sequence[dict[str, Any]]) -> str:
    columns = _table_columns(rows)
    lines = ["# Sweep report", ""]
    if rows:
        lines += [f"Sweep: `{rows[0]['dir'].parent}`", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _table_cells(r, columns)) + " |" for r in rows]
    scored = [r for r in rows if r["val_acc"] is not None]
    if scored:
        best = max(scored, key=lambda r: r["val_acc"])
        lines += [
            "",
            f"Best val acc: **{_fmt_score(best['val_acc'])}**: {best['label']}, job {_job_id(best)}.",
        ]
    lines += ["", "![accuracy and training time](report.png)", "", "![learning curves](learning_curves.png)"]
    lines += ["", "## Failed jobs", ""]
    failed = [r for r in rows if r["status"] != "ok"]
    for row in failed:
        error = textwrap.indent(row["error"], "  ")
        lines += [f"- **{row['label']}** in `{row['job']}`:", "", "  ```", error, "  ```", ""]
    if not failed:
        lines.append("None.")
    return "\n".join(lines).rstrip() + "\n"


def _short(error: str | None, width: int = 60) -> str:
    lines = (error or "").strip().splitlines()
    first = lines[0] if lines else "unknown error"
    return first if len(first) <= width else first[: width - 1] + "…"


def _fmt_score(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def results_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Val accuracy and training time per job, side by side: the accuracy a case buys and its cost.

    Failed jobs get a hatched, empty, red bar labelled "failed" in both panels.
    """
    fig = Figure(figsize=(11, 1.2 + 0.55 * max(len(rows), 1)), layout="constrained")
    acc_ax, time_ax = fig.subplots(1, 2, sharey=True)
    labels = [r["label"] for r in rows]
    max_time = max((r["train_time_s"] or 0 for r in rows), default=0) or 1.0
    panels = (
        (acc_ax, "val_acc", 1.0, "tab:blue", _fmt_score, "val accuracy"),
        (time_ax, "train_time_s", max_time, "tab:orange", _fmt_time, "training time"),
    )
    for ax, key, full, color, fmt, title in panels:
        for y, row in enumerate(rows):
            value = row[key]
            if row["status"] != "ok":
                ax.barh(y, full, fill=False, hatch="//", edgecolor=FAILED_COLOR, linewidth=1.2)
                ax.text(full / 2, y, "failed", ha="center", va="center", color=FAILED_COLOR, weight="bold")
            elif value is not None:
                ax.barh(y, value, color=color)
                ax.text(value + 0.01 * full, y, fmt(value), va="center", fontsize=9)
        ax.set_xlim(0, full * 1.18)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    acc_ax.set_yticks(range(len(rows)), labels)
    acc_ax.invert_yaxis()  # job 0 on top, as in the table
    time_ax.set_xlabel("seconds")
    acc_ax.set_xlabel("accuracy")
    return fig


def curves_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Val accuracy per epoch, one line per job (dashed for failed jobs, as far as they got)."""
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    plotted = [r for r in rows if r["curve"]]
    for row in plotted:
        epochs, values = zip(*row["curve"], strict=True)
        failed = row["status"] != "ok"
        label = f"{row['label']} (failed)" if failed else row["label"]
        ax.plot(epochs, values, marker="o", markersize=4, linestyle="--" if failed else "-", label=label)
    if plotted:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, frameon=False)
    else:
        ax.text(0.5, 0.5, "no val/acc in csv/metrics.csv", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    return fig


def _resolve_sweep_dir(arg: str) -> Path:
    """The folder named on the command line; `latest` is the newest sweep under outputs/train/multiruns."""
    if arg == "latest" and not Path(arg).exists():
        sweeps = sorted(d for d in MULTIRUNS_DIR.glob("*") if d.is_dir()) if MULTIRUNS_DIR.is_dir() else []
        if not sweeps:
            raise DataError(f"no sweeps under {MULTIRUNS_DIR}/; run `transfer-train -m ...` first")
        return sweeps[-1]  # named by start time (%Y-%m-%d_%H-%M-%S_%f), so the last sorts newest
    path = Path(arg)
    if not path.is_dir():
        raise DataError(f"no such folder: {path}")
    return path


def _print_rows(rows: Sequence[dict[str, Any]]) -> None:
    """The report table in the terminal, failed jobs in red."""
    columns = _table_columns(rows)
    table = Table(title="sweep report", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for column in columns:
        text = column in TEXT_COLUMNS
        # Two-line headers and folded text keep the table whole in an 80-column terminal.
        header = column.replace(" ", "\n")
        table.add_column(header, justify="left" if text else "right", overflow="fold", no_wrap=not text)
    for row in rows:
        cells = _table_cells(row, columns)
        cells[columns.index("status")] = row["status"]  # the errors follow the table, in full
        table.add_row(*cells, style=None if row["status"] == "ok" else "red")
    console.print(table)
    for row in rows:
        if row["status"] != "ok":
            console.print(
                f"failed: {row['job']}: {row['error']}", style="red", highlight=False, soft_wrap=True
            )


@friendly_errors
def main(argv: Sequence[str] | None = None) -> None:
    """Exit status 2 when there is nothing to report; 0 otherwise, failed jobs included."""
    parser = argparse.ArgumentParser(prog="transfer-report", description=__doc__)
    parser.add_argument("sweep_dir", help="a `transfer-train -m` sweep folder, or `latest`")
    parser.add_argument("--out", type=Path, help="folder for the report files (default: the sweep folder)")
    args = parser.parse_args(argv)
    sweep = _resolve_sweep_dir(args.sweep_dir)
    rows = collect_runs(sweep)
    if not rows:
        raise DataError(f"no runs in {sweep}: expected job folders with .hydra/ (from `transfer-train -m`)")
    _print_rows(rows)
    for path in write_report(rows, args.out or sweep).values():
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)  # whole paths, for copy and paste


if __name__ == "__main__":
    main()
