"""`make gpu-check`: one epoch of each case in 16-mixed and bf16-mixed with channels_last; images per second.

Run it on a machine with a CUDA GPU. `--accelerator cpu --precisions bf16-mixed` runs the same
code path on a CPU (a smoke test; CPU figures say nothing about a GPU). The rate is Lightning's
`ThroughputMonitor` (`train/device/samples_per_sec`: CUDA-synchronised, data loading included)
over the epoch's batches after a short warm-up (CUDA initialisation, cuDNN autotuning).
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from rich.table import Table

from transfer_cases import build, config_dir
from transfer_cases.commands.cli import friendly_errors
from transfer_cases.training.callbacks import FreezeGuard
from transfer_cases.training.cases import CASES
from transfer_cases.utils.errors import ConfigError

WARMUP_BATCHES = 3
# What ThroughputMonitor logs for the training stage on one device (`<stage>/device/samples_per_sec`).
RATE_KEY = "train/device/samples_per_sec"


def images_in(batch: Any) -> int:
    """ThroughputMonitor's batch_size_fn: batches are (images, labels)."""
    return len(batch[0])


def throughput_monitor(num_batches: int) -> ThroughputMonitor:
    """A monitor whose rolling window spans the epoch after the warm-up batches.

    ThroughputMonitor reports a rate only once its window is full, so the window is sized from the
    epoch: it starts at the end of the last warm-up batch and ends with the epoch.
    """
    if num_batches < 2:
        raise ConfigError(
            f"gpu-check needs at least 2 training batches per epoch, got {num_batches}; "
            "lower data.batch_size or use more images"
        )
    warmup = min(WARMUP_BATCHES, num_batches - 1)
    return ThroughputMonitor(batch_size_fn=images_in, window_size=num_batches - warmup + 1)


def run_case(
    case: str, precision: str, accelerator: str, overrides: Sequence[str], out: Path
) -> dict[str, Any]:
    """One epoch of `case`; returns its training images per second and final training loss."""
    run_dir = out / case / precision
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"case={case}", "model.channels_last=true", f"paths.output_dir={run_dir}", *overrides],
        )
    L.seed_everything(cfg.seed, verbose=False)
    module, datamodule = build(cfg)
    datamodule.setup("fit")
    monitor = throughput_monitor(len(datamodule.train_dataloader()))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=CSVLogger(run_dir, name="", version=""),  # the monitor logs through the trainer's loggers
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[monitor, FreezeGuard()],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=run_dir,
    )
    with warnings.catch_warnings():
        # MFU would need the model's FLOPs per batch; images per second is what is reported.
        warnings.filterwarnings("ignore", message=".*define a `flops_per_batch` attribute")
        trainer.fit(module, datamodule=datamodule)
    rate = trainer.logged_metrics.get(RATE_KEY)
    return {
        "case": case,
        "precision": precision,
        "img_per_s": float(rate) if rate is not None else math.nan,
        "loss": float(trainer.callback_metrics["train/loss_epoch"]),
    }


@friendly_errors
def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precisions", nargs="+", default=["16-mixed", "bf16-mixed"])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. backbone=resnet50 data.batch_size=128"
    )
    args = parser.parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA GPU here. Run it on a GPU machine, or add --accelerator cpu.")
    table = Table(title=f"one epoch per case, channels_last, {args.accelerator}")
    for col in ("case", "precision", "img/s", "train loss"):
        table.add_column(col, justify="left" if col in ("case", "precision") else "right")
    results = []
    for case in args.cases:
        for precision in args.precisions:
            r = run_case(case, precision, args.accelerator, args.overrides, args.out)
            table.add_row(case, precision, f"{r['img_per_s']:.1f}", f"{r['loss']:.3f}")
            results.append(r)
    if args.accelerator == "gpu":
        table.caption = torch.cuda.get_device_name()
    Console().print(table)
    return results


if __name__ == "__main__":
    main()
