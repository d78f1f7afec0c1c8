"""The advice step of the crossover study: the advisor on one cell's training set, and its cost.

Runs in a child process (see `studies.crossover.run_forked`). The record keeps `Advice.to_dict()`,
the advisor's timings, and one plain forward pass of the pretrained body over the advisor's own
subset (torch, fp32, eval mode, batches of the data config, image loading included), so its cost
can be stated as a ratio. `refresh=True` (`--advice-only`) recomputes the advice from the warm
feature cache and keeps the first run's timings and forward pass (a warm rerun is not the cost).
`cold=True` (`--advice-cold`) recomputes it in a fresh, temporary feature cache and records the new
timings and forward pass: the cost of the advisor as it is now; the earlier pick stays in the record
(`previous_case`, `previous_keep`) so a changed pick shows.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from studies.crossover_records import read_json, write_json
from transfer_cases.utils.config import instantiate_clean
from transfer_cases.utils.paths import config_dir


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """`train.yaml` composed as the CLI would, with Hydra's runtime set so `${hydra:...}` resolves."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def forward_pass(cfg: DictConfig) -> dict[str, float]:
    """Seconds of one plain forward pass of the pretrained body over the advisor's subset."""
    advisor = instantiate_clean(cfg.advisor)
    body = instantiate_clean(cfg.backbone).build(pretrained=True)
    images = instantiate_clean(cfg.data)
    images.preprocess = body.preprocess
    images.setup("fit")
    subset = advisor._subset(images.train_dataset, images.predict_transform())
    loader = DataLoader(subset, batch_size=images.batch_size, num_workers=images.num_workers)
    body.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            body(x)
    return {"images": len(subset), "seconds": round(time.perf_counter() - start, 3)}


def run_advice(step: Any, out_dir: Path, refresh: bool = False, cold: bool = False) -> None:
    """Compute and write one cell's advice record (atomically)."""
    from transfer_cases.advise import advise_from_config

    path = step.record(out_dir)
    old = read_json(path) if (refresh or cold) and path.is_file() else None
    run_dir = out_dir / "runs" / step.dataset / f"n{step.per_class}" / f"seed{step.seed}" / "advice"
    with tempfile.TemporaryDirectory(prefix="advice-cold-") as tmp:
        overrides = [*step.overrides(), *([f"paths.cache_dir={tmp}"] if cold else [])]
        cfg = compose_train(overrides, run_dir)
        torch.manual_seed(step.seed)
        advice, timings = advise_from_config(cfg, device=torch.device("cpu"))
        fresh = forward_pass(cfg) if cold or not (old and old.get("timings")) else None
    record: dict[str, Any] = {
        "dataset": step.dataset,
        "per_class": step.per_class,
        "seed": step.seed,
        "advice": advice.to_dict(),
        "timings": timings,
        "overrides": step.overrides(),
        "forward_pass": fresh,
    }
    if old and cold:
        record["previous_case"], record["previous_keep"] = old["advice"]["case"], old["advice"]["keep"]
    elif old and old.get("timings"):
        record["timings"], record["refresh_timings"] = old["timings"], timings
        record["forward_pass"] = old.get("forward_pass")
    write_json(path, record)
