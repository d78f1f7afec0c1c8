"""Checks of a composed config before any work starts: one message naming the key, the bad value
and a valid example, instead of a traceback minutes later (or a run that never ends)."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from transfer_cases.utils.config import instantiate_clean
from transfer_cases.utils.errors import ConfigError
from transfer_cases.utils.folders import check_writable_dir
from transfer_cases.utils.schema import TRAIN_SETTINGS, check_settings
from transfer_cases.utils.validate import number_in, positive_int, positive_number


def check_shared_settings(cfg: DictConfig) -> None:
    """The settings train.yaml, eval.yaml and advise.yaml share: every `???` given, every key known to
    its target, every rule of the schema, the image size bounded, the checkpoint mode following its
    metric."""
    check_set(cfg)
    check_settings(cfg, TRAIN_SETTINGS)
    check_image_size(cfg)
    check_checkpoint_mode(cfg)


def check_train_config(cfg: DictConfig) -> None:
    """Everything `transfer-train` needs from its config before it builds a model.

    Runs before the advisor too (`case=auto`, a typo must not cost an extraction): the auto case's
    unset fields (null until the advisor picks a case) are then skipped, the ones set checked."""
    check_shared_settings(cfg)
    trainer = cfg.trainer
    # trainer.max_epochs follows case.epochs unless set: name the setting the user actually wrote.
    key = "case.epochs" if _follows_case_epochs(trainer) else "trainer.max_epochs"
    auto = (cfg.get("case") or {}).get("name") == "auto"
    if auto:
        _check_auto_case(cfg.case)
    if not (auto and key == "case.epochs" and cfg.case.get("epochs") is None):
        positive_int(
            trainer.get("max_epochs"),
            key,
            example=f"{key}=5",
            why={-1: " (-1 would train forever)", 0: " (0 trains nothing and leaves no checkpoint)"},
        )
    model = cfg.get("model") or {}
    optimizer = model.get("optimizer") or {}
    if "lr" in optimizer:
        positive_number(optimizer.lr, "model.optimizer.lr", example="model.optimizer.lr=1e-3")
    if "weight_decay" in optimizer:
        number_in(optimizer.weight_decay, "model.optimizer.weight_decay", 0, None, "=1e-4")
    if isinstance(optimizer, DictConfig) and "_target_" in optimizer:
        check_optimizer(optimizer)
    if "label_smoothing" in model:
        number_in(model.label_smoothing, "model.label_smoothing", 0, 1, "=0.1")
    scheduler = model.get("scheduler") or {}
    if "T_max" in scheduler:
        positive_int(scheduler.T_max, "model.scheduler.T_max", example="model.scheduler.T_max=10")
    check_accelerator(trainer)
    check_writable_dir(cfg.paths.output_dir, "paths.output_dir")


def check_optimizer(optimizer: DictConfig) -> None:
    """The optimizer built once on a dummy parameter: torch checks its own settings (`betas=[2,3]`:
    "Invalid beta parameter"), and that check must come before any work, as one line."""
    try:
        factory = instantiate_clean(optimizer)
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"model.optimizer ({optimizer.get('_target_')}) refuses its settings: {e}; fix the "
            "model.optimizer setting it names, e.g. model.optimizer.betas=[0.9,0.999]"
        ) from None


def _check_auto_case(case: DictConfig) -> None:
    """The fields set on `case=auto` (they win over the advised case's)."""
    if case.get("epochs") is not None:
        positive_int(case.epochs, "case.epochs", example="case.epochs=5")
    probe = case.get("probe_epochs")
    if probe is not None and (isinstance(probe, bool) or not isinstance(probe, int) or probe < 0):
        raise ConfigError(f"case.probe_epochs={probe!r} is not a whole number >= 0; e.g. case.probe_epochs=5")
    if case.get("body_lr_scale") is not None:
        number_in(case.body_lr_scale, "case.body_lr_scale", 0, None, "=0.1")
    if case.get("bn_mode") not in (None, "train", "eval"):
        raise ConfigError(f"case.bn_mode={case.bn_mode!r} must be 'train' or 'eval'; e.g. case.bn_mode=eval")


def check_eval_config(cfg: DictConfig) -> None:
    """What `transfer-eval` needs from its config before it loads the checkpoint."""
    check_shared_settings(cfg)
    check_accelerator(cfg.trainer)
    check_writable_dir(cfg.paths.output_dir, "paths.output_dir")


def _follows_case_epochs(trainer: DictConfig) -> bool:
    """Whether `trainer.max_epochs` is still the `${case.epochs}` interpolation of train.yaml."""
    if not isinstance(trainer, DictConfig) or "max_epochs" not in trainer:
        return False
    raw = OmegaConf.to_container(trainer, resolve=False).get("max_epochs")
    return isinstance(raw, str) and raw.replace(" ", "") == "${case.epochs}"


# What to write for a setting left `???`: the settings a user must give.
MISSING_EXAMPLES = {
    "data.root": "data.root=/path/to/images",
    "ckpt_path": "ckpt_path=/path/to/run/checkpoints/epochNN.ckpt",
}


def check_set(cfg: DictConfig) -> None:
    """Every mandatory setting (`???` in the config) is given; else one message naming it."""
    missing = _missing_keys(cfg)
    if missing:
        key = missing[0]
        example = MISSING_EXAMPLES.get(key, f"{key}=...")
        raise ConfigError(f"{key} is not set; give it on the command line, e.g. {example}")


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return []
    keys = []
    for name in node:
        key = f"{prefix}{name}"
        if key == "hydra":
            continue
        if OmegaConf.is_missing(node, name):
            keys.append(key)
        elif isinstance(node._get_node(name), DictConfig):
            keys += _missing_keys(node._get_node(name), f"{key}.")
    return keys


MAX_IMAGE_SIZE = 4096


def check_image_size(cfg: DictConfig) -> None:
    """`data.image_size` up to MAX_IMAGE_SIZE: 100000 px asked for terabytes per batch and was killed
    by the kernel (no message) after a long wait."""
    data = cfg.get("data")
    size = data.get("image_size") if isinstance(data, DictConfig) else None
    if size is None or isinstance(size, bool) or not isinstance(size, numbers.Integral):
        return  # null keeps the weights' size; other types: the data module's own message
    if size > MAX_IMAGE_SIZE:
        batch = data.get("batch_size")
        batch = batch if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 else 1
        need = batch * 3 * size * size * 4  # one float32 input batch, before any activation
        raise ConfigError(
            f"data.image_size={size} is larger than {MAX_IMAGE_SIZE}: one batch of {batch} images "
            f"({batch} x 3 x {size} x {size} float32) would need {_bytes(need)} of memory for its input "
            f"alone; e.g. data.image_size=224 (or null: the weights' own size)"
        )


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_checkpoint_mode(cfg: DictConfig) -> None:
    """The best checkpoint's `mode` follows its metric: min for a loss, max otherwise. With
    `optimized_metric=val/loss` under `mode: max` the "best" checkpoint was the worst epoch. A mode
    the user wrote on the command line against the metric is refused rather than overridden."""
    checkpoint = OmegaConf.select(cfg, "callbacks.model_checkpoint")
    if not isinstance(checkpoint, DictConfig) or not isinstance(checkpoint.get("monitor"), str):
        return
    monitor = checkpoint.monitor
    wanted = "min" if "loss" in monitor.rpartition("/")[2] else "max"
    mode = checkpoint.get("mode", "min")  # ModelCheckpoint's default
    if mode == wanted:
        return
    if _overridden("callbacks.model_checkpoint.mode"):
        worst = "highest" if wanted == "min" else "lowest"
        raise ConfigError(
            f"callbacks.model_checkpoint.mode={mode} keeps the epoch with the {worst} {monitor}, the worst "
            f"one; e.g. callbacks.model_checkpoint.mode={wanted} (or leave it out: it follows the metric)"
        )
    checkpoint.mode = wanted


def _overridden(key: str) -> bool:
    """Whether `key` was given on the command line (False outside a Hydra run)."""
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return False
    return any(o.lstrip("+~").partition("=")[0] == key for o in overrides)


def check_accelerator(trainer: DictConfig) -> None:
    """`trainer=gpu` (or ddp) on a machine without a GPU: say which preset to use instead."""
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator not in ("gpu", "cuda"):
        return
    count = torch.cuda.device_count()
    if count == 0 and not (accelerator == "gpu" and torch.backends.mps.is_available()):
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no GPU that PyTorch can use "
            "(torch.cuda.device_count() is 0): use trainer=cpu (trainer=ddp_cpu for DDP), or "
            "trainer.accelerator=auto to take a GPU when there is one"
        )
    devices = trainer.get("devices")
    if count and isinstance(devices, int) and not isinstance(devices, bool) and devices > count:
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {count} GPU(s); e.g. trainer.devices={count}"
        )
