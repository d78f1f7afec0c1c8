"""A file that is not a checkpoint of transfer-train, given to eval, predict or a resume, is one message
that names the file and says what it is (and what to pass instead)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tests.conftest import TINY, case_config
from tests.helpers.lightning import save_checkpoint
from tests.test_configs import TINY_OVERRIDES, run_cli
from transfer_cases import asset_path, build
from transfer_cases.commands.evaluate import evaluate
from transfer_cases.commands.predict import predict
from transfer_cases.training.checkpoint import load_module
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.errors import ConfigError

EMBEDDED_WEIGHTS = asset_path("mobilenet_v2_imagenet.pt")


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = TransferModule(backbone=TINY, case=case_config("small_different"), num_classes=2)
    return save_checkpoint(module, tmp_path_factory.mktemp("ckpt") / "good.ckpt")


def truncated(good: Path, tmp_path: Path) -> Path:
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.ckpt"


def empty(good: Path, tmp_path: Path) -> Path:
    (tmp_path / "empty.ckpt").write_bytes(b"")
    return tmp_path / "empty.ckpt"


def text(good: Path, tmp_path: Path) -> Path:
    (tmp_path / "notes.ckpt").write_text("epoch: 4\nval/acc: 0.93\n")
    return tmp_path / "notes.ckpt"


def plain_state_dict(good: Path, tmp_path: Path) -> Path:
    torch.save(torch.load(good, weights_only=True)["state_dict"], tmp_path / "state.pt")
    return tmp_path / "state.pt"


def weights_file(good: Path, tmp_path: Path) -> Path:
    return EMBEDDED_WEIGHTS


def folder(good: Path, tmp_path: Path) -> Path:
    return tmp_path


def other_lightning_checkpoint(good: Path, tmp_path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"lr": 0.1}}, tmp_path / "o.ckpt")
    return tmp_path / "o.ckpt"


BAD = {
    truncated: r"cannot read checkpoint .*truncated\.ckpt: the file is truncated or corrupt",
    empty: r"cannot read checkpoint .*empty\.ckpt: the file is empty \(0 bytes\)",
    text: r"cannot read checkpoint .*notes\.ckpt: it is a text file, not a PyTorch checkpoint",
    plain_state_dict: r"state\.pt is a plain state dict \(\d+ tensors\), not a checkpoint of transfer-train.*"
    r"backbone\.weights=.*state\.pt;",
    weights_file: r"mobilenet_v2_imagenet\.pt is a weights file \(mobilenet_v2 backbone weights.*not a "
    r"checkpoint of transfer-train.*pass it as backbone\.weights=.*mobilenet_v2_imagenet\.pt;",
    folder: r"checkpoint .* is a folder; pass a file: .*<run>/checkpoints/",
    other_lightning_checkpoint: r"o\.ckpt is a Lightning checkpoint, but not one written by transfer-train",
}


@pytest.mark.parametrize("make", BAD, ids=lambda f: f.__name__)
def test_load_module_names_the_file_and_what_it_is(
    make: Callable[[Path, Path], Path], good_ckpt: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=BAD[make]):
        load_module(make(good_ckpt, tmp_path))


def test_eval_with_a_truncated_checkpoint(
    compose_train: Callable[..., DictConfig], good_ckpt: Path, tmp_path: Path
) -> None:
    cfg = compose_train(f"ckpt_path={truncated(good_ckpt, tmp_path)}", config_name="eval")
    with pytest.raises(ConfigError, match=BAD[truncated]):
        evaluate(cfg)


def test_predict_with_a_weights_file(good_ckpt: Path, image_folder: Path) -> None:
    with pytest.raises(ConfigError, match=BAD[weights_file]):
        predict(EMBEDDED_WEIGHTS, image_folder)


@pytest.mark.parametrize("make", [text, weights_file, truncated], ids=lambda f: f.__name__)
def test_resume_from_a_file_that_is_no_checkpoint(
    make: Callable[[Path, Path], Path],
    compose_train: Callable[..., DictConfig],
    image_folder: Path,
    good_ckpt: Path,
    tmp_path: Path,
) -> None:
    cfg = compose_train(
        *TINY_OVERRIDES, f"data.root={image_folder}", f"ckpt_path={make(good_ckpt, tmp_path)}"
    )
    with pytest.raises(ConfigError, match=BAD[make]):
        build(cfg)


def test_cli_predict_with_a_weights_file_is_one_message(tmp_path: Path, image_folder: Path) -> None:
    run = run_cli("transfer-predict", str(EMBEDDED_WEIGHTS), str(image_folder), cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.count("error:") == 1
    assert "mobilenet_v2_imagenet.pt is a weights file" in run.stderr
