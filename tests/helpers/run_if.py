"""`RunIf`: run a test only where the machine has what it needs, skipped with the reason otherwise.

In the spirit of ashleve/lightning-hydra-template's `RunIf(min_gpus=1)`:

    @RunIf(min_gpus=1)                      # decorates a test (or a class)
    def test_on_a_gpu(): ...

    pytest.param("bf16-mixed", marks=RunIf(min_gpus=1, bf16=True).marks)   # one parameter

GPU conditions also add the `requires_gpu` marker, so a GPU machine runs them alone with
`pytest -m requires_gpu`, and `pytest -rs` on a CPU machine lists every skip with its reason.
"""

from __future__ import annotations

from typing import TypeVar

import pytest
import torch

T = TypeVar("T")


def cuda_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def bf16_gpu() -> bool:
    return cuda_gpus() > 0 and torch.cuda.is_bf16_supported()


class RunIf:
    """Skip unless there are at least `min_gpus` CUDA GPUs and, with `bf16=True`, they support bfloat16."""

    def __init__(self, min_gpus: int = 0, bf16: bool = False) -> None:
        missing = []
        if min_gpus and cuda_gpus() < min_gpus:
            missing.append(f"{min_gpus} CUDA GPU{'s' if min_gpus > 1 else ''} (found {cuda_gpus()})")
        if bf16 and not bf16_gpu():
            missing.append("a CUDA GPU with bfloat16 support")
        self.reason = f"needs {' and '.join(missing)}" if missing else ""
        self.needs_gpu = bool(min_gpus or bf16)

    @property
    def marks(self) -> list[pytest.MarkDecorator]:
        marks = [pytest.mark.skipif(bool(self.reason), reason=self.reason or "runs here")]
        return [pytest.mark.requires_gpu, *marks] if self.needs_gpu else marks

    def __call__(self, test: T) -> T:
        for mark in self.marks:
            test = mark(test)
        return test
