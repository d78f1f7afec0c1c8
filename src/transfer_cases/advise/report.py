"""What the advisor shows: a per-stage table, a chart, the `transfer-train` command, `advice.json`."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from rich import box
from rich.console import Console
from rich.table import Table

from transfer_cases.advise.decide import Advice
from transfer_cases.advise.gain import GainPrediction
from transfer_cases.utils.atomic import atomic_write, atomic_write_text

ADVICE_JSON = "advice.json"
ADVICE_PNG = "advice.png"
DPI = 120


def user_overrides() -> list[str]:
    """The command line's overrides, for the `transfer-train` command (Hydra's own left out)."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.startswith(("hydra.", "hydra/"))]


def train_command(advice: Advice, extra_overrides: Sequence[str] = ()) -> str:
    """The `transfer-train` command line that trains the advice: the user's overrides (data,
    backbone, ...) first, then the advice's. A user override of `case` or of a key the advice sets
    (`case=auto` included) is dropped, so each key appears once."""
    taken = {"case", *(_key(o) for o in advice.overrides)}
    kept = [o for o in extra_overrides if _key(o) not in taken]
    return shlex.join(["transfer-train", *kept, *advice.overrides])


def stage_table(advice: Advice) -> Table:
    """One row per stage; the chosen stage is marked and bold. To fit 80 columns, LogME of the
    pretrained body and of the control share a cell, and the control's H-score is in advice.json only."""
    show_stride = any(s.stride is not None for s in advice.stages)
    show_h = any(s.h_score_pretrained is not None for s in advice.stages)
    table = Table(
        title=f"evidence per stage -> {advice.case}",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),  # with the box's space between columns: two spaces
        caption="probe: cross-validated linear-probe accuracy (mean ± std over folds); H-score "
        "(shrinkage-based) of the pretrained body; random: "
        + (advice.control or "the same architecture, randomly initialised"),
    )
    table.add_column("stage", justify="right", no_wrap=True)
    table.add_column("width", justify="right", no_wrap=True)
    if show_stride:
        table.add_column("stride", justify="right", no_wrap=True)
    headers = ["LogME\npre / random", *(["H-score\npre"] if show_h else [])]
    for header in (*headers, "probe acc\npretrained", "probe acc\nrandom"):
        table.add_column(header, justify="right", no_wrap=True)
    for s in advice.stages:
        chosen = s.stage == advice.best_stage
        cells = [f"{s.stage}{' ◀' if chosen else ''}", str(s.width)]
        if show_stride:
            cells.append("-" if s.stride is None else str(s.stride))
        cells.append(f"{s.logme_pretrained:.3f} / {s.logme_random:.3f}")
        if show_h:
            cells.append(_maybe(s.h_score_pretrained))
        cells += [
            f"{s.probe_pretrained:.3f} ± {s.probe_pretrained_std:.3f}",
            f"{s.probe_random:.3f} ± {s.probe_random_std:.3f}",
        ]
        table.add_row(*cells, style="bold" if chosen else None)
    return table


def stage_figure(advice: Advice) -> Figure:
    """LogME (top) and probe accuracy (middle) per stage, pretrained vs random, chosen stage marked;
    the probe's learning curve and its extrapolation to the user's images per class (bottom)."""
    stages = [s.stage for s in advice.stages]
    fig = Figure(figsize=(7, 9), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(2, 1))
    logme_ax, probe_ax = top.subplots(2, 1, sharex=True)
    if advice.gain is not None:
        curve_panel(bottom.subplots(), advice.gain)
    logme_ax.plot(stages, [s.logme_pretrained for s in advice.stages], "o-", label="pretrained")
    logme_ax.plot(stages, [s.logme_random for s in advice.stages], "s--", color="gray", label="random init")
    logme_ax.set_ylabel("LogME")
    for key, style, color, label in (
        ("pretrained", "o-", "tab:blue", "pretrained"),
        ("random", "s--", "gray", "random init"),
    ):
        probe_ax.errorbar(
            stages,
            [getattr(s, f"probe_{key}") for s in advice.stages],
            yerr=[getattr(s, f"probe_{key}_std") for s in advice.stages],
            fmt=style,
            color=color,
            capsize=3,
            label=label,
        )
    total = sum(advice.samples_per_class.values())
    if total:
        majority = max(advice.samples_per_class.values()) / total
        probe_ax.axhline(majority, color="tab:red", lw=0.8, ls=":", label="largest class")
    probe_ax.set_ylabel("linear-probe accuracy")
    probe_ax.set_xlabel("stage (width)")
    probe_ax.set_xticks(stages, [f"{s.stage}\n({s.width})" for s in advice.stages])
    for ax in (logme_ax, probe_ax):
        ax.axvline(advice.best_stage, color="tab:green", lw=6, alpha=0.25)
        ax.grid(alpha=0.3)
    probe_ax.legend(loc="best", fontsize="small")
    logme_ax.set_title(f"{advice.case}: best stage {advice.best_stage} of {advice.depth} (green)")
    return fig


