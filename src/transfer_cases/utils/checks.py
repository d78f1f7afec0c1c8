"""Checks of a composed config before any work starts: one message naming the key, the bad value
and a valid example, instead of a traceback minutes later (or a run that never ends)."""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from transfer_cases.utils.errors import ConfigError, OutputError, TransferCasesError
from transfer_cases.utils.paths import config_dir


def check_train_config(cfg: DictConfig) -> None:
    """Everything `transfer-train` needs from its config before it builds a model.

    Runs before the advisor too (`case=auto`, a typo must not cost an extraction): the auto case's
    unset fields (null until the advisor picks a case) are then skipped, the ones set checked."""
    check_set(cfg)
    check_settings(cfg, TRAIN_SETTINGS)
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
    if "label_smoothing" in model:
        number_in(model.label_smoothing, "model.label_smoothing", 0, 1, "=0.1")
    scheduler = model.get("scheduler") or {}
    if "T_max" in scheduler:
        positive_int(scheduler.T_max, "model.scheduler.T_max", example="model.scheduler.T_max=10")
    check_accelerator(trainer)
    check_writable_dir(cfg.paths.output_dir, "paths.output_dir")


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
    check_set(cfg)
    check_settings(cfg, TRAIN_SETTINGS)  # the keys eval.yaml shares with train.yaml
    check_accelerator(cfg.trainer)
    check_writable_dir(cfg.paths.output_dir, "paths.output_dir")


def _follows_case_epochs(trainer: DictConfig) -> bool:
    """Whether `trainer.max_epochs` is still the `${case.epochs}` interpolation of train.yaml."""
    if not isinstance(trainer, DictConfig) or "max_epochs" not in trainer:
        return False
    raw = OmegaConf.to_container(trainer, resolve=False).get("max_epochs")
    return isinstance(raw, str) and raw.replace(" ", "") == "${case.epochs}"


