"""The metrics a run reports are those of the weights it keeps: the best checkpoint's, in the numerics
`transfer-eval`, `transfer-predict` and the export run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.test_resume_real import REAL
from transfer_cases import config_dir
from transfer_cases.commands.evaluate import evaluate
from transfer_cases.commands.train import train


def test_reported_val_metrics_are_the_best_checkpoints_not_the_last_epochs(
    compose_train: Callable[..., DictConfig],
) -> None:
    spoil = "+callbacks.spoil._target_=tests.helpers.lightning.SpoilLastValidation"
    result = train(compose_train(*REAL, "trainer.max_epochs=4", spoil))
    assert Path(result["best_checkpoint"]).name != "epoch03.ckpt"  # the spoiled last epoch is not the best
    # The last epoch guessed one class (at most 0.54 of val); the best checkpoint is far above it.
    assert result["metrics"]["val/acc"] == result["best_score"] > 0.6
    assert result["metrics_source"]["checkpoint"] == result["best_checkpoint"]


def test_logged_val_accuracy_is_what_transfer_eval_measures_on_the_best_checkpoint(
    compose_train: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """Trained on bf16 features (the fast setting), validated on fp32 ones (the deployed arithmetic)."""
    result = train(compose_train(*REAL, "cache.extraction=bf16", "trainer.max_epochs=5"))
    assert result["feature_cache"]["extraction"] == "bf16"
    assert result["metrics_source"]["val_test_inputs"] == "channels_last features of the frozen body"
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={result['best_checkpoint']}",
                "data=hymenoptera",
                "data.num_workers=0",
                f"paths.output_dir={tmp_path / 'eval'}",
            ],
        )
    rows = evaluate(cfg)["rows"]
    accuracy = next(r["f1"] for r in rows if r["class"] == "accuracy")
    assert abs(accuracy - result["metrics"]["val/acc"]) < 1e-6
