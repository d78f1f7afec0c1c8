"""`transfer-report FOLDER [--out DIR]`: the report of a sweep, or the report.html of one run.

For a `transfer-train -m` sweep: one table (terminal, report.md, report.csv, a sortable
report.html) and two charts, so the cases can be compared side by side; failed or crashed jobs
stay in the report as failed rows, so a sweep never silently loses a case. For a run folder (one
with summary.json): its report.html, rebuilt from what the run left there.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transfer_cases.commands.cli import console, friendly_errors
from transfer_cases.reporting.charts import DPI, curves_figure, results_figure
from transfer_cases.reporting.run_report import write_run_report
from transfer_cases.reporting.sweep import collect_runs
from transfer_cases.reporting.sweep_files import (
    CSV_FIELDS,
    NUMERIC_COLUMNS,
    table_cells,
    table_columns,
    write_report,
)
from transfer_cases.reporting.table import layout
from transfer_cases.training.summary import SUMMARY_FILE
from transfer_cases.utils.errors import DataError

__all__ = ["CSV_FIELDS", "DPI", "collect_runs", "curves_figure", "main", "results_figure", "write_report"]

MULTIRUNS_DIR = Path("outputs/train/multiruns")
# Shorter headers for an 80-column terminal; the table prints a legend when it uses them.
ABBREVIATIONS = {"trainable params": "params", "train time": "time", "backbone": "body", "epochs": "ep"}


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


def print_rows(rows: Sequence[dict[str, Any]], width: int = 80) -> None:
    """The report table within `width` columns (terminal or log file alike), failed jobs in red,
    then each failed job's error in full."""
    columns = table_columns(rows)
    cells = []
    for row in rows:
        values = table_cells(row, columns)
        values[columns.index("status")] = row["status"]  # the errors follow the table, in full
        cells.append(values)
    table = layout(
        columns,
        cells,
        width=width,
        numeric=NUMERIC_COLUMNS,
        abbreviations=ABBREVIATIONS,
        key="job",
        keep=("val acc", "status"),
        title="sweep report",
    )
    plain = {"highlight": False, "soft_wrap": True, "markup": False}
    for line in [*table.head, table.header, table.rule]:
        console.print(line, **plain)
    for row, line in zip(rows, table.lines, strict=True):
        console.print(line, style=None if row["status"] == "ok" else "red", **plain)
    for line in table.foot:
        console.print(line, **plain)
    for row in rows:
        if row["status"] != "ok":
            console.print(f"failed: {row['job']}: {row['error']}", style="red", **plain)


@friendly_errors
def main(argv: Sequence[str] | None = None) -> None:
    """Exit status 2 when there is nothing to report; 0 otherwise, failed jobs included."""
    parser = argparse.ArgumentParser(prog="transfer-report", description=__doc__)
    parser.add_argument("sweep_dir", help="a `transfer-train -m` sweep folder, a run folder, or `latest`")
    parser.add_argument("--out", type=Path, help="folder for the report files (default: the folder itself)")
    args = parser.parse_args(argv)
    folder = _resolve_sweep_dir(args.sweep_dir)
    rows = collect_runs(folder)
    if not rows and (folder / SUMMARY_FILE).is_file():
        path = write_run_report(folder, args.out, strict=True)
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
        return
    if not rows:
        raise DataError(
            f"no runs in {folder}: expected job folders with .hydra/ (from `transfer-train -m`) "
            f"or a run folder with {SUMMARY_FILE}"
        )
    print_rows(rows)
    for path in write_report(rows, args.out or folder).values():
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)  # whole paths, for copy and paste


if __name__ == "__main__":
    main()
