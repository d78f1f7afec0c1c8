"""`transfer-train`: compose the config, build, fit, test, report. Orchestration only."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from transfer_cases.advise.auto import resolve_auto_case
from transfer_cases.commands.cli import (
    find_user_error,
    friendly_errors,
    print_config,
    print_metrics,
    run_hydra,
)
from transfer_cases.training.build import build
from transfer_cases.training.diagnose import collapse_warning
from transfer_cases.training.recipe import fit_phases, measure_best
from transfer_cases.training.summary import write_summary
from transfer_cases.utils.checks import check_train_config
from transfer_cases.utils.config import record_checked_config
from transfer_cases.utils.paths import config_dir

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) the configured case; returns metrics, timings and the best checkpoint path.

    `case=auto` is resolved first (the advisor picks the case). A case with `probe_epochs` runs
    LP-FT: a head-only fit on the frozen body (cached features), then the fine-tuning fit.
    """
    check_train_config(cfg)  # before the advisor: a typo must not cost an extraction (case=auto)
    advice = resolve_auto_case(cfg)
    if advice is not None:
        check_train_config(cfg)  # the advised case's own settings
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, images = build(cfg)
    trainer, phases = fit_phases(cfg, module, images)
    best_callback = _best_checkpoint_callback(trainer)
    best = best_callback.best_model_path if best_callback else ""
    metrics, source = measure_best(trainer, module, best, test=bool(cfg.get("test")))
    warnings = [w for w in [collapse_warning(metrics, images.val_dataset.labels)] if w]
    for w in warnings:
        log.warning(w)
    return {
        "metrics": metrics,
        "best_checkpoint": best,
        "best_score": float(best_callback.best_model_score or 0) if best else None,
        "train_time_s": round(sum(p["train_time_s"] for p in phases.values()), 2),
        "epochs": trainer.current_epoch,
        "phases": phases,
        "params": module.parameter_counts(),
        "metrics_source": source,
        "feature_cache": getattr(trainer.datamodule, "report", None),
        "advice": advice.to_dict() if advice else None,
        "warnings": warnings,
        "output_dir": str(cfg.paths.output_dir),
    }


def _best_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that monitors a metric (the other one writes last.ckpt every epoch)."""
    return next(
        (c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None
    )


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@friendly_errors
def _main(cfg: DictConfig) -> float | None:
    check_train_config(cfg)  # a bad setting is one line, not a line under the config tree
    record_checked_config(cfg)
    print_config(cfg)
    try:
        result = train(cfg)
    except Exception as e:
        error = find_user_error(e)
        _record_failure(cfg, error)
        if not _in_multirun():
            if error is e:
                raise
            raise error from None
        # One failed job must not end the sweep: the others run, and the report names this one.
        # None, not NaN: Optuna refuses a NaN objective, and its sweeper then crashes telling the
        # trial as failed with that value; None is told as a failed trial, and the search goes on.
        log.exception("job failed: %s", HydraConfig.get().job.override_dirname)
        return None
    write_summary(cfg, "ok", result)
    print_metrics(result)
    from transfer_cases.reporting.run_report import write_run_report  # report.html, from the run folder

    write_run_report(cfg.paths.output_dir)
    return result["metrics"].get(cfg.get("optimized_metric"))


def _record_failure(cfg: DictConfig, error: BaseException) -> None:
    """summary.json says the run failed; a second error here (a full disk) must not hide the first."""
    try:
        write_summary(cfg, "failed", error=f"{type(error).__name__}: {error}")
    except Exception as e:
        log.warning("could not record the failure in summary.json: %s", e)


def main() -> None:
    run_hydra(_main)


if __name__ == "__main__":
    main()
