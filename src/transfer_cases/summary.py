"""`summary.json`: one small file per run that reports and sweeps read instead of parsing logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

SUMMARY_FILE = "summary.json"


@rank_zero_only
def write_summary(
    cfg: DictConfig, status: str, result: dict[str, Any] | None = None, error: str | None = None
) -> Path:
    """Write `<output_dir>/summary.json` with the run's case, backbone, status, metrics and timings."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None
