"""`make gpu-check`: one epoch of each case in 16-mixed and bf16-mixed with channels_last; throughput.

Run it on a machine with a CUDA GPU. `--accelerator cpu --precisions bf16-mixed` runs the same
code path on a CPU (a smoke test; CPU figures say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.table import Table

from transfer_cases import build, config_dir

CASES = ("small_similar", "small_different", "large_similar", "large_different")


class Throughput(L.Callback):
    """Images per second over the training batches, after a warm-up of a few steps (CUDA init, autotune)."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup, self.images, self.start = warmup, 0, 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: object, i: int
    ) -> None:
        if i == self.warmup:
            _sync()
            self.start = time.perf_counter()
        if i >= self.warmup:
            self.images += len(batch[1])

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        _sync()
        self.seconds = time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.images and self.seconds > 0 else float("nan")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_case(
    case: str, precision: str, accelerator: str, overrides: Sequence[str], out: Path
) -> dict[str, object]:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"case={case}",
                "model.channels_last=true",
                f"paths.output_dir={out / case / precision}",
                *overrides,
            ],
        )
    L.seed_everything(cfg.seed, verbose=False)
    module, datamodule = build(cfg)
    meter = Throughput()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[meter],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=datamodule)
    return {
        "case": case,
        "precision": precision,
        "img_per_s": meter.rate,
        "loss": float(trainer.callback_metrics["train/loss"]),
    }


def main(argv: Sequence[str] | None = None) -> None:
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
    for case in args.cases:
        for precision in args.precisions:
            r = run_case(case, precision, args.accelerator, args.overrides, args.out)
            table.add_row(case, precision, f"{r['img_per_s']:.1f}", f"{r['loss']:.3f}")
    if torch.cuda.is_available():
        table.caption = torch.cuda.get_device_name()
    Console().print(table)


if __name__ == "__main__":
    main()
