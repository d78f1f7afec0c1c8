"""A run as phases: LP-FT's head warm-up on the frozen body, then the case's own fit.

LP-FT (Kumar et al. 2022) first trains the new head on the frozen pretrained body (a linear probe),
then fine-tunes everything from there: the body is no longer pulled around by the gradients of a
random head. Here the warm-up is its own `trainer.fit` on cached features (seconds), and the
fine-tuning another, with a fresh Trainer:

- the optimizer of each phase is built for that phase (head only, then head and body), so no
  parameter is missing from it (the "optimizer built before unfreezing" trap);
- DDP wraps the model after the phase's `requires_grad` flags are set (never changed under it);
- a checkpoint records its phase: resuming from it restores that phase, its freezing and its
  param groups, then runs what is left (the Lightning #21901 trap: a resume that re-freezes).

The probe phase writes `checkpoints/probe-epochNN.ckpt` and logs to `csv/probe/`; both phases
write `checkpoints/last.ckpt`, so `ckpt_path=<run>/checkpoints/last.ckpt` resumes either.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, open_dict

from transfer_cases.training.module import TransferModule, frozen_eval_mode_expected
from transfer_cases.utils.config import instantiate_clean, instantiate_list

PROBE, FIT = "probe", "fit"


@dataclass(frozen=True)
class Phase:
    name: str  # PROBE or FIT
    epochs: int


def plan(module: TransferModule, max_epochs: int, resume_phase: str | None = None) -> list[Phase]:
    """The phases of a run; a resume from a checkpoint of the fit phase skips the probe."""
    phases = []
    if module.case.probe_epochs and resume_phase != FIT:
        phases.append(Phase(PROBE, module.case.probe_epochs))
    phases.append(Phase(FIT, max_epochs))
    return phases


def fit_phases(cfg: DictConfig, module: TransferModule, images: Any) -> tuple[L.Trainer, dict[str, Any]]:
    """Run the phases of `cfg`'s case on the image data module `images`; returns the last phase's
    Trainer (its `datamodule` is what that phase trained on) and a summary per phase.

    A resume (`cfg.ckpt_path`) continues the phase its checkpoint was saved in (`build` has already
    put the checkpoint's weights in the body); later phases start afresh.
    """
    ckpt_path, done = cfg.get("ckpt_path"), {}
    for phase in plan(module, cfg.trainer.max_epochs, module.resume_phase):
        start = time.perf_counter()
        with probing(module) if phase.name == PROBE else nullcontext():
            data = phase_data(cfg, module, images)
            trainer = _fit(phase_config(cfg, phase), module, data, ckpt_path)
        ckpt_path = None
        done[phase.name] = {
            "epochs": trainer.current_epoch,
            "train_time_s": round(time.perf_counter() - start, 2),
            "val/acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
            "feature_cache": getattr(trainer.datamodule, "report", None),
        }
    return trainer, done


def measure_best(
    trainer: L.Trainer, module: TransferModule, best: str, *, test: bool = True
) -> tuple[dict[str, float], dict[str, Any]]:
    """The run's metrics as the best checkpoint scores them, and where they come from.

    After the fit, `callback_metrics` hold the last epoch's values; the best checkpoint (the one
    tested, exported and deployed) is validated again, without the loggers (the history keeps
    one row per epoch), so `val/*` (the search objective, summary.json, the collapse warning)
    and `test/*` describe the same weights. `train/*` stay the last epoch's."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    data = trainer.datamodule
    report = getattr(data, "report", None)
    source = {
        "checkpoint": best or "the last epoch's weights",
        "val_test_inputs": f"{report['eval_extraction']} features of the frozen body" if report else "images",
        "precision": str(trainer.precision),
    }
    if trainer.fast_dev_run:
        return metrics, source
    if best:
        loggers, trainer.loggers = trainer.loggers, []
        try:
            trainer.validate(module, datamodule=data, ckpt_path=best, verbose=False, weights_only=True)
        finally:
            trainer.loggers = loggers
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    if test and data.test_dataset is not None:
        trainer.test(module, datamodule=data, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    rank_zero_info(
        f"metrics of {source['checkpoint']}, val/test on {source['val_test_inputs']} "
        f"(precision {source['precision']})"
    )
    return metrics, source


def phase_data(cfg: DictConfig, module: TransferModule, images: Any) -> Any:
    """What a phase trains on, decided here only: the features of the body as it is now (its freezing
    for the phase set, its weights pretrained or restored) when the body is fully frozen and the cache
    is on, else the images. A fully frozen body is a fixed function: its features are computed once."""
    cache = instantiate_clean(cfg.cache) if cfg.get("cache") else None
    return cache.wrap(images, module.backbone) if cache else images


def _fit(cfg: DictConfig, module: TransferModule, datamodule: Any, ckpt_path: str | None) -> L.Trainer:
    """One `trainer.fit` with the config's trainer, callbacks and loggers, made afresh for the phase."""
    trainer = make_trainer(cfg)
    with frozen_eval_mode_expected():
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer


def make_trainer(cfg: DictConfig) -> L.Trainer:
    """The config's Trainer with its callbacks and loggers.

    The callbacks config decides on the model summary: with `callbacks.model_summary=null` (as in
    the search presets) there is none, where Lightning would otherwise add its own; an explicit
    `trainer.enable_model_summary` still wins."""
    callbacks = instantiate_list(cfg.get("callbacks"))
    extra = {}
    if "enable_model_summary" not in cfg.trainer:
        extra["enable_model_summary"] = any(isinstance(c, ModelSummary) for c in callbacks)
    return instantiate_clean(
        cfg.trainer, callbacks=callbacks, logger=instantiate_list(cfg.get("logger")) or False, **extra
    )


@contextmanager
def probing(module: TransferModule) -> Iterator[TransferModule]:
    """The whole body frozen (eval mode, no gradients, no optimizer state) for the probe phase; the
    case's own freezing comes back afterwards, before any optimizer or DDP wrapper of the next phase."""
    body = module.backbone
    case_frozen, case_bn_eval = body.num_frozen, body.bn_eval
    body.freeze(body.depth)
    module.phase = PROBE
    try:
        yield module
    finally:
        body.freeze(case_frozen)
        body.set_bn_eval(case_bn_eval)
        module.phase = FIT


def phase_config(cfg: DictConfig, phase: Phase) -> DictConfig:
    """The trainer, callback and logger configs of a phase: the probe phase's best checkpoints are
    `probe-...` and its logs go to a `probe` version folder, so the two phases never overwrite
    each other; both write `last.ckpt`, so a resume finds the latest."""
    if phase.name == FIT:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.trainer.max_epochs = phase.epochs
        for c in (cfg.get("callbacks") or {}).values():
            if _is(c, "ModelCheckpoint") and c.get("monitor"):
                c.filename = f"probe-{c.get('filename') or '{epoch}'}"
        for logger in (cfg.get("logger") or {}).values():
            if isinstance(logger, DictConfig) and "version" in logger:
                logger.version = PROBE
    return cfg


def _is(node: Any, name: str) -> bool:
    return isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith(name)
