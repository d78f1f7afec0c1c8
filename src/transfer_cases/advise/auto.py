"""`case=auto`: run the advisor, then train the case it recommends.

Under DDP every rank runs `transfer-train` (Lightning's launcher starts ranks > 0 as copies of the
command; torchrun and SLURM start them all at once). Only global rank 0 advises; it writes
`advice.json` atomically, and the other ranks wait for it and train the same case.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from transfer_cases.advise.advisor import advise_from_config
from transfer_cases.advise.decide import Advice
from transfer_cases.advise.report import ADVICE_JSON, train_command, user_overrides, write_advice
from transfer_cases.utils.errors import ConfigError
from transfer_cases.utils.paths import config_dir

log = logging.getLogger(__name__)

AUTO = "auto"
# How long ranks other than 0 wait for rank 0's advice (it extracts features first).
DEFAULT_WAIT_S = 3600.0
POLL_S = 0.5


# Set by the launchers: torchrun (RANK, LOCAL_RANK), Lightning's launcher (NODE_RANK, LOCAL_RANK for
# the processes it starts), SLURM (SLURM_PROCID). Lightning's `rank_zero_only.rank` is not set yet
# when the advisor runs.
RANK_VARIABLES = ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID")


def rank_description(env: Mapping[str, str] | None = None) -> str:
    """The launchers' rank variables that are set, e.g. "RANK=1 LOCAL_RANK=1" ("" when none)."""
    env = os.environ if env is None else env
    return " ".join(f"{k}={env[k].strip()}" for k in RANK_VARIABLES if env.get(k, "").strip())


def is_global_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is global rank 0: every rank variable that is set is 0 (global rank 0
    is local rank 0 on node 0 for every launcher), and a process no launcher started is rank 0."""
    env = os.environ if env is None else env
    return all(int(env[k]) == 0 for k in RANK_VARIABLES if env.get(k, "").strip())


def local_rank(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or 0)


def resolve_auto_case(
    cfg: DictConfig,
    *,
    advise: Callable[..., tuple[Advice, dict[str, float]]] | None = None,
    wait_s: float = DEFAULT_WAIT_S,
) -> Advice | None:
    """Replace `case=auto` in `cfg` by the recommended case (in place); returns the advice (None when
    the case is not auto). Fields the user set on the auto case (`case.epochs=10`) are kept, except
    `case.probe_epochs` when the pick trains no pretrained body (a head-only case, or from scratch):
    LP-FT's head warm-up has nothing to warm up for, so it is dropped with a note."""
    if cfg.case.get("name") != AUTO:
        return None
    out = Path(cfg.paths.output_dir)
    extra = user_overrides()
    if is_global_rank_zero():
        advice, timings = _advise_on_rank_zero(cfg, out, extra, advise or advise_from_config)
    else:
        advice, timings = _wait_for_advice(out / ADVICE_JSON, wait_s), None
    case = OmegaConf.load(Path(config_dir()) / "case" / f"{advice.case}.yaml")
    case.init = advice.init
    if advice.keep is not None:
        case.keep = advice.keep
    user = {k: v for k, v in cfg.case.items() if k != "name" and v is not None}
    if user.get("probe_epochs") and (advice.freeze == "all" or advice.init == "scratch"):
        log.info(
            "case=auto: case.probe_epochs=%s dropped: the advisor picked %s, which %s (LP-FT warms a "
            "head up before fine-tuning a pretrained body)",
            user.pop("probe_epochs"),
            advice.case,
            "trains the head alone" if advice.freeze == "all" else "starts from scratch",
        )
    with open_dict(cfg):
        cfg.case = OmegaConf.merge(case, user)
    if timings is not None:
        log.info(
            "case=auto -> %s (%s data, %s; best stage %d of %d) in %.1f s; equivalent to: %s; advice in %s",
            advice.case,
            advice.size,
            advice.similarity,
            advice.best_stage,
            advice.depth,
            timings["total_s"],
            train_command(advice, extra),
            out / ADVICE_JSON,
        )
        for line in advice.warnings:
            log.warning("advisor: %s", line)
    return advice


def _advise_on_rank_zero(
    cfg: DictConfig, out: Path, extra: Sequence[str], advise: Callable[..., Any]
) -> tuple[Advice, dict[str, float]]:
    """Advise (on this rank's own GPU when the trainer uses CUDA) and write advice.json atomically."""
    # A stale one from an earlier run in this folder must not be read. Lightning starts the other
    # ranks after this returns; under torchrun they start together, and one could read a stale
    # file in the moment before this line runs.
    (out / ADVICE_JSON).unlink(missing_ok=True)
    device = None
    if torch.cuda.is_available() and str(cfg.trainer.get("accelerator", "cpu")) in ("auto", "gpu", "cuda"):
        device = torch.device("cuda", local_rank())
    advice, timings = advise(cfg, device=device)
    write_advice(advice, out, extra_overrides=extra, timings=timings)
    from transfer_cases.reporting.audit_run import audit_if_configured  # with the `audit` group only

    audit_if_configured(cfg, out)
    return advice, timings


def _wait_for_advice(path: Path, wait_s: float) -> Advice:
    """Rank 0's advice, once its advice.json exists (it is written atomically: whole or absent)."""
    deadline = time.monotonic() + wait_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"case=auto: the process with {rank_description() or 'no rank'} waited {wait_s:g} s "
                f"for rank 0's advice in {path}, "
                "which never came; check rank 0's log (did the advisor fail?), or train a named case "
                "(transfer-advise prints the command)"
            )
        time.sleep(POLL_S)
    return Advice.from_dict(json.loads(path.read_text()))
