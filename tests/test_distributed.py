"""DDP with frozen parameters (2 CPU processes, gloo) and bf16 autocast on CPU, for every case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import CASES, TINY, case_config, write_image_folder
from tests.test_configs import TINY_OVERRIDES, run_cli
from transfer_cases.data import ImageFolderDataModule
from transfer_cases.training.callbacks import FreezeGuard, frozen_digest
from transfer_cases.training.module import TransferModule

# Each DDP run starts two processes (~10 s here): the fully frozen case, where the trap lies, runs in
# the fast suite; the other three in `make test-all`.
DDP_CASES = [c if c == "small_similar" else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_cpu_two_processes(tmp_path: Path, image_folder: Path, case: str) -> None:
    guard_dir = tmp_path / "guard"
    run = run_cli(
        "transfer-train",
        "trainer=ddp_cpu",
        f"case={case}",
        *TINY_OVERRIDES,
        f"data.root={image_folder}",
        "trainer.max_epochs=2",
        "data.batch_size=2",
        "cache.batch_size=2",  # several extraction batches, so both ranks get shards
        "callbacks.progress_bar.refresh_rate=0",
        f"+callbacks.freeze_guard.report_dir={guard_dir}",
        cwd=tmp_path,
        fresh=True,  # Lightning starts the other rank from sys.argv
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "find_unused_parameters=True" not in run.stderr and "did not receive grad" not in run.stderr
    reports = [json.loads(p.read_text()) for p in sorted(guard_dir.glob("freeze_guard_rank*.json"))]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world_size"] == 2 for r in reports)
    assert all(r["start"] == r["end"] for r in reports)  # frozen weights and BN statistics, every rank
    assert reports[0]["start"] == reports[1]["start"]  # both ranks froze the same pretrained prefix
    assert all(r["find_unused_parameters"] is False for r in reports)
    # One run directory (not one per rank), one metrics file, each epoch logged once.
    run_dirs = [p for p in (tmp_path / "outputs" / "train" / "runs").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    with open(run_dirs[0] / "csv" / "metrics.csv") as f:
        val_epochs = [r["epoch"] for r in csv.DictReader(f) if r.get("val/acc")]
    assert val_epochs == ["0", "1"]
    assert list(run_dirs[0].rglob("metrics.csv")) == [run_dirs[0] / "csv" / "metrics.csv"]
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    if case.startswith("small"):  # fully frozen: both ranks trained on features extracted once
        assert set(summary["feature_cache"]["files"]) == {"train", "val"}
        folders = [p for p in (tmp_path / ".cache" / "features").iterdir() if p.is_dir() and p.name != "onnx"]
        records = [json.loads(r.read_text()) for f in folders for r in f.glob("rows-*.json")]
        assert len(folders) == 2 and {r["rank"] for r in records} == {0, 1}  # each rank extracted its share
    else:
        assert summary["feature_cache"] is None


@pytest.mark.parametrize("case", CASES)
def test_bf16_autocast_on_cpu_trains_one_step(tmp_path: Path, image_folder: Path, case: str) -> None:
    module = TransferModule(backbone=TINY, case=case_config(case), num_classes=2)
    before = frozen_digest(module)
    head_before = module.head[-1].weight.clone()
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        fast_dev_run=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FreezeGuard()],
        default_root_dir=tmp_path,
    )
    dm = ImageFolderDataModule(image_folder, batch_size=4, preprocess=module.preprocess, image_size=32)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert module.head[-1].weight.dtype == torch.float32  # autocast, not a bf16 copy of the weights
    assert not torch.equal(module.head[-1].weight, head_before)
    assert frozen_digest(module) == before


def test_freeze_guard_catches_a_frozen_stage_left_in_train_mode(tmp_path: Path, image_folder: Path) -> None:
    module = TransferModule(backbone=TINY, case=case_config("small_similar"), num_classes=2)

    class Unfreezer(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: TransferModule, *_: object) -> None:
            torch.nn.Module.train(pl_module.backbone.stages[0], True)  # what a plain .train() would do

    trainer = L.Trainer(
        accelerator="cpu",
        fast_dev_run=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Unfreezer(), FreezeGuard()],
        default_root_dir=tmp_path,
    )
    dm = ImageFolderDataModule(image_folder, batch_size=4, preprocess=module.preprocess, image_size=32)
    with pytest.raises(RuntimeError, match="frozen stage is in train mode"):
        trainer.fit(module, dm)


class FrozenWeightBumper(L.Callback):
    """Changes a weight of the frozen first stage at the start of training, as a buggy hook could."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: TransferModule, *_: object) -> None:
        if trainer.global_step == 0:
            with torch.no_grad():
                next(pl_module.backbone.stages[0].parameters()).add_(1.0)


@pytest.mark.parametrize(
    ("interval", "checkpoints", "message"),
    [
        (0.0, False, "changed during epoch 0"),
        (3600.0, False, r"changed by the end of training \(epoch 1 or earlier\)"),
        (3600.0, True, r"changed by epoch 0 \(found before writing a checkpoint\)"),
    ],
)
def test_freeze_guard_catches_a_changed_frozen_weight_whatever_its_interval(
    tmp_path: Path, image_folder: Path, interval: float, checkpoints: bool, message: str
) -> None:
    module = TransferModule(backbone=TINY, case=case_config("small_similar"), num_classes=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoints,
        callbacks=[FrozenWeightBumper(), FreezeGuard(check_interval_s=interval)],
        default_root_dir=tmp_path,
    )
    dm = ImageFolderDataModule(image_folder, batch_size=4, preprocess=module.preprocess, image_size=32)
    with pytest.raises(RuntimeError, match=f"FreezeGuard: the frozen stages {message}"):
        trainer.fit(module, dm)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was saved with the changed body


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("problem", ["diverged", "broken_image"])
def test_ddp_cpu_error_is_one_message_from_the_ranks(tmp_path: Path, problem: str) -> None:
    """An error during a DDP fit: one `error:` line (a setting's error from rank 0 only, as every rank
    checks the same settings), no traceback from the other rank, exit status 2."""
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=6)
    overrides = ["trainer.precision=16-true", "case=large_similar"]  # NaN on the CPU: the guard stops it
    if problem == "broken_image":
        (root / "train" / "a" / "zz_broken.png").write_bytes(b"not a png" * 10)
        overrides = ["data=imagefolder", "data.check_images=false", "case=large_similar"]
    run = run_cli(
        "transfer-train",
        "trainer=ddp_cpu",
        *TINY_OVERRIDES,
        f"data.root={root}",
        "trainer.max_epochs=1",
        "data.batch_size=2",
        "callbacks.progress_bar.refresh_rate=0",
        *overrides,
        cwd=tmp_path,
        fresh=True,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert ("not finite" in errors[0]) if problem == "diverged" else ("zz_broken.png" in errors[0]), errors
