"""`transfer-train`: compose the config, build, fit, test, report. Orchestration only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from transfer_cases.build import build
from transfer_cases.cli import friendly_errors, instantiate_list, print_config, print_metrics
from transfer_cases.config import instantiate_clean, register_resolvers
from transfer_cases.paths import config_dir


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) the configured case; returns the final metrics and the best checkpoint path."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = build(cfg)
    trainer: L.Trainer = instantiate_clean(
        cfg.trainer,
        callbacks=instantiate_list(cfg.get("callbacks")),
        logger=instantiate_list(cfg.get("logger")) or False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test") and datamodule.test_dataset is not None and not trainer.fast_dev_run:
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    return {"metrics": metrics, "best_checkpoint": best, "output_dir": str(Path(cfg.paths.output_dir))}


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@friendly_errors
def _main(cfg: DictConfig) -> float | None:
    print_config(cfg)
    result = train(cfg)
    print_metrics(result)
    return result["metrics"].get(cfg.get("optimized_metric"))


def main() -> None:
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
