"""A diverged run (NaN or inf loss or weights) fails with one message naming the likely setting, is
recorded as failed and leaves no checkpoint of non-finite weights marked best; eval and predict
refuse a checkpoint of non-finite weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, case_config
from tests.helpers.lightning import save_checkpoint
from tests.test_configs import TINY_OVERRIDES, run_cli
from transfer_cases.training.checkpoint import load_module, read_checkpoint
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.errors import ConfigError

QUIET = ("callbacks.progress_bar.refresh_rate=0", "callbacks.model_summary=null", "test=false")

# Each setting and what the one-line error must name. lr=1e30 is a finite setting a schema passes.
DIVERGING = {
    "lr_inf": ("model.optimizer.lr=inf", "model.optimizer.lr"),
    "weight_decay_inf": ("model.optimizer.weight_decay=inf", "model.optimizer.weight_decay"),
    "fp16_on_cpu": ("trainer.precision=16-true", "trainer.precision=16-true"),
    "lr_1e30": ("model.optimizer.lr=1e30", "model.optimizer.lr"),
}


@pytest.mark.parametrize("case", DIVERGING)
def test_a_diverging_run_fails_with_one_line_naming_the_setting(
    tmp_path: Path, image_folder: Path, case: str
) -> None:
    setting, named = DIVERGING[case]
    run_dir = tmp_path / "run"
    run = run_cli(
        "transfer-train",
        *TINY_OVERRIDES,
        *QUIET,
        f"data.root={image_folder}",
        "trainer.max_epochs=3",
        setting,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and run.stderr.count("error:") == 1
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("error:")]
    assert named in line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and named.split("=")[0] in summary["error"]
    assert not summary.get("best_checkpoint")
    # Whatever checkpoints were written hold finite weights (those before the divergence).
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(v.isfinite().all() for v in state.values() if v.is_floating_point()), ckpt


@pytest.fixture
def nan_ckpt(tmp_path: Path) -> Path:
    module = TransferModule(backbone=TINY, case=case_config("small_different"), num_classes=2)
    with torch.no_grad():
        next(module.head.parameters()).fill_(float("nan"))
    return save_checkpoint(module, tmp_path / "diverged.ckpt")


def test_loading_a_checkpoint_of_non_finite_weights_is_refused(nan_ckpt: Path) -> None:
    for load in (load_module, read_checkpoint):  # eval, predict and export; resume
        with pytest.raises(ConfigError, match=r"checkpoint .*diverged\.ckpt holds non-finite weights .*head"):
            load(nan_ckpt)


def test_predict_and_eval_refuse_a_checkpoint_of_non_finite_weights(
    nan_ckpt: Path, tmp_path: Path, image_folder: Path
) -> None:
    commands = [
        ("transfer-predict", str(nan_ckpt), str(image_folder / "val")),
        ("transfer-eval", f"ckpt_path={nan_ckpt}", f"data.root={image_folder}", "data.num_workers=0"),
    ]
    for command in commands:
        run = run_cli(*command, cwd=tmp_path)
        assert run.returncode == 2, (command[0], run.stderr[-3000:])
        assert "Traceback" not in run.stderr and run.stderr.count("error:") == 1, command[0]
        assert f"{nan_ckpt} holds non-finite weights" in run.stderr, command[0]
