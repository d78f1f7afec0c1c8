"""Config values that cannot work stop before any work with one message: the key, the bad value,
a valid example. Also: case booleans, GPU presets without a GPU, output folders that cannot be written."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from tests.conftest import TINY, case_config
from tests.test_configs import TINY_OVERRIDES, run_cli
from transfer_cases import build
from transfer_cases.commands.evaluate import evaluate
from transfer_cases.commands.hydra_callbacks import OutputFolderCheck
from transfer_cases.commands.train import train
from transfer_cases.training.cases import Case
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.errors import ConfigError, OutputError


def rejected(
    compose_train: Callable[..., DictConfig], image_folder: Path, *overrides: str
) -> ConfigError | OutputError:
    """The error `train` raises for `overrides`; it must come before anything is written."""
    # A trainer preset among the overrides must keep its own accelerator (TINY_OVERRIDES pins the CPU).
    pinned = () if any(o.startswith("trainer=") for o in overrides) else ("trainer.accelerator=cpu",)
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("trainer.accelerator=")]
    cfg = compose_train(*tiny, *pinned, f"data.root={image_folder}", *overrides)
    with pytest.raises((ConfigError, OutputError)) as err:
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()
    return err.value


BAD_VALUES = {
    "trainer.max_epochs=-1": r"trainer\.max_epochs=-1 is not a whole number >= 1 \(-1 would train forever\)",
    "trainer.max_epochs=0": r"trainer\.max_epochs=0 is not a whole number >= 1 \(0 trains nothing",
    "trainer.max_epochs=abc": r"trainer\.max_epochs='abc' is not a whole number >= 1; e\.g\. "
    r"trainer\.max_epochs=5",
    "trainer.max_epochs=2.5": r"trainer\.max_epochs=2\.5 is not a whole number",
    "trainer.max_epochs=true": r"trainer\.max_epochs=True is not a whole number",
    "model.optimizer.lr=-1": r"model\.optimizer\.lr=-1 is not a number > 0; e\.g\. model\.optimizer\.lr=1e-3",
    "model.optimizer.lr=0": r"model\.optimizer\.lr=0 is not a number > 0",
    "model.optimizer.lr=abc": r"model\.optimizer\.lr='abc' is not a number > 0",
    "model.optimizer.weight_decay=-0.1": r"model\.optimizer\.weight_decay=-0\.1 must be a number >= 0",
    "model.label_smoothing=1.5": r"model\.label_smoothing=1\.5 must be a number >= 0 and < 1",
    "model.scheduler.T_max=0": r"model\.scheduler\.T_max=0 is not a whole number >= 1",
    # trainer.max_epochs follows case.epochs: the message names the setting the user wrote.
    "case.epochs=0": r"case\.epochs=0 is not a whole number >= 1 \(0 trains nothing.*e\.g\. case\.epochs=5",
    "case.epochs=true": r"case\.epochs=True is not a whole number >= 1; e\.g\. case\.epochs=5",
    "case.probe_epochs=-1": r"case\.probe_epochs must be a whole number >= 0, got -1",
    "case.bn_mode=foo": r"case\.bn_mode must be 'train' or 'eval', got 'foo'",
    "cache.train_views=-1": r"cache\.train_views=-1 is not a whole number >= 0 \(augmented views per .*"
    r"e\.g\. cache\.train_views=0",
    "cache.extraction=int8": r"cache\.extraction=int8 is not one of: auto, fp32, .*bf16",
}


@pytest.mark.parametrize("override", BAD_VALUES)
def test_bad_training_values_are_rejected_before_training(
    compose_train: Callable[..., DictConfig], image_folder: Path, override: str
) -> None:
    with pytest.raises(ConfigError, match=BAD_VALUES[override]):
        raise rejected(compose_train, image_folder, override)


def test_scheduler_length_follows_the_validated_max_epochs(compose_train: Callable[..., DictConfig]) -> None:
    cfg = compose_train("trainer.max_epochs=7")
    assert cfg.model.scheduler.T_max == 7


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without a GPU, wherever the tests run."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("preset", ["trainer=gpu", "trainer=ddp"])
def test_gpu_presets_without_a_gpu_name_the_cpu_presets(
    compose_train: Callable[..., DictConfig], image_folder: Path, no_gpu: None, preset: str
) -> None:
    error = rejected(compose_train, image_folder, preset)
    assert "trainer.accelerator=gpu but this machine has no GPU" in str(error)
    assert "trainer=cpu" in str(error) and "trainer.accelerator=auto" in str(error)


def test_more_gpus_than_the_machine_has(
    compose_train: Callable[..., DictConfig], image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    error = rejected(compose_train, image_folder, "trainer=gpu", "trainer.devices=4")
    assert "trainer.devices=4 but this machine has 1 GPU(s); e.g. trainer.devices=1" in str(error)


def test_eval_on_a_gpu_preset_without_a_gpu(compose_train: Callable[..., DictConfig], no_gpu: None) -> None:
    cfg = compose_train("ckpt_path=x.ckpt", "trainer=gpu", config_name="eval")
    with pytest.raises(ConfigError, match="use trainer=cpu"):
        evaluate(cfg)


def test_output_folder_behind_a_file(
    compose_train: Callable[..., DictConfig], image_folder: Path, tmp_path: Path
) -> None:
    (tmp_path / "a_file").write_text("")
    error = rejected(compose_train, image_folder, f"paths.output_dir={tmp_path / 'a_file' / 'run'}")
    assert isinstance(error, OutputError)
    assert f"cannot write to paths.output_dir={tmp_path / 'a_file' / 'run'}: not a directory" in str(error)


def test_read_only_output_folder(
    compose_train: Callable[..., DictConfig], image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*_: object, **__: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("transfer_cases.utils.folders.tempfile.NamedTemporaryFile", read_only)
    error = rejected(compose_train, image_folder)
    assert isinstance(error, OutputError)
    assert "cannot write to paths.output_dir=" in str(error) and "read-only file system" in str(error)
    assert "choose a folder you can write to" in str(error)


def test_hydra_run_dir_that_cannot_be_created_stops_before_hydra_makes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a_file").write_text("")
    config = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "a_file" / "run")}}})
    with pytest.raises(SystemExit) as exit_:
        OutputFolderCheck().on_run_start(config)
    assert exit_.value.code == 2
    assert "error: cannot write to hydra.run.dir=" in capsys.readouterr().err
    OutputFolderCheck().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "new")}}}))
    assert not (tmp_path / "new").exists()  # checked, not created: Hydra creates it


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("freeze", True),
        ("keep", True),
        ("freeze", False),
        ("body_lr_scale", True),
        ("epochs", True),
        ("probe_epochs", True),
    ],
)
def test_case_booleans_are_rejected(field: str, value: bool) -> None:
    with pytest.raises(
        ConfigError, match=rf"case\.{field}={str(value).lower()} is a boolean; case\.{field} takes"
    ):
        Case.from_config({**case_config("small_different"), field: value})


CASE_VALUES = {
    "init=random": ({"init": "random"}, r"case\.init must be 'pretrained' or 'scratch', got 'random'"),
    "scratch+frozen": (
        {"init": "scratch"},
        r"freezes randomly initialised stages .*set case\.freeze=none or case\.init=pretrained",
    ),
    "freeze=-1": ({"freeze": -1}, r"case\.freeze must be 'all', 'none' or a number of stages, got -1"),
    "body_lr_scale=-1": ({"body_lr_scale": -1}, r"case\.body_lr_scale must be a number >= 0, got -1"),
    "epochs=0": ({"epochs": 0}, r"case\.epochs must be a whole number >= 1, got 0"),
    "probe_epochs=-1": ({"probe_epochs": -1}, r"case\.probe_epochs must be a whole number >= 0, got -1"),
    "bn_mode=foo": ({"bn_mode": "foo"}, r"case\.bn_mode must be 'train' or 'eval', got 'foo'"),
    "name=auto": ({"name": "auto"}, r"case=auto is resolved by transfer-train, which runs the advisor first"),
}


@pytest.mark.parametrize("values", CASE_VALUES)
def test_case_values_that_cannot_work(values: str) -> None:
    fields, message = CASE_VALUES[values]
    with pytest.raises(ConfigError, match=message):
        Case.from_config({**case_config("small_different"), **fields})


def test_body_lr_scale_zero_with_a_trainable_body() -> None:
    module = TransferModule(
        backbone=TINY, case={**case_config("large_similar"), "body_lr_scale": 0}, num_classes=2
    )
    with pytest.raises(
        ConfigError, match=r"trains \d+ body tensors with body_lr_scale=0: freeze them instead"
    ):
        module.param_groups()


def test_case_boolean_from_the_command_line(
    compose_train: Callable[..., DictConfig], image_folder: Path
) -> None:
    with pytest.raises(ConfigError, match=r"case\.freeze=true is a boolean.*e\.g\. case\.freeze=all"):
        build(compose_train(*TINY_OVERRIDES, f"data.root={image_folder}", "case.freeze=true"))


def test_case_auto_built_without_the_advisor_says_how_to_resolve_it(
    compose_train: Callable[..., DictConfig], image_folder: Path
) -> None:
    # The auto case's fields are null until the advisor fills them in: the message must be about the
    # missing advisor step, not about a null field (it said "case.body_lr_scale ... got None").
    with pytest.raises(ConfigError) as err:
        build(compose_train(*TINY_OVERRIDES, f"data.root={image_folder}", "case=auto"))
    message = str(err.value)
    assert "case=auto is resolved by transfer-train" in message
    assert "resolve_auto_case(cfg) before build(cfg)" in message and "None" not in message
    with pytest.raises(ConfigError, match="resolve_auto_case"):
        Case.from_config(case_config("auto"))


def test_case_keep_that_is_not_a_number() -> None:
    with pytest.raises(ConfigError, match=r"case\.keep must be null, k or -k .*got 'last'"):
        Case.from_config({**case_config("small_different"), "keep": "last"})


def test_cli_run_dir_behind_a_file_is_one_message_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    run = run_cli(
        "transfer-train", *TINY_OVERRIDES, f"hydra.run.dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and run.stderr.count("error:") == 1
    assert "error: cannot write to hydra.run.dir=" in run.stderr
