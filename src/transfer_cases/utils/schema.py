"""The settings' schema: one rule per setting (utils/validate.py), checked by `check_settings` before any
work, and every key checked against the `_target_` that takes it ("did you mean ...?")."""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from transfer_cases.utils.errors import ConfigError
from transfer_cases.utils.paths import config_dir
from transfer_cases.utils.validate import Rule, boolean, is_number, number, one_of, whole


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
        pair and len(pair) == 2 and all(is_number(v) for v in pair) and 0 < pair[0] <= pair[1] <= 1
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

# The advisor's settings, checked here before any work and by `Advisor` itself when built from Python.
ADVISOR_SETTINGS: dict[str, Rule] = {
    "max_per_class": whole(2, example=100, why="each class needs an image to fit and one to hold out"),
    "folds": whole(2, example=5, why="cross-validation holds one fold out and fits on the others"),
    "probe_scaling": one_of("shared", "feature"),
    "small_max_per_class": whole(
        1, example=100, why="median train images per class below which data is small"
    ),
    "tie_sems": number(0, example=1, why="standard errors of the probe's peak within which stages tie"),
    "tie_margin": number(0, top=1, example=0.01, why="accuracy within which stages tie, at least"),
    "full_body_on_tie": boolean,
    "unrelated_needs_evidence": boolean,
    "related_margin": number(0, top=1, example=0.01, why="accuracy by which pretrained must beat random"),
    "related_sems": number(0, example=1, why="standard errors by which pretrained must beat random"),
    "solved_margin": number(0, top=1, example=0.02, why="error below which features solve the task"),
    "min_gain": number(0, example=0.01, why="predicted fine-tuning gain (accuracy) that pays"),
    "gain_sems": number(0, example=1, why="standard errors by which the gain must clear min_gain"),
    "curve_exponent_max": number(0, example=1, why="cap on the learning curve's power-law exponent"),
    "break_even_per_class": number(0, example=100, why="images per class where fine-tuning breaks even"),
    "finetune_exponent": number(0, example=1, why="how fast fine-tuning's share of the error grows"),
}

# The data audit's settings (reporting/audit_run.Audit checks them too, when built from Python).
AUDIT_SETTINGS: dict[str, Rule] = {
    "duplicate_threshold": number(0, top=1, example=0.8, why="cosine similarity of a candidate pair"),
    "neighbours": whole(1, example=3, why="nearest neighbours per image"),
    "pixel_tolerance": number(0, top=1, example=0.04, why="mean grey difference of the same picture"),
    "min_correlation": number(-1, top=1, example=0.8, why="grey-level correlation of the same picture"),
    "folds": whole(2, example=5, why="folds of the out-of-fold probe"),
    "max_pairs": whole(1, example=5000, why="candidates checked at pixel level"),
    "max_listed": whole(0, example=50, why="pairs and suspects listed in audit.json"),
    "imbalance_warning": number(1, example=3, why="largest/smallest class count that warns"),
}

TRAIN_SETTINGS: dict[str, Rule] = {
    "seed": SEED,
    "advisor.seed": SEED,
    **{f"advisor.{name}": rule for name, rule in ADVISOR_SETTINGS.items()},
    **{f"audit.{name}": rule for name, rule in AUDIT_SETTINGS.items()},
    "audit.seed": SEED,
    "callbacks.progress_bar.refresh_rate": whole(0, example=1, why="batches between bar updates; 0: none"),
    "callbacks.progress_bar.interval_s": number(
        0, example=30, why="seconds between progress lines off a terminal"
    ),
    "test": boolean,
    "optimized_metric": one_of(*EPOCH_METRICS),
    "callbacks.model_checkpoint.monitor": one_of(*EPOCH_METRICS),
    "cache.enabled": boolean,
    "cache.stamp": one_of("mtime", "content"),
    "cache.backend": one_of("auto", "torch", "onnxruntime"),
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
