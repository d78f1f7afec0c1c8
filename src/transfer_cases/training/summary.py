"""`summary.json`: one small file per run that reports and sweeps read instead of parsing logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from transfer_cases.utils.atomic import atomic_write_text

SUMMARY_FILE = "summary.json"


@rank_zero_only
def write_summary(
    cfg: DictConfig, status: str, result: dict[str, Any] | None = None, error: str | None = None
) -> Path:
    """Write `<output_dir>/summary.json` with the run's case, backbone, status, metrics and timings.

    Written atomically: a full disk leaves the previous file (or none), never a truncated one.
    """
    out = Path(cfg.paths.output_dir)
    backbone = cfg.get("backbone") or {}
    summary = {
        "status": status,
        "error": error,
        "case": cfg.case.name if "case" in cfg else None,
        "init": cfg.case.get("init") if "case" in cfg else None,
        "backbone": backbone.get("arch") or str(backbone.get("_target_", "")).rsplit(".", 1)[-1],
        "data": str(cfg.data.get("root")) if "data" in cfg else None,
        **(result or {}),
    }
    path = out / SUMMARY_FILE
    atomic_write_text(path, json.dumps(summary, indent=2, default=str) + "\n", what="run summary")
    return path


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None
