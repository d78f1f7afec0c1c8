"""Shared fixtures: tiny synthetic image folders and composed configs, all offline and seeded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

from transfer_cases import asset_path, config_dir
from transfer_cases.training.cases import CASES  # noqa: F401  (the tests import it from here with the fixtures)

TINY = {
    "_target_": "transfer_cases.backbones.TinyCNN",
    "widths": [8, 16, 32],
    "weights": None,
    "image_size": 32,
}
MOBILENET = {
    "_target_": "transfer_cases.backbones.TorchvisionBackbone",
    "arch": "mobilenet_v2",
    "weights": str(asset_path("mobilenet_v2_imagenet.pt")),
}


def case_config(name: str) -> dict:
    """The case as `configs/case/<name>.yaml` defines it (so tests follow the shipped YAML)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(config_dir() / "case" / f"{name}.yaml"))


def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 6, size: int = 40
) -> Path:
    """`root/{train,val}/<class>/*.png`: each class a distinct colour plus noise, so it is learnable."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def compose_train(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose `train.yaml` as the CLI would, with Hydra's runtime set so `${hydra:...}` resolves."""

    def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        # Feature caches of tests go to the test's folder, never to the working directory.
        overrides = (f"paths.cache_dir={tmp_path / 'cache'}", *overrides)
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra
        GlobalHydra.instance().clear()
        return cfg

    return _compose
