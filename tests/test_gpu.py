"""On CUDA GPUs: each case one epoch in 16-mixed and bf16-mixed with channels_last, DDP on 2 GPUs, gpu-check.

Skipped with the reason where there is no GPU (`pytest -rs` lists them); on a GPU machine
`pytest -m requires_gpu` runs these alone. They train the default job (the embedded MobileNetV2 and
ants/bees images) for two batches, so each takes seconds on a GPU.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator
from omegaconf import DictConfig

from tests.conftest import CASES
from tests.helpers.run_if import RunIf, cuda_gpus
from tests.test_configs import run_cli
from transfer_cases.commands.train import train
from transfer_cases.tools import gpu_check
from transfer_cases.utils.config import instantiate_clean

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ["16-mixed", pytest.param("bf16-mixed", marks=RunIf(min_gpus=1, bf16=True).marks)]
AUTOCAST_DTYPE = {"16-mixed": "torch.float16", "bf16-mixed": "torch.bfloat16"}


def one_epoch(report: Path, *overrides: str) -> list[str]:
    """Overrides for a short run of the default job that reports what it did into `report`."""
    return [
        *overrides,
        "model.channels_last=true",
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=2",
        "++trainer.limit_val_batches=1",
        "data.num_workers=0",
        "test=false",
        "callbacks.progress_bar.refresh_rate=0",
        f"+callbacks.freeze_guard.report_dir={report}",
        "+callbacks.training_report._target_=tests.helpers.training_report.TrainingReport",
        f"+callbacks.training_report.report_dir={report}",
    ]


def reports(folder: Path, kind: str) -> list[dict]:
    """The per-rank JSON reports of FreezeGuard (`freeze_guard`) or TrainingReport, by rank."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{kind}_rank*.json"))]


def check_rank(seen: dict, guard: dict, precision: str) -> None:
    """What every rank of a mixed-precision channels_last seen must show."""
    assert seen["device"].startswith("cuda")
    assert seen["precision"] == precision
    assert len(seen["losses"]) == 2 and all(math.isfinite(v) for v in seen["losses"])
    assert seen["logits_dtypes"] == [AUTOCAST_DTYPE[precision]]  # autocast ran the head
    assert seen["head_weight_dtype"] == "torch.float32"  # AMP keeps float32 weights
    assert seen["channels_last_weights"] and seen["channels_last_inputs"] == [True]
    assert guard["start"] == guard["end"]  # frozen weights and BatchNorm statistics, bit for bit


@RunIf(min_gpus=1)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES)
def test_each_case_trains_one_epoch_on_a_gpu(
    compose_train: Callable[..., DictConfig], tmp_path: Path, case: str, precision: str
) -> None:
    report = tmp_path / "report"
    cfg = compose_train(*one_epoch(report, "trainer=gpu", f"case={case}", f"precision={precision}"))
    result = train(cfg)
    assert math.isfinite(result["metrics"]["train/loss_epoch"]) and "val/acc" in result["metrics"]
    (seen,), (guard,) = reports(report, "training_report"), reports(report, "freeze_guard")
    check_rank(seen, guard, precision)
    assert seen["device"] == "cuda:0" and seen["world_size"] == 1


@RunIf(min_gpus=2)
@pytest.mark.parametrize("case", CASES)
def test_ddp_on_two_gpus(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # DDP starts its second rank as a new process: both must find tests.helpers.training_report.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    report = tmp_path / "report"
    overrides = one_epoch(report, "trainer=ddp", "trainer.devices=2", f"case={case}", "precision=16-mixed")
    run = run_cli("transfer-train", *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    seen_by_rank, guards = reports(report, "training_report"), reports(report, "freeze_guard")
    assert [p["rank"] for p in seen_by_rank] == [0, 1] and [g["rank"] for g in guards] == [0, 1]
    assert sorted(p["device"] for p in seen_by_rank) == ["cuda:0", "cuda:1"]
    for seen, guard in zip(seen_by_rank, guards, strict=True):
        assert seen["world_size"] == 2
        check_rank(seen, guard, "16-mixed")
        assert guard["find_unused_parameters"] is False
    assert guards[0]["start"] == guards[1]["start"]  # both ranks froze the same pretrained prefix


@RunIf(min_gpus=1)
def test_gpu_check_reports_images_per_second(tmp_path: Path) -> None:
    precisions = ["16-mixed", "bf16-mixed"] if torch.cuda.is_bf16_supported() else ["16-mixed"]
    results = gpu_check.main(
        ["--cases", "small_similar", "--precisions", *precisions, "--out", str(tmp_path)]
    )
    assert [r["precision"] for r in results] == precisions
    assert all(r["img_per_s"] > 0 and math.isfinite(r["loss"]) for r in results)


def test_default_trainer_takes_the_gpu_when_there_is_one(compose_train: Callable[..., DictConfig]) -> None:
    """Runs everywhere: CUDA where there is a GPU, the CPU here; `trainer=cpu` pins the CPU."""
    cfg = compose_train()
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.devices == 1
    trainer = instantiate_clean(cfg.trainer, logger=False, enable_progress_bar=False)
    expected = CPUAccelerator
    if cuda_gpus():
        expected = CUDAAccelerator
    elif MPSAccelerator.is_available():  # Apple silicon: auto takes its GPU too
        expected = MPSAccelerator
    assert isinstance(trainer.accelerator, expected) and trainer.num_devices == 1
    pinned = instantiate_clean(compose_train("trainer=cpu").trainer, logger=False, enable_progress_bar=False)
    assert isinstance(pinned.accelerator, CPUAccelerator)
