"""The module under a real Lightning Trainer: eval-mode immunity across loops, checkpoints, resume."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torchmetrics.classification import MulticlassAccuracy

from tests.conftest import CASES, TINY, case_config
from transfer_cases.data import ImageFolderDataModule
from transfer_cases.training.module import TransferModule, frozen_eval_mode_expected
from transfer_cases.utils.errors import WeightsError


class FrozenWatch(L.Callback):
    """Checks at every training step that the frozen prefix is in eval mode and unchanged."""

    def __init__(self) -> None:
        self.steps = 0
        self.reference: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: TransferModule, *_: object) -> None:
        frozen = module.backbone.stages[: module.backbone.num_frozen]
        assert all(not m.training for m in frozen.modules() if m is not frozen)
        state = {k: v.clone() for k, v in frozen.state_dict().items()}
        if not self.reference:
            self.reference = state
        assert state.keys() == self.reference.keys()
        assert all(torch.equal(state[k], v) for k, v in self.reference.items())
        self.steps += 1


def datamodule(root: Path, module: TransferModule) -> ImageFolderDataModule:
    return ImageFolderDataModule(root, batch_size=4, preprocess=module.preprocess, image_size=32)


def trainer(tmp_path: Path, epochs: int = 2, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("case", CASES)
def test_fit_with_validation_keeps_frozen_prefix_frozen(
    tmp_path: Path, image_folder: Path, case: str
) -> None:
    module = TransferModule(backbone=TINY, case=case_config(case), num_classes=2)
    watch = FrozenWatch()
    trainer(tmp_path, callbacks=[watch], num_sanity_val_steps=1).fit(module, datamodule(image_folder, module))
    assert watch.steps == 2 * 3  # 12 train images / batch 4, two epochs, validation in between


def test_checkpoint_round_trip_restores_split_and_predictions(tmp_path: Path, image_folder: Path) -> None:
    module = TransferModule(
        backbone=TINY, case=case_config("small_different"), num_classes=2, class_names=["a", "b"]
    )
    t = trainer(tmp_path, epochs=1)
    t.fit(module, datamodule(image_folder, module))
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # only tensors and plain containers inside
    assert raw["hyper_parameters"]["load_pretrained"] is False
    loaded = TransferModule.load_from_checkpoint(path)
    assert loaded.class_names == ["a", "b"]
    assert (
        loaded.backbone.depth == module.backbone.depth
        and loaded.backbone.num_frozen == module.backbone.num_frozen
    )
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in module.parameters()]
    x = torch.randn(3, 3, 32, 32)
    module.eval(), loaded.eval()
    assert torch.equal(module(x), loaded(x))


def tiny_weights_file(path: Path) -> Path:
    """A "pretrained" tiny CNN in the project's weights format (random, but fixed and on disk)."""
    from transfer_cases.backbones.tiny import _TinyNet
    from transfer_cases.backbones.weights_file import save_weights_file

    save_weights_file(path, _TinyNet(TINY["widths"]).state_dict(), arch="tiny_cnn", meta={}, half=False)
    return path


def test_checkpoint_loads_after_the_pretrained_weights_file_is_gone(
    tmp_path: Path, image_folder: Path
) -> None:
    weights = tiny_weights_file(tmp_path / "tiny.pt")
    module = TransferModule(
        backbone={**TINY, "weights": str(weights)}, case=case_config("large_similar"), num_classes=2
    )
    t = trainer(tmp_path, epochs=1)
    t.fit(module, datamodule(image_folder, module))
    t.save_checkpoint(tmp_path / "model.ckpt")
    weights.unlink()
    loaded = TransferModule.load_from_checkpoint(tmp_path / "model.ckpt")
    x = torch.randn(2, 3, 32, 32)
    module.eval(), loaded.eval()
    assert torch.equal(module(x), loaded(x))


def test_resume_keeps_split_and_param_groups(tmp_path: Path, image_folder: Path) -> None:
    case = {"name": "partial", "init": "pretrained", "keep": None, "freeze": 2, "body_lr_scale": 0.1}
    backbone = {**TINY, "weights": str(tiny_weights_file(tmp_path / "tiny.pt"))}
    first = TransferModule(backbone=backbone, case=case, num_classes=2)
    frozen_before = {k: v.clone() for k, v in first.backbone.stages[:2].state_dict().items()}
    t1 = trainer(tmp_path, epochs=1)
    t1.fit(first, datamodule(image_folder, first))
    t1.save_checkpoint(tmp_path / "epoch1.ckpt")
    groups_before = [(g["name"], len(g["params"]), g["lr"]) for g in t1.optimizers[0].param_groups]

    resumed = TransferModule(backbone=backbone, case=case, num_classes=2)
    watch = FrozenWatch()
    t2 = trainer(tmp_path, epochs=2, callbacks=[watch])
    t2.fit(resumed, datamodule(image_folder, resumed), ckpt_path=tmp_path / "epoch1.ckpt")
    assert t2.current_epoch == 2 and watch.steps == 3  # only the second epoch ran
    assert [(g["name"], len(g["params"])) for g in t2.optimizers[0].param_groups] == [
        g[:2] for g in groups_before
    ]
    assert [p.requires_grad for p in resumed.parameters()] == [p.requires_grad for p in first.parameters()]
    after = resumed.backbone.stages[:2].state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())


