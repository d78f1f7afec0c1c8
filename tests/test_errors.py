"""Mistakes a user makes get one clear message naming the thing and the fix."""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision.models._api
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from tests.conftest import TINY, case_config
from tests.test_configs import TINY_OVERRIDES, run_cli
from transfer_cases import build
from transfer_cases.backbones import TorchvisionBackbone
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.errors import ConfigError, DataError, WeightsError


@pytest.mark.parametrize("group", ["case", "backbone"])
def test_unknown_group_option_lists_the_choices(compose_train: Callable[..., DictConfig], group: str) -> None:
    with pytest.raises(MissingConfigException, match=rf"Could not find '{group}/nope'") as err:
        compose_train(f"{group}=nope")
    assert "small_similar" in str(err.value.options) or "resnet18" in str(err.value.options)


def test_unknown_arch_names_the_supported_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone arch 'resnet19'.*resnet18"):
        TorchvisionBackbone("resnet19")


@pytest.mark.parametrize("keep", [4, -3, 0])
def test_cut_beyond_the_depth_of_the_body(keep: int) -> None:
    with pytest.raises(ConfigError, match=rf"case.keep={keep} does not fit tiny_cnn, which has 3 stages"):
        TransferModule(backbone=TINY, case={**case_config("small_different"), "keep": keep}, num_classes=2)


def test_freeze_more_stages_than_kept() -> None:
    with pytest.raises(ConfigError, match=r"case\.freeze=3 but only 2 stages are kept"):
        TransferModule(backbone=TINY, case={**case_config("small_different"), "freeze": 3}, num_classes=2)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"weights file not found: .*nothing\.pt"):
        TorchvisionBackbone("mobilenet_v2", weights=str(tmp_path / "nothing.pt")).build()


NOT_WEIGHTS = {
    "text": lambda path: path.write_text("learning rate 1e-3, 10 epochs\n"),  # torch says only "101"
    "garbage": lambda path: path.write_bytes(bytes(range(256)) * 4),
    "a_list": lambda path: torch.save([1, 2, 3], path),  # a PyTorch file, but no state dict
}


@pytest.mark.parametrize("content", NOT_WEIGHTS)
def test_weights_file_that_is_no_state_dict_names_the_file_and_the_fix(tmp_path: Path, content: str) -> None:
    path = tmp_path / "notes.pt"
    NOT_WEIGHTS[content](path)
    with pytest.raises(WeightsError) as err:
        TransferModule(
            backbone={**TINY, "weights": str(path)}, case=case_config("small_similar"), num_classes=2
        )
    message = str(err.value)
    assert message.startswith(
        f"cannot read weights file {path}: it is not a PyTorch state dict or checkpoint ("
    )
    assert (
        "Set backbone.weights to a .pt/.pth/.safetensors file saved with torch.save(model.state_dict())"
        in message
    )
    assert "or to null for random initialisation" in message


def test_weights_that_do_not_fit_the_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(TorchvisionBackbone("resnet18", weights=None).build(pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match=r"resnet18\.pth does not fit 'mobilenet_v2'"):
        TorchvisionBackbone("mobilenet_v2", weights=str(path)).build()


def test_offline_download_names_the_weights_and_the_local_file_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(url: str, *_: object, **__: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network")

    # torchvision imported the function into its weights API: patch it where it is looked up, so the
    # test means the same on a machine with network (patching torch.hub would not stop a download).
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        TorchvisionBackbone("resnet18", weights="IMAGENET1K_V1").build()
    assert calls and calls[0].endswith(".pth")
    message = str(err.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message and "backbone.weights=/path/to/" in message


def test_unknown_weights_name() -> None:
    with pytest.raises(ConfigError, match=r"IMAGENET9K is not a weights name of resnet18.*IMAGENET1K_V1"):
        TorchvisionBackbone("resnet18", weights="IMAGENET9K").build()


def test_missing_data_folder(compose_train: Callable[..., DictConfig], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data folder not found: .*nowhere; set data.root="):
        build(compose_train(*TINY_OVERRIDES, f"data.root={tmp_path / 'nowhere'}"))


def test_one_class_only(compose_train: Callable[..., DictConfig], tmp_path: Path) -> None:
    (tmp_path / "only" / "cats").mkdir(parents=True)
    (tmp_path / "only" / "cats" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="a classifier needs at least two"):
        build(compose_train(*TINY_OVERRIDES, f"data.root={tmp_path / 'only'}"))


def test_corrupt_image_names_the_file(compose_train: Callable[..., DictConfig], image_folder: Path) -> None:
    bad = image_folder / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    # The loader names the file (data.check_images, which data=imagefolder turns on, would stop setup).
    overrides = ("data=imagefolder", f"data.root={image_folder}", "data.check_images=false")
    _, dm = build(compose_train(*TINY_OVERRIDES, *overrides, "cache.enabled=false"))
    dm.setup()
    index = [
        i
        for i in range(len(dm.train_dataset))
        if "broken" in str(dm.train_dataset.source.paths[dm.train_dataset.indices[i]])
    ]
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg.*delete or replace"):
        dm.train_dataset[index[0]]


def test_cli_prints_one_clean_message_not_a_traceback(tmp_path: Path) -> None:
    run = run_cli(
        "transfer-train",
        *TINY_OVERRIDES,
        f"data.root={tmp_path / 'missing'}",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert "error: data folder not found" in run.stderr
    assert "Traceback" not in run.stderr
