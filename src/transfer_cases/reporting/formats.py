"""How numbers and errors read in every report: tables, charts, terminal and HTML alike."""

from __future__ import annotations

from typing import Any


def fmt_score(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def short(error: str | None, width: int = 60) -> str:
    """An error's first line, cut to `width` characters."""
    lines = (error or "").strip().splitlines()
    first = lines[0] if lines else "unknown error"
    return first if len(first) <= width else first[: width - 1] + "…"


def job_id(row: dict[str, Any]) -> str:
    """A job's number (Hydra's job.num), or its folder name when it has none."""
    return row["job"] if row["num"] is None else str(row["num"])