def test_checkpoint_body_initialises_a_task_with_other_classes(tmp_path: Path, image_folder: Path) -> None:
    three = TransferModule(backbone=TINY, case=case_config("large_different"), num_classes=3)
    t = trainer(tmp_path, epochs=0)
    t.strategy.connect(three)
    t.save_checkpoint(tmp_path / "three.ckpt")
    two = TransferModule(
        backbone={**TINY, "weights": str(tmp_path / "three.ckpt")},
        case=case_config("small_similar"),
        num_classes=2,
    )
    assert two.head[-1].out_features == 2
    same = two.backbone.state_dict()
    assert all(torch.equal(same[k], v) for k, v in three.backbone.state_dict().items())
    wider = {**TINY, "widths": [8, 16, 64], "weights": str(tmp_path / "three.ckpt")}
    with pytest.raises(WeightsError, match=r"three\.ckpt"):
        TransferModule(backbone=wider, case=case_config("small_similar"), num_classes=2)


def eval_mode_messages(caught: list[warnings.WarningMessage]) -> list[str]:
    """Lightning's warning about modules in eval mode when fit starts."""
    return [str(w.message) for w in caught if re.match(r"Found \d+ module\(s\) in eval mode", str(w.message))]


def test_the_frozen_prefix_in_eval_mode_is_not_warned_about_but_other_eval_modules_are(
    tmp_path: Path, image_folder: Path
) -> None:
    module = TransferModule(backbone=TINY, case=case_config("small_different"), num_classes=2)
    frozen = sum(not m.training for m in module.train().modules())
    assert frozen > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with frozen_eval_mode_expected():  # as recipe.fit_phases runs every fit
            trainer(tmp_path, epochs=1).fit(module, datamodule(image_folder, module))
        # The filter lived only while fit ran: the same warning from elsewhere still shows.
        warnings.warn(f"Found {frozen} module(s) in eval mode at the start of training.", stacklevel=1)
    assert eval_mode_messages(caught) == [f"Found {frozen} module(s) in eval mode at the start of training."]


def test_a_module_loaded_in_eval_mode_fine_tunes_in_train_mode_and_says_so(
    tmp_path: Path, image_folder: Path
) -> None:
    from tests.helpers.lightning import save_checkpoint
    from transfer_cases.training.checkpoint import load_module

    case = {"name": "partial", "init": "pretrained", "keep": None, "freeze": 1, "body_lr_scale": 0.1}
    original = TransferModule(backbone=TINY, case=case, num_classes=2, head={"kind": "mlp", "dropout": 0.5})
    loaded = load_module(save_checkpoint(original, tmp_path / "model.ckpt"))
    assert not loaded.training and not loaded.head.training  # as the loader returns it
    modes: list[bool] = []

    class TrainableModes(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: TransferModule, *_: object) -> None:
            trainable = [module.head, *module.backbone.stages[module.backbone.num_frozen :]]
            modes.append(all(m.training for part in trainable for m in part.modules()))

    watch = FrozenWatch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with frozen_eval_mode_expected():
            trainer(tmp_path, epochs=1, callbacks=[watch, TrainableModes()]).fit(
                loaded, datamodule(image_folder, loaded)
            )
    (message,) = [str(w.message) for w in caught if "trainable module(s) were in eval mode" in str(w.message)]
    assert "head" in message and "put them in train mode" in message
    assert modes and all(modes)  # dropout and the trainable BatchNorm layers train
    assert watch.steps == len(modes)  # and the frozen stage stayed in eval mode throughout
    assert eval_mode_messages(caught) == []


