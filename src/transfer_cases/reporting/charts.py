"""The sweep's charts: accuracy against training time per job, and every job's learning curve."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from transfer_cases.reporting.formats import fmt_score, fmt_time

DPI = 120
FAILED_COLOR = "tab:red"


def results_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Val accuracy and training time per job, side by side: the accuracy a case buys and its cost.

    Failed jobs get a hatched, empty, red bar labelled "failed" in both panels.
    """
    fig = Figure(figsize=(11, 1.2 + 0.55 * max(len(rows), 1)), layout="constrained")
    acc_ax, time_ax = fig.subplots(1, 2, sharey=True)
    labels = [r["label"] for r in rows]
    max_time = max((r["train_time_s"] or 0 for r in rows), default=0) or 1.0
    panels = (
        (acc_ax, "val_acc", 1.0, "tab:blue", fmt_score, "val accuracy"),
        (time_ax, "train_time_s", max_time, "tab:orange", fmt_time, "training time"),
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