def positive_int(value: Any, key: str, *, example: str, why: dict[int, str] | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        note = (why or {}).get(value, "") if isinstance(value, int) and not isinstance(value, bool) else ""
        raise ConfigError(f"{key}={value!r} is not a whole number >= 1{note}; e.g. {example}")
    return int(value)


def positive_number(value: Any, key: str, *, example: str) -> float:
    if not _is_number(value) or not value > 0:
        raise ConfigError(f"{key}={value!r} is not a number > 0; e.g. {example}")
    return float(value)


def number_in(value: Any, key: str, low: float, high: float | None, example: str) -> float:
    """`low <= value` (and `value < high` when given)."""
    if not _is_number(value) or value < low or (high is not None and value >= high):
        bounds = f">= {low}" + (f" and < {high}" if high is not None else "")
        raise ConfigError(f"{key}={value!r} must be a number {bounds}; e.g. {key}{example}")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value  # not NaN


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


# --- the settings' schema -----------------------------------------------------------------------
# One rule per setting, checked by `check_settings` before any work. A rule takes `(value, key)` and
# returns the value to use (a boolean written `no` becomes False) or raises a ConfigError naming the
# key, the bad value and a valid example. A key absent from the config is skipped.
Rule = Callable[[Any, str], Any]

_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def boolean(value: Any, key: str) -> bool:
    """true/false, yes/no, on/off (any case). Any other string would be truthy where it is used
    (`cache.enabled=no` kept the cache on), so it is refused."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ConfigError(
        f"{key}={value!r} is not a boolean: use true or false (yes/no and on/off work too); e.g. {key}=false"
    )


def check_settings(cfg: DictConfig, rules: Mapping[str, Rule]) -> None:
    """Every key known to its target, then each rule applied to its setting, and the values the rules
    normalise written back."""
    check_known_keys(cfg)
    for key, rule in rules.items():
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or name not in parent:
            continue
        value = parent[name]
        checked = rule(value, key)
        if type(checked) is not type(value) or checked != value:
            parent[name] = checked
    check_image_size(cfg)
    check_checkpoint_mode(cfg)


def whole(low: int = 1, high: int | None = None, *, example: int, optional: bool = False) -> Rule:
    """A whole number (not a boolean) in [low, high]; null too when `optional`."""
    bounds = f">= {low}" if high is None else f"from {low} to {high}"

    def rule(value: Any, key: str) -> Any:
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ConfigError(f"{key}={value!r} is not a whole number {bounds}; e.g. {key}={example}")
        if high is not None and value > high:
            raise ConfigError(f"{key}={value!r} is not a whole number {bounds}; e.g. {key}={example}")
        return value

    return rule


def number(low: float, high: float | None = None, *, example: float) -> Rule:
    """A finite number (not a boolean) with `low <= value` (and `value < high` when given)."""

    def rule(value: Any, key: str) -> Any:
        number_in(value, key, low, high, f"={example}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not a finite number; e.g. {key}={example}")
        return value

    return rule


def one_of(*choices: Any, example: Any = None) -> Rule:
    def rule(value: Any, key: str) -> Any:
        if isinstance(value, bool) or value not in choices:
            names = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{key}={value!r} is not one of: {names}; e.g. {key}={example or choices[0]}")
        return value

    return rule


def batches(value: Any, key: str) -> Any:
    """Lightning's `limit_*_batches`: a number of batches >= 1, or a fraction of them in (0, 1]."""
    whole_ok = isinstance(value, numbers.Integral) and value >= 1
    fraction_ok = isinstance(value, float) and 0 < value <= 1
    if isinstance(value, bool) or not (whole_ok or fraction_ok):
        nothing = " (0 runs no batch: nothing is trained or validated)" if value == 0 else ""
        raise ConfigError(
            f"{key}={value!r} must be a number of batches >= 1 or a fraction in (0, 1]{nothing}; "
            f"e.g. {key}=1.0"
        )
    return value


def devices(value: Any, key: str) -> Any:
    """A number of devices >= 1 or `auto`; on a machine with GPUs also -1 (all) or GPU indices."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    if torch.cuda.device_count() > 0:
        indices = value.split(",") if isinstance(value, str) else value
        if value == -1 or (
            isinstance(indices, list | ListConfig)
            and indices
            and all(str(i).strip().isdigit() for i in indices)
        ):
            return value
    raise ConfigError(f"{key}={value!r} is not a number of devices >= 1 or auto; e.g. {key}=1")


# What Lightning 2 accepts as `precision` (lightning.fabric.connector._PRECISION_INPUT).
PRECISIONS = (
    "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true",
    "transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64", 32, 16, 64,
)  # fmt: skip


def precision(value: Any, key: str) -> Any:
    if isinstance(value, bool) or value not in PRECISIONS:
        raise ConfigError(
            f"{key}={value!r} is not a precision Lightning knows: 32-true, 16-mixed, bf16-mixed, "
            f"16-true, bf16-true, 64-true; e.g. {key}=16-mixed (or the preset precision=16-mixed)"
        )
    return value


def augment(value: Any, key: str) -> Any:
    """Transforms to instantiate: a list of mappings with a `_target_` (or one, or null/[] for none)."""
    items = value if isinstance(value, ListConfig | list) else [value] if value is not None else []
    if not all(isinstance(item, DictConfig | dict) and "_target_" in item for item in items):
        raise ConfigError(
            f"{key}={value!r} is not a list of transforms (mappings with a _target_); e.g. {key}=[] for "
            f"none, or {key}='[" + "{_target_: torchvision.transforms.v2.RandomHorizontalFlip}]'"
        )
    return value


def deterministic(value: Any, key: str) -> Any:
    """Lightning's `deterministic`: a boolean, or `warn`."""
    return value if value == "warn" else boolean(value, key)


def fast_dev_run(value: Any, key: str) -> Any:
    """Lightning's `fast_dev_run`: a boolean, or a number of batches >= 0."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return value
    return boolean(value, key)


def project_path(value: Any, key: str) -> Any:
    """A relative path is resolved against the project root (the folder holding configs/), not the
    current folder: the same command finds the same data wherever it is started."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return value if path.is_absolute() else str((config_dir().parent / path).resolve())


def crop_scale(value: Any, key: str) -> Any:
    """A (low, high) pair of image-area fractions with 0 < low <= high <= 1, or null (a fixed centre crop)."""
    pair = list(value) if isinstance(value, ListConfig | list | tuple) else None
    if value is None or (
        pair and len(pair) == 2 and all(_is_number(v) for v in pair) and 0 < pair[0] <= pair[1] <= 1
    ):
        return value
    raise ConfigError(
        f"{key}={value!r} is not a (low, high) pair with 0 < low <= high <= 1 (fractions of the image "
        f"area); e.g. {key}=[0.5,1.0], or {key}=null for a fixed centre crop"
    )


def widths(value: Any, key: str) -> Any:
    """Channel widths of a stack of stages: a non-empty list of whole numbers >= 1."""
    items = list(value) if isinstance(value, ListConfig | list) else None
    if items and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1 for w in items):
        return value
    raise ConfigError(
        f"{key}={value!r} is not a list of channel widths (whole numbers >= 1); e.g. {key}=[8,16,32]"
    )


def folder(value: Any, key: str) -> Any:
    """A folder path: a non-empty string (null would be written as the folder 'None')."""
    if isinstance(value, str) and value.strip():
        return value
    raise ConfigError(f"{key}={value!r} is not a folder path; e.g. {key}=/tmp/transfer-cache")


# The metrics TransferModule logs once per epoch (module.py, `_log_epoch`): what a checkpoint can monitor.
EPOCH_METRICS = ("val/acc", "val/f1", "val/loss", "train/acc", "train/loss_epoch")
SEED = whole(0, 2**32 - 1, example=42)  # numpy's seed range