def curve_panel(ax: Axes, gain: GainPrediction) -> None:
    """The probe's accuracy against the images per class it trained on (log scale), and the power
    law extrapolated to the user's count: the head-only accuracy the predicted gain starts from."""
    if gain.trained_per_class:
        ax.errorbar(
            gain.trained_per_class,
            gain.curve_acc,
            yerr=gain.curve_std,
            fmt="o-",
            color="tab:blue",
            capsize=3,
            label=f"linear probe at stage {gain.stage} (cross-validated, nested subsets)",
        )
        last = gain.trained_per_class[-1]
        if gain.per_class > last:
            xs = np.geomspace(last, gain.per_class, 20)
            ax.plot(
                xs, [gain.head_acc_at(x) for x in xs], "--", color="tab:blue", label="power law, extrapolated"
            )
    ax.plot(
        [gain.per_class], [gain.head_acc], "*", ms=12, color="tab:orange", label="head-only at your count"
    )
    verdict = "fine-tune" if gain.finetune else "head-only"
    ax.set_title(
        f"predicted fine-tuning gain {gain.gain:+.3f} ± {gain.gain_se:.3f} at {gain.per_class:g}/class "
        f"-> {verdict} ({gain.confidence})",
        fontsize="medium",
    )
    ax.set_xscale("log")
    ax.set_xlabel("images per class (log scale)")
    ax.set_ylabel("probe accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize="small")


def write_advice(
    advice: Advice,
    out_dir: str | Path,
    *,
    extra_overrides: Sequence[str] = (),
    timings: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Write `advice.png`, then `advice.json` (the advice, its command, the timings); returns their
    paths. Both atomically: a reader (another DDP rank) sees a whole file or none, and a folder that
    cannot be created or written is one message (the writer creates it)."""
    out = Path(out_dir)
    paths = {"json": out / ADVICE_JSON, "chart": out / ADVICE_PNG}
    record: dict[str, Any] = {
        **advice.to_dict(),
        "command": train_command(advice, extra_overrides),
        "extra_overrides": list(extra_overrides),
        "timings": dict(timings or {}),
    }
    figure = stage_figure(advice)
    atomic_write(paths["chart"], lambda f: figure.savefig(f, dpi=DPI, format="png"), what="advice chart")
    atomic_write_text(paths["json"], json.dumps(record, indent=2) + "\n", what="advice")
    return paths


def read_advice(path: str | Path) -> Advice:
    """The `Advice` stored in an `advice.json` (or in the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADVICE_JSON
    return Advice.from_dict(json.loads(path.read_text()))


def print_advice(advice: Advice, extra_overrides: Sequence[str] = (), console: Console | None = None) -> None:
    """The table, the reasoning, any warnings, and the command to run."""
    console = console or Console()
    console.print(stage_table(advice))
    if advice.gain is not None:
        console.print(advice.gain.summary(), style="bold", soft_wrap=True, markup=False)
    for line in advice.reasoning:
        console.print(f"  {line}", soft_wrap=True, markup=False)
    for line in advice.warnings:
        console.print(f"[bold yellow]warning:[/] {line}", soft_wrap=True)
    console.print("\nto train it:", style="bold")
    console.print(f"  {train_command(advice, extra_overrides)}", soft_wrap=True, markup=False)


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]
