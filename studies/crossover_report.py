"""The crossover study's report (placeholder until the table is written)."""

from __future__ import annotations

from pathlib import Path


def report(out_dir: Path, results: Path) -> None:
    return None
