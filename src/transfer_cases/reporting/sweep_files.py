"""A sweep's report files: report.md, report.csv, report.html and the two charts.

Every file is written atomically (whole or absent; a full disk or read-only folder is one message
naming --out). report.html is the same report in one self-contained file, its table sortable.
"""

from __future__ import annotations

import csv
import io
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transfer_cases.reporting import html as h
from transfer_cases.reporting.charts import DPI, curves_figure, results_figure
from transfer_cases.reporting.formats import fmt_score, fmt_time, job_id, short
from transfer_cases.utils.atomic import atomic_text, atomic_write, atomic_write_text

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
NUMERIC_COLUMNS = ("job", "val acc", "F1", "train time", "trainable params", "epochs")


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.csv, report.html, report.png and learning_curves.png; returns them
    by kind (markdown, csv, html, chart, curves)."""
    out = Path(out_dir)
    paths = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "html": out / "report.html",
        "chart": out / "report.png",
        "curves": out / "learning_curves.png",
    }
    atomic_write_text(paths["markdown"], markdown(rows), what="report", setting="--out")
    with atomic_text(paths["csv"], what="report CSV", setting="--out") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    pngs = {}
    for key, figure in (("chart", results_figure(rows)), ("curves", curves_figure(rows))):
        buffer = io.BytesIO()
        figure.savefig(buffer, dpi=DPI, format="png")
        pngs[key] = buffer.getvalue()
        atomic_write(
            paths[key], lambda f, data=pngs[key]: f.write(data), what="report chart", setting="--out"
        )
    atomic_write_text(paths["html"], sweep_html(rows, pngs, out), what="HTML report", setting="--out")
    return paths


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    extra = ["other overrides"] if any(r["overrides"] for r in rows) else []
    scores = ["val acc", "F1", "train time", "trainable params", "epochs", "status"]
    return ["job", "case", "backbone", "init", *extra, *scores]


def table_cells(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    cells = {
        "job": job_id(row),
        "case": row["case"] or "-",
        "backbone": row["backbone"] or "-",
        "init": row["init"] or "-",
        "other overrides": row["overrides"],
        "val acc": fmt_score(row["val_acc"]),
        "F1": fmt_score(row["val_f1"]),
        "train time": fmt_time(row["train_time_s"]),
        "trainable params": f"{row['trainable_params']:,}" if row["trainable_params"] is not None else "-",
        "epochs": str(row["epochs"]) if row["epochs"] is not None else "-",
        "status": "ok" if row["status"] == "ok" else f"failed: {short(row['error'])}",
    }
    return [cells[c] for c in columns]


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [r for r in rows if r["val_acc"] is not None]
    return max(scored, key=lambda r: r["val_acc"]) if scored else None


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    columns = table_columns(rows)
    lines = ["# Sweep report", ""]
    if rows:
        lines += [f"Sweep: `{rows[0]['dir'].parent}`", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in table_cells(r, columns)) + " |" for r in rows]
    best = best_row(rows)
    if best:
        lines += ["", f"Best val acc: **{fmt_score(best['val_acc'])}**: {best['label']}, job {job_id(best)}."]
    lines += ["", "![accuracy and training time](report.png)", "", "![learning curves](learning_curves.png)"]
    lines += ["", "## Failed jobs", ""]
    failed = [r for r in rows if r["status"] != "ok"]
    for row in failed:
        error = textwrap.indent(row["error"], "  ")
        lines += [f"- **{row['label']}** in `{row['job']}`:", "", "  ```", error, "  ```", ""]
    if not failed:
        lines.append("None.")
    return "\n".join(lines).rstrip() + "\n"


def sweep_html(rows: Sequence[dict[str, Any]], pngs: dict[str, bytes], out: Path) -> str:
    """The sweep side by side: a sortable table (each job linked to its own report.html when it has
    one), the accuracy/time chart, the learning curves, and every failed job with its error."""
    columns = table_columns(rows)
    cells = []
    for row in rows:
        values = [h.esc(v) for v in table_cells(row, columns)]
        report = Path(row["dir"]) / "report.html"
        if report.is_file():
            link = Path(os.path.relpath(report.resolve(), out.resolve())).as_posix()
            values[0] = f'<a href="{h.esc(link)}">{values[0]}</a>'
        cells.append(values)
    classes = ["" if r["status"] == "ok" else "failed" for r in rows]
    table = h.table(columns, cells, numeric=NUMERIC_COLUMNS, row_classes=classes, raw=True)
    best = best_row(rows)
    summary = "<p>No job finished.</p>"
    if best:
        label = f"{h.esc(best['label'])}, job {h.esc(job_id(best))}"
        summary = f"<p>Best val acc: <b>{fmt_score(best['val_acc'])}</b>: {label}.</p>"
    sweep = f"<p class=muted>Sweep: <code>{h.esc(rows[0]['dir'].parent)}</code></p>" if rows else ""
    failed = [r for r in rows if r["status"] != "ok"]
    errors = "".join(
        f"<p><b>{h.esc(r['label'])}</b> in <code>{h.esc(r['job'])}</code>:</p><pre>{h.esc(r['error'])}</pre>"
        for r in failed
    )
    return h.page(
        "Sweep report",
        [
            sweep,
            h.section("Jobs (click a header to sort)", table, summary),
            h.section(
                "Accuracy and training time", h.img(h.png_uri(pngs["chart"]), "accuracy and training time")
            ),
            h.section("Learning curves", h.img(h.png_uri(pngs["curves"]), "learning curves")),
            h.section("Failed jobs", errors or "<p>None.</p>"),
        ],
    )
