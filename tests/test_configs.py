"""Every config composes and instantiates; every case runs from the command line."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from tests.conftest import CASES
from tests.helpers.cli import run_console_script
from transfer_cases import build, config_dir
from transfer_cases.data import ClassificationDataModule
from transfer_cases.training.cases import Case
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.config import instantiate_clean, instantiate_list
from transfer_cases.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# The CPU even where a GPU is (the default trainer is `accelerator: auto`); ddp_cpu keeps its two processes.
TINY_OVERRIDES = ("backbone=tiny_cnn", "data.num_workers=0", "trainer.accelerator=cpu")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_case_group_has_the_four_cases_and_auto() -> None:
    assert options("case") == sorted([*CASES, "auto"])


@pytest.mark.parametrize("case", CASES)
def test_case_configs_build_cases(compose_train: Callable[..., DictConfig], case: str) -> None:
    cfg = compose_train(f"case={case}")
    assert Case.from_config(dict(cfg.case)).name == case


@pytest.mark.parametrize("backbone", options("backbone"))
def test_backbone_configs_instantiate(compose_train: Callable[..., DictConfig], backbone: str) -> None:
    cfg = compose_train(f"backbone={backbone}")
    spec = instantiate_clean(cfg.backbone)
    # Only the embedded weights are on disk: the others are checked with random initialisation.
    body = spec.build(pretrained=backbone in ("mobilenet_v2", "tiny_cnn"))
    # The full body's width: the last stage's, or the neck's (mobilenet_v3's pretrained 960→1280 layer).
    assert body.depth >= 3 and body.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, body.out_features)


@pytest.mark.parametrize("data", options("data"))
def test_data_configs_instantiate(
    compose_train: Callable[..., DictConfig], data: str, image_folder: Path
) -> None:
    overrides = [f"data={data}", f"paths.data_dir={SHARED}"]
    if data == "imagefolder":
        overrides.append(f"data.root={image_folder}")
    elif data in ("mnist", "cifar10") and not SHARED.is_dir():
        pytest.skip("../shared/data is not next to this checkout")
    elif data == "shards":
        pytest.skip("needs shards written first: tests/test_streaming.py builds and trains on them")
    dm = instantiate_clean(compose_train(*overrides).data)
    assert isinstance(dm, ClassificationDataModule) and dm.num_classes >= 2


@pytest.mark.parametrize(
    "override",
    [f"trainer={o}" for o in options("trainer")]
    + [f"precision={o}" for o in options("precision")]
    + [f"logger={o}" for o in options("logger")]
    + [f"callbacks={o}" for o in options("callbacks")]
    + [f"debug={o}" for o in options("debug")],
)
def test_trainer_side_configs_instantiate(compose_train: Callable[..., DictConfig], override: str) -> None:
    cfg = compose_train(override)
    if cfg.trainer.accelerator == "gpu":
        cfg.trainer.accelerator = "cpu"  # the gpu presets must compose here; they run where a GPU is
    optional = {"logger=wandb": "wandb", "logger=mlflow": "mlflow"}
    if override in optional and importlib.util.find_spec(optional[override]) is None:
        with pytest.raises(
            ConfigError, match=rf'install the extra: pip install -e "\.\[{optional[override]}\]"'
        ):
            instantiate_list(cfg.logger)
        return
    trainer = instantiate_clean(
        cfg.trainer,
        callbacks=instantiate_list(cfg.get("callbacks")),
        logger=instantiate_list(cfg.get("logger")) or False,
    )
    assert isinstance(trainer, L.Trainer)
    if override.startswith("precision="):  # the preset reaches the trainer config (fp16 runs as bf16 on CPU)
        assert str(cfg.trainer.precision).startswith(override.split("=")[1])


@pytest.mark.parametrize("search", options("hparams_search"))
def test_hparams_searches_compose(compose_train: Callable[..., DictConfig], search: str) -> None:
    cfg = compose_train(f"hparams_search={search}")
    assert cfg.optimized_metric == "val/acc"
    if search != "optuna":
        assert cfg.case.name == search.removesuffix("_optuna")


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(compose_train: Callable[..., DictConfig], experiment: str) -> None:
    cfg = compose_train(f"experiment={experiment}")
    assert cfg.case.name in CASES and "_target_" in cfg.data


def test_the_embedded_job_builds(compose_train: Callable[..., DictConfig]) -> None:
    """The template's default job, named explicitly: a new project's default data may be its own."""
    module, dm = build(compose_train("data=hymenoptera", "backbone=mobilenet_v2", "case=small_similar"))
    assert isinstance(module, TransferModule)
    assert module.case.name == "small_similar" and module.backbone.fully_frozen
    assert dm.classes == ["ants", "bees"] and module.head[-1].out_features == 2
    assert dm.preprocess == module.preprocess and module.preprocess.mean == (0.5, 0.5, 0.5)


def test_model_config_builds_mlp_head(compose_train: Callable[..., DictConfig], image_folder: Path) -> None:
    cfg = compose_train(
        *TINY_OVERRIDES, f"data.root={image_folder}", "model.head.kind=mlp", "model.head.hidden=16"
    )
    module, _ = build(cfg)
    assert [type(m).__name__ for m in module.head] == ["Linear", "ReLU", "Linear"]
    assert module.head[0].in_features == module.backbone.out_features


def test_eval_config_composes(compose_train: Callable[..., DictConfig]) -> None:
    cfg = compose_train("ckpt_path=x.ckpt", config_name="eval")
    assert cfg.split == "val" and "_target_" in cfg.data


def cli_env() -> dict[str, str]:
    """The environment of a console-script subprocess: this checkout's `src/` first (the scripts run
    in another folder, where a relative PYTHONPATH=src would silently fall back to the installed
    package), and its root, so that configs can name test helpers (`tests.helpers.lightning.EpochLog`)."""
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def run_cli(*args: str, cwd: Path, fresh: bool = False) -> subprocess.CompletedProcess[str]:
    """A `transfer-*` command as a user runs it (own argv, cwd, environment, streams and exit code);
    in a forked child of a pre-imported interpreter unless `fresh` (see tests/helpers/cli.py)."""
    exe = Path(sys.executable).with_name(args[0])
    return run_console_script([str(exe), *args[1:]], cwd=cwd, env=cli_env(), timeout=300, fresh=fresh)


def test_a_single_run_from_the_command_line(tmp_path: Path, image_folder: Path) -> None:
    """A single (not multirun) job, in a fresh interpreter as a user starts it (the package's import
    included); every case runs through the command line in test_multirun's four-case sweep, which
    checks the same lines of each job's output."""
    case = "large_different"
    run = run_cli(
        "transfer-train",
        f"case={case}",
        *TINY_OVERRIDES,
        f"data.root={image_folder}",
        "debug=fdr",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        fresh=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"case={case}" in run.stdout + run.stderr  # the parameter-count line at fit start
    assert "val/acc" in run.stdout  # the final metrics table


def readme_multi_node_commands() -> list[list[str]]:
    """The overrides of every `transfer-train ... trainer.num_nodes=N` command in the README's bash
    blocks, continuation lines joined and shell variables given a value."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#") or "num_nodes" not in line:
                continue
            words = shlex.split(re.sub(r"\$(\w+)", r"\1_VALUE", line.split(" # ")[0]))
            at = next(i for i, w in enumerate(words) if w.rstrip(")").endswith("transfer-train"))
            commands.append(words[at + 1 :])
    return commands


@pytest.mark.parametrize("preset", options("trainer"))
def test_every_trainer_preset_takes_num_nodes(compose_train: Callable[..., DictConfig], preset: str) -> None:
    assert compose_train(f"trainer={preset}").trainer.num_nodes == 1
    assert compose_train(f"trainer={preset}", "trainer.num_nodes=2").trainer.num_nodes == 2


def test_readme_multi_node_commands_compose(compose_train: Callable[..., DictConfig]) -> None:
    commands = readme_multi_node_commands()
    presets = {o.split("=", 1)[1] for c in commands for o in c if o.startswith("trainer=")}
    assert len(commands) >= 3 and {"ddp", "ddp_cpu"} <= presets
    for overrides in commands:
        cfg = compose_train(*overrides)
        nodes = next(o for o in overrides if o.startswith("trainer.num_nodes="))
        assert cfg.trainer.num_nodes == int(nodes.split("=")[1]) > 1, overrides
