"""`TrainingReport`: a callback that reports what a training run really did, for tests on GPUs and DDP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class TrainingReport(L.Callback):
    """Writes `report_dir/training_report_rank<N>.json`: device, precision, memory formats, logits, losses.

    Works in-process and in DDP worker processes (each rank writes its own file), like `FreezeGuard`.
    """

    def __init__(self, report_dir: str) -> None:
        self.report_dir = report_dir
        self.report: dict[str, Any] = {}
        self.logits_dtypes: set[str] = set()
        self.channels_last_inputs: set[bool] = set()
        self.losses: list[float] = []
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        conv_weights = [p for p in pl_module.parameters() if p.ndim == 4]
        self.report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "device": str(pl_module.device),
            "precision": str(trainer.precision),
            "channels_last_weights": all(
                p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights
            ),
        }
        self.hooks = [
            pl_module.backbone.register_forward_pre_hook(self._record_input),
            pl_module.head.register_forward_hook(self._record_logits),
        ]

    def _record_input(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.channels_last_inputs.add(args[0].is_contiguous(memory_format=torch.channels_last))

    def _record_logits(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self.logits_dtypes.add(str(output.dtype))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        for hook in self.hooks:
            hook.remove()
        self.report.update(
            losses=self.losses,
            logits_dtypes=sorted(self.logits_dtypes),
            channels_last_inputs=sorted(self.channels_last_inputs),
            head_weight_dtype=str(next(pl_module.head.parameters()).dtype),
        )
        out = Path(self.report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"training_report_rank{trainer.global_rank}.json").write_text(
            json.dumps(self.report, indent=2)
        )
