"""LP-FT as two fits (a head-only probe on cached features, then fine-tuning): the param groups of each
phase, a resume in either phase, BatchNorm kept in eval mode (`bn_mode: eval`), the collapse warning."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary
from omegaconf import DictConfig

from tests.conftest import TINY, case_config
from tests.helpers.lightning import Interrupted, started_epochs
from tests.test_lightning import tiny_weights_file
from tests.test_resume import ckpt_epoch, overrides
from transfer_cases.commands.train import train
from transfer_cases.data import ImageFolderDataModule
from transfer_cases.training.diagnose import collapse_warning
from transfer_cases.training.module import TransferModule
from transfer_cases.training.recipe import make_trainer
from transfer_cases.utils.errors import ConfigError


class PhaseWatch(L.Callback):
    """Records, at the start of each fit, the phase, the optimizer's param groups and what trains."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, module: TransferModule) -> None:
        groups = [(g["name"], len(g["params"])) for g in trainer.optimizers[0].param_groups]
        in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        record = {
            "phase": module.phase,
            "epoch": trainer.current_epoch,
            "groups": groups,
            "optimizer_is_trainable": in_optimizer == {id(p) for p in module.parameters() if p.requires_grad},
            "frozen_stages": module.backbone.num_frozen,
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def watched(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def lpft(tmp_path: Path, images: Path, *extra: str) -> tuple[str, ...]:
    weights = tiny_weights_file(tmp_path / "tiny.pt")
    return overrides(
        images,
        f"backbone.weights={weights}",
        "case=large_similar",
        "case.probe_epochs=2",
        "trainer.max_epochs=2",
        "+callbacks.watch._target_=tests.test_recipe.PhaseWatch",
        f"+callbacks.watch.path={tmp_path / 'phases.jsonl'}",
        "+callbacks.log._target_=tests.helpers.lightning.EpochLog",
        f"+callbacks.log.path={tmp_path / 'epochs.txt'}",
        f"+callbacks.freeze_guard.report_dir={tmp_path / 'guard'}",
        "callbacks.last_checkpoint.min_interval_s=0",  # interrupted between sub-second epochs
        *extra,
    )


def test_lp_ft_probes_on_cached_features_then_fine_tunes_with_the_body_in_the_optimizer(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    result = train(compose_train(*lpft(tmp_path, image_folder)))
    probe, fit = watched(tmp_path / "phases.jsonl")
    assert (probe["phase"], probe["groups"], probe["frozen_stages"]) == ("probe", [["head", 2]], 3)
    assert (fit["phase"], fit["frozen_stages"]) == ("fit", 0)
    assert [name for name, _ in fit["groups"]] == ["head", "body"] and fit["groups"][1][1] > 0
    assert probe["optimizer_is_trainable"] and fit["optimizer_is_trainable"]
    assert started_epochs(tmp_path / "epochs.txt") == [0, 1, 0, 1]
    assert result["phases"]["probe"]["epochs"] == 2 and result["phases"]["fit"]["epochs"] == 2
    assert set(result["phases"]["probe"]["feature_cache"]["files"]) == {"train", "val"}  # probe on features
    run = tmp_path / "run"
    assert (run / "csv" / "probe" / "metrics.csv").is_file() and (run / "csv" / "metrics.csv").is_file()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and any(n.startswith("probe-epoch") for n in names)
    assert Path(result["best_checkpoint"]).name.startswith("epoch")  # the fine-tuned model, not the probe
    # Each phase guarded its own frozen part: the whole body while probing, nothing while fine-tuning.
    guard_probe = json.loads((tmp_path / "guard" / "freeze_guard_probe_rank0.json").read_text())
    guard_fit = json.loads((tmp_path / "guard" / "freeze_guard_rank0.json").read_text())
    assert guard_probe["start"] == guard_probe["end"] and guard_probe["frozen_stages"] == 3
    assert guard_fit["frozen_stages"] == 0


def test_resume_in_the_probe_phase_finishes_it_then_fine_tunes(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    stop = ("+callbacks.stop._target_=tests.helpers.lightning.StopAt", "+callbacks.stop.epoch=1")
    with pytest.raises(Interrupted):
        train(compose_train(*lpft(tmp_path, image_folder, *stop)))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["phase"] == "probe" and ckpt_epoch(last) == 0
    train(compose_train(*lpft(tmp_path, image_folder, f"ckpt_path={last}")))
    records = watched(tmp_path / "phases.jsonl")
    assert [(r["phase"], r["epoch"]) for r in records] == [("probe", 0), ("probe", 1), ("fit", 0)]
    assert records[1]["groups"] == [["head", 2]]  # the probe's optimizer state fits its own groups
    assert started_epochs(tmp_path / "epochs.txt") == [0, 1, 1, 0, 1]  # probe epoch 0 not redone


def test_resume_in_the_fine_tuning_phase_keeps_the_body_trainable(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    # StopAt counts the fine-tuning fit's own epochs: it stops that fit at its epoch 1 (the probe
    # phase, stopped at its epoch 1 too, would stop first: so the probe runs 1 epoch here).
    stop = ("+callbacks.stop._target_=tests.helpers.lightning.StopAt", "+callbacks.stop.epoch=1")
    with pytest.raises(Interrupted):
        train(compose_train(*lpft(tmp_path, image_folder, "case.probe_epochs=1", *stop)))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["phase"] == "fit" and ckpt_epoch(last) == 0
    train(compose_train(*lpft(tmp_path, image_folder, "case.probe_epochs=1", f"ckpt_path={last}")))
    records = watched(tmp_path / "phases.jsonl")
    assert [(r["phase"], r["epoch"]) for r in records] == [("probe", 0), ("fit", 0), ("fit", 1)]
    resumed = records[-1]
    # Not re-frozen by the resume (Lightning #21901), and the body is in the restored optimizer.
    assert resumed["frozen_stages"] == 0 and [g[0] for g in resumed["groups"]] == ["head", "body"]
    assert resumed["optimizer_is_trainable"]


def test_probe_epochs_need_a_case_that_fine_tunes() -> None:
    with pytest.raises(ConfigError, match=r"probe_epochs=3 .* fine-tunes nothing"):
        TransferModule(backbone=TINY, case={**case_config("small_similar"), "probe_epochs": 3}, num_classes=2)
    with pytest.raises(ConfigError, match="starts from scratch"):
        TransferModule(
            backbone=TINY,
            case={**case_config("large_different"), "init": "scratch", "probe_epochs": 1},
            num_classes=2,
        )


def test_bn_mode_eval_keeps_batchnorm_statistics_while_the_body_trains(
    tmp_path: Path, image_folder: Path
) -> None:
    module = TransferModule(
        backbone=TINY, case={**case_config("large_similar"), "bn_mode": "eval"}, num_classes=2
    )
    bn = [m for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone(), m.weight.clone()) for m in bn]
    conv = next(m for m in module.backbone.modules() if isinstance(m, torch.nn.Conv2d)).weight.clone()
    assert module.backbone.num_frozen == 0  # nothing frozen: BatchNorm statistics are kept by bn_mode alone
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    dm = ImageFolderDataModule(image_folder, batch_size=4, preprocess=module.preprocess, image_size=32)
    trainer.fit(module, dm)  # with validation in between, which switches modes back and forth
    assert all(not m.training for m in bn)
    for m, (mean, var, weight) in zip(bn, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)  # statistics kept
        assert not torch.equal(m.weight, weight)  # affine weights trained
    assert not torch.equal(
        next(m for m in module.backbone.modules() if isinstance(m, torch.nn.Conv2d)).weight, conv
    )


def test_collapse_warning_names_chance_and_the_causes() -> None:
    labels = np.array([0] * 50 + [1] * 50)
    message = collapse_warning({"train/acc": 1.0, "val/acc": 0.48}, labels)
    assert message and "close to chance (0.500" in message and "transfer-advise" in message
    assert "bn_mode=eval" in message
    assert collapse_warning({"train/acc": 1.0, "val/acc": 0.9}, labels) is None  # generalises
    assert collapse_warning({"train/acc": 0.6, "val/acc": 0.5}, labels) is None  # learned nothing at all
    skewed = np.array([0] * 90 + [1] * 10)  # always answering class 0 scores 0.9
    assert collapse_warning({"train/acc": 1.0, "val/acc": 0.9}, skewed) is not None
    assert collapse_warning({"train/acc": 1.0, "val/acc": 1.0}, skewed) is None  # perfect is not chance
    assert collapse_warning({"train/acc": 1.0, "val/acc": 0.9}, labels) is None
    # Ten classes: 23 % is 13 points above chance, but keeps 15 % of what training learned over it.
    ten = np.repeat(np.arange(10), 10)
    assert collapse_warning({"train/acc": 0.975, "val/acc": 0.228}, ten) is not None
    assert collapse_warning({"train/acc": 0.75, "val/acc": 0.425}, ten) is None  # half the gain kept


def test_a_collapsed_run_says_so_in_its_summary(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    # Val's folders are swapped: a model that learns train perfectly scores far below chance on val.
    val = image_folder / "val"
    (val / "a").rename(val / "tmp")
    (val / "b").rename(val / "a")
    (val / "tmp").rename(val / "b")
    result = train(
        compose_train(*overrides(image_folder, "trainer.max_epochs=20", "model.optimizer.lr=0.05"))
    )
    assert result["metrics"]["train/acc"] >= 0.9 and result["metrics"]["val/acc"] <= 0.5
    (warning,) = result["warnings"]
    assert "does not generalise" in warning


@pytest.mark.parametrize(
    ("overrides", "summary"),
    [
        ((), True),  # the default callbacks carry a RichModelSummary
        (("callbacks.model_summary=null",), False),  # no summary, not Lightning's default one
        (("hparams_search=small_similar_optuna", "hydra.mode=RUN"), False),  # the search presets
        (("callbacks.model_summary=null", "+trainer.enable_model_summary=true"), True),  # explicit wins
    ],
)
def test_the_callbacks_config_decides_on_the_model_summary(
    compose_train: Callable[..., DictConfig], overrides: tuple[str, ...], summary: bool
) -> None:
    trainer = make_trainer(compose_train("trainer=cpu", *overrides))
    assert any(isinstance(c, ModelSummary) for c in trainer.callbacks) == summary