TRAIN_SETTINGS: dict[str, Rule] = {
    "seed": SEED,
    "advisor.seed": SEED,
    "test": boolean,
    "optimized_metric": one_of(*EPOCH_METRICS),
    "callbacks.model_checkpoint.monitor": one_of(*EPOCH_METRICS),
    "cache.enabled": boolean,
    "cache.stamp": one_of("mtime", "content"),
    "data.check_images": boolean,
    "data.augment": augment,
    "backbone.image_size": whole(1, example=224, optional=True),
    "model.channels_last": boolean,
    "model.head.kind": one_of("linear", "mlp"),
    "model.head.hidden": whole(1, example=256),
    "model.head.dropout": number(0, 1, example=0.2),
    "trainer.devices": devices,
    "trainer.num_nodes": whole(1, example=1),
    "trainer.precision": precision,
    "trainer.log_every_n_steps": whole(1, example=4),
    "trainer.check_val_every_n_epoch": whole(1, example=1, optional=True),
    "trainer.accumulate_grad_batches": whole(1, example=1),
    "trainer.limit_train_batches": batches,
    "trainer.limit_val_batches": batches,
    "trainer.fast_dev_run": fast_dev_run,
    "trainer.deterministic": deterministic,
    "trainer.sync_batchnorm": boolean,
    "trainer.enable_checkpointing": boolean,
    "trainer.enable_progress_bar": boolean,
    "trainer.enable_model_summary": boolean,
    "trainer.inference_mode": boolean,
    "trainer.detect_anomaly": boolean,
    "trainer.barebones": boolean,
    "callbacks.last_checkpoint.min_interval_s": number(0, example=10),
    "callbacks.freeze_guard.check_interval_s": number(0, example=10),
    "paths.data_dir": project_path,
    "data.random_crop_scale": crop_scale,
    "backbone.widths": widths,
    "cache.dir": folder,
    "data.download": boolean,
}


# --- keys a target does not take: "did you mean ...?" ------------------------------------------------
# The groups instantiated with every key of their node as a keyword argument (the backbone's node is
# read by the backbone factory, the case's by cases.py: not checked here).
TARGET_GROUPS = ("trainer", "model", "data", "cache", "advisor", "callbacks", "logger")


def check_known_keys(cfg: DictConfig) -> None:
    """A key the node's `_target_` does not take (`+trainer.max_epoch=3`) is one line naming the
    closest it does take, before any work: instantiated, it was a TypeError traceback (or, under a
    target taking `**kwargs`, silently ignored)."""
    for group in TARGET_GROUPS:
        node = cfg.get(group) if isinstance(cfg, DictConfig) else None
        if isinstance(node, DictConfig):
            _check_node_keys(node, group)


def _check_node_keys(node: DictConfig, key: str) -> None:
    if "_target_" in node:
        accepted = _accepted_keywords(node._get_node("_target_")._value())
        if accepted is not None:
            for name in map(str, node):
                if not (name.startswith("_") and name.endswith("_")) and name not in accepted:
                    raise ConfigError(_unknown_key_message(f"{key}.{name}", name, accepted, node))
    for name in node:
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _check_node_keys(child, f"{key}.{name}")


def _unknown_key_message(key: str, name: str, accepted: set[str], node: DictConfig) -> str:
    parent = key.rpartition(".")[0]
    close = difflib.get_close_matches(name, sorted(accepted), n=1, cutoff=0.6)
    if close:
        return f"unknown setting {key}; did you mean {parent}.{close[0]}?"
    target = node._get_node("_target_")._value()
    return f"unknown setting {key}: {target} takes no '{name}'; check the spelling or remove it"


def _accepted_keywords(target: Any) -> set[str] | None:
    """The keyword arguments `target` takes, following `**kwargs` up a class's bases; None when
    unknown (not importable, or `**kwargs` that go nowhere we can see)."""
    try:
        obj = get_object(str(target))
    except Exception:
        return None  # a missing package is named when the group is instantiated
    if isinstance(obj, type):
        functions = [k.__dict__["__init__"] for k in obj.__mro__ if "__init__" in k.__dict__]
    else:
        functions = [obj]
    accepted: set[str] = set()
    for function in functions:
        if function is object.__init__:
            return None
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        kinds = {p.kind for p in parameters}
        accepted |= {
            p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"
        }
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            return accepted
    return None


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


def check_writable_dir(folder: str | Path, setting: str) -> Path:
    """Create `folder` if needed and write a probe file in it; else one message naming `setting`."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise OutputError(_not_writable(folder, setting, e)) from None
    return folder


def check_creatable_dir(folder: str | Path, setting: str) -> None:
    """Like `check_writable_dir`, but creates nothing: probes the nearest folder that exists."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file, not a folder")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as e:
        raise OutputError(_not_writable(folder, setting, e)) from None


def _not_writable(folder: Path, setting: str, error: OSError) -> str:
    reason = (error.strerror or str(error)).lower()
    return (
        f"cannot write to {setting}={folder}: {reason}; choose a folder you can write to, "
        f"e.g. {setting}=/tmp/runs/my_run"
    )


class OutputFolderCheck(Callback):
    """Hydra callback: a run or sweep folder that cannot be written stops with one message, before
    Hydra tries to create it (Hydra itself would end with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(check_creatable_dir, config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(check_creatable_dir, config.hydra.sweep.dir, "hydra.sweep.dir")


def _exit_on_error(check: Any, *args: Any) -> None:
    # Runs inside Hydra, outside the task function and its `friendly_errors`: same output, same status.
    try:
        check(*args)
    except TransferCasesError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)