@pytest.mark.parametrize("case", ["small_similar", "partial"])
def test_every_module_returns_to_its_mode_after_each_validation_loop(
    tmp_path: Path, image_folder: Path, case: str
) -> None:
    """The module restores its modes after validation itself (not Lightning's per-module restore):
    at every step, after the sanity check and each epoch's validation, each module is in the mode
    `train()` gives by the obvious route; a standalone validation leaves an eval-mode model as it was."""
    from tests.test_freezing import reference_modes

    cfg = {"name": "partial", "init": "pretrained", "keep": None, "freeze": 1, "body_lr_scale": 0.1}
    module = TransferModule(
        backbone=TINY,
        case=cfg if case == "partial" else case_config(case),
        num_classes=2,
        head={"kind": "mlp", "dropout": 0.5},
    )
    expected = reference_modes(module)
    matches: list[bool] = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: TransferModule, *_: object) -> None:
            matches.append({n: m.training for n, m in module.named_modules()} == expected)

    data = datamodule(image_folder, module)
    trainer(tmp_path, epochs=2, callbacks=[Modes()], num_sanity_val_steps=1).fit(module, data)
    assert len(matches) == 2 * 3 and all(matches)
    module.eval()
    trainer(tmp_path).validate(module, data, verbose=False)
    assert not any(m.training for m in module.modules())
    module.train()
    trainer(tmp_path).validate(module, data, verbose=False)
    assert {n: m.training for n, m in module.named_modules()} == expected


def test_train_accuracy_is_a_torchmetrics_metric_over_the_whole_epoch(
    tmp_path: Path, image_folder: Path
) -> None:
    class Recording(TransferModule):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.seen.append((self(batch[0]).argmax(1) == batch[1]).float())
            return super().training_step(batch, batch_idx)

    module = Recording(backbone=TINY, case=case_config("large_different"), num_classes=2)
    module.seen = []
    data = ImageFolderDataModule(image_folder, batch_size=5, preprocess=module.preprocess, image_size=32)
    t = trainer(tmp_path, epochs=1, limit_val_batches=0)
    t.fit(module, data)
    assert isinstance(module.train_acc, MulticlassAccuracy)
    # 12 images in batches of 5, 5 and 2: the epoch's accuracy, not the mean of the batches'.
    # (Each prediction is recorded in the step that makes it, before the optimizer moves.)
    expected = torch.cat(module.seen).mean()
    assert float(t.callback_metrics["train/acc"]) == pytest.approx(float(expected))


def test_epoch_losses_and_metrics_are_over_the_whole_split(tmp_path: Path, image_folder: Path) -> None:
    """Epoch metrics are torchmetrics states logged once an epoch: the train loss is the mean over
    the epoch's samples (batches of 5, 5 and 2 weigh 5, 5 and 2), and the validation loss, accuracy
    and F1 are those of the final model on the whole val split, whatever its batches."""

    class Recording(TransferModule):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.seen.append((float(loss.detach()), len(batch[1])))
            return loss

    module = Recording(backbone=TINY, case=case_config("large_different"), num_classes=2)
    data = ImageFolderDataModule(image_folder, batch_size=5, preprocess=module.preprocess, image_size=32)
    t = trainer(tmp_path, epochs=2, num_sanity_val_steps=0)
    module.seen = []
    t.fit(module, data)
    last_epoch = module.seen[-3:]  # 12 images: 3 steps an epoch
    assert [n for _, n in last_epoch] == [5, 5, 2]
    mean = sum(loss * n for loss, n in last_epoch) / 12
    assert float(t.callback_metrics["train/loss_epoch"]) == pytest.approx(mean, rel=1e-5)

    module.eval()
    x = torch.stack([data.val_dataset[i][0] for i in range(len(data.val_dataset))])
    y = torch.as_tensor(data.val_dataset.labels)
    with torch.no_grad():
        logits = module(x)
    assert float(t.callback_metrics["val/loss"]) == pytest.approx(float(module.loss(logits, y)), rel=1e-5)
    assert float(t.callback_metrics["val/acc"]) == pytest.approx(
        float((logits.argmax(1) == y).float().mean())
    )
    assert "val/f1" in t.callback_metrics and "train/acc" in t.callback_metrics


def test_step_loss_is_logged_on_the_steps_the_logger_writes(tmp_path: Path, image_folder: Path) -> None:
    """`train/loss_step` reaches the logger every `log_every_n_steps` steps, and only then."""
    module = TransferModule(backbone=TINY, case=case_config("small_similar"), num_classes=2)
    data = ImageFolderDataModule(image_folder, batch_size=2, preprocess=module.preprocess, image_size=32)
    t = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    t.fit(module, data)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert t.global_step == 12  # 12 images in batches of 2, two epochs
    assert steps == [3, 7, 11]  # Lightning's step index of the 4th, 8th and 12th step


def test_training_step_works_without_a_trainer() -> None:
    """A plain PyTorch loop may call the hooks itself: the step returns its loss and updates the
    epoch states (Lightning only warns that `self.log` has no Trainer)."""
    module = TransferModule(backbone=TINY, case=case_config("small_similar"), num_classes=2)
    batch = (torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = module.training_step(batch, 0)
    loss.backward()
    assert module.head[-1].weight.grad is not None and module.train_loss.update_count == 1
