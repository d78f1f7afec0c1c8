"""`case=auto`: run the advisor, then train the case it recommends."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from transfer_cases.advise.advisor import advise_from_config
from transfer_cases.advise.decide import Advice
from transfer_cases.advise.report import train_command, write_advice
from transfer_cases.paths import config_dir

log = logging.getLogger(__name__)

AUTO = "auto"


def resolve_auto_case(cfg: DictConfig) -> Advice | None:
    """Replace `case=auto` in `cfg` by the recommended case (in place); returns the advice (None when
    the case is not auto). Fields the user set on the auto case (`case.epochs=10`) are kept."""
    if cfg.case.get("name") != AUTO:
        return None
    advice, timings = advise_from_config(cfg)
    case = OmegaConf.load(Path(config_dir()) / "case" / f"{advice.case}.yaml")
    case.init = advice.init
    if advice.keep is not None:
        case.keep = advice.keep
    user = {k: v for k, v in cfg.case.items() if k != "name" and v is not None}
    with open_dict(cfg):
        cfg.case = OmegaConf.merge(case, user)
    out = Path(cfg.paths.output_dir)
    write_advice(advice, out, timings=timings)
    log.info(
        "case=auto -> %s (%s data, %s; best stage %d of %d) in %.1f s; equivalent to: %s; advice in %s",
        advice.case,
        advice.size,
        advice.similarity,
        advice.best_stage,
        advice.depth,
        timings["total_s"],
        train_command(advice),
        out / "advice.json",
    )
    for line in advice.warnings:
        log.warning("advisor: %s", line)
    return advice
