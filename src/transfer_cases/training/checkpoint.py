"""Reading a checkpoint of `transfer-train` back, for eval, predict and resume, with errors that name
the file and say what it is: missing, empty, truncated, text, a weights file, another case's run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transfer_cases.backbones.weights_file import FORMAT as WEIGHTS_FORMAT
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.errors import ConfigError

WHERE = "the .ckpt files written by transfer-train are in <run>/checkpoints/ (last.ckpt, epochNN.ckpt)"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (tensors and plain containers, `weights_only=True`), or one
    `ConfigError` naming the file, what it is instead and what to pass."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"checkpoint {path} is a folder; pass a file: {WHERE}")
    if not path.is_file():
        raise ConfigError(
            f"checkpoint not found: {path}; pass the .ckpt written by transfer-train "
            "(its path is printed at the end of training, under <run>/checkpoints/)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: {_unreadable(path, e)}; {WHERE}") from None
    what = _not_a_checkpoint(obj, path)
    if what:
        raise ConfigError(f"{path} is {what}")
    bad = non_finite_weights(obj["state_dict"])
    if bad:
        raise ConfigError(
            f"checkpoint {path} holds non-finite weights (NaN or inf in {len(bad)} tensors, e.g. "
            f"{bad[0]}): its run diverged, and its predictions would be NaN. Use a checkpoint written "
            "before the divergence, or train again with a lower model.optimizer.lr (or "
            "trainer.precision=32-true)"
        )
    return obj


def non_finite_weights(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of `state` that hold a NaN or an infinity."""
    return [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(v.isfinite().all())
    ]


def _unreadable(path: Path, error: Exception) -> str:
    """What a file that `torch.load` rejects most likely is."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "the file is empty (0 bytes): a write that was cut short"
    if head.startswith(b"PK\x03\x04"):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the file is truncated or corrupt (a PyTorch archive that does not load: {first})"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "the file is not a PyTorch checkpoint"
    return "it is a text file, not a PyTorch checkpoint"


def _not_a_checkpoint(obj: Any, path: Path) -> str:
    """'' for a checkpoint of transfer-train, else what `obj` is and what to do instead."""
    if isinstance(obj, dict) and obj.get("format") == WEIGHTS_FORMAT:
        return (
            f"a weights file ({obj.get('arch')} backbone weights, format {WEIGHTS_FORMAT}), not a "
            "checkpoint of transfer-train: it holds no head, case or classes. To train from it, "
            f"pass it as backbone.weights={path}; to evaluate, predict or resume, {WHERE}"
        )
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return (
            f"a plain state dict ({len(obj)} tensors), not a checkpoint of transfer-train: it holds no "
            f"case, head or classes. To initialise a backbone from it, pass it as backbone.weights={path}; "
            f"to evaluate, predict or resume, {WHERE}"
        )
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)):
        return f"not a checkpoint of transfer-train (it holds a {type(obj).__name__}); {WHERE}"
    hparams = obj.get("hyper_parameters") or {}
    if not ({"backbone", "case", "num_classes"} <= set(hparams)):
        return (
            "a Lightning checkpoint, but not one written by transfer-train (no backbone, case and "
            f"classes in its hyper-parameters); {WHERE}"
        )
    return ""


def module_from_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> TransferModule:
    """Rebuild the module from a checkpoint's saved configuration and load its weights."""
    hparams = {**checkpoint["hyper_parameters"], "load_pretrained": False}
    module = TransferModule(**hparams)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise ConfigError(
            f"checkpoint {path} does not fit the model its own configuration builds "
            f"({describe(hparams)}); was it written by another version of this project? "
            f"{lines[0] if lines else ''}"
        ) from None
    return module


def load_module(path: str | Path) -> TransferModule:
    """A `TransferModule` from a checkpoint written by `transfer-train`, in eval mode on the CPU.

    Fine-tuning the returned module is fine: `TransferModule.on_fit_start` puts its trainable part
    back into train mode (and says so).
    """
    return module_from_checkpoint(read_checkpoint(path), path).eval()


def describe(hparams: dict[str, Any]) -> str:
    """`case=small_different (keep=-1, freeze=all), backbone mobilenet_v2, 2 classes`."""
    case = hparams.get("case") or {}
    return (
        f"case={case.get('name')} (keep={case.get('keep')}, freeze={case.get('freeze')}), "
        f"backbone {backbone_name(hparams.get('backbone') or {})}, {hparams.get('num_classes')} classes"
    )


def backbone_name(backbone: dict[str, Any]) -> str:
    name = backbone.get("arch") or str(backbone.get("_target_", "?")).rsplit(".", 1)[-1]
    return f"{name} (widths {list(backbone['widths'])})" if "widths" in backbone else name


def check_resumable(checkpoint: dict[str, Any], path: str | Path, module: TransferModule) -> None:
    """A resume must rebuild the same model: same cut, same frozen prefix, same weights' shapes and
    classes. Otherwise one message says what the checkpoint was trained as, not a list of keys."""
    saved = checkpoint["hyper_parameters"]
    here = {**module.hparams, "case": module.case.to_dict()}
    saved_case = saved.get("case") or {}
    problems = [
        f"case.{key} {saved_case.get(key)!r} there, {here['case'].get(key)!r} here"
        for key in ("keep", "freeze")
        if saved_case.get(key) != here["case"].get(key)
    ]
    saved_head, head = dict(saved.get("head") or {}), dict(here.get("head") or {})
    shaping = ("kind", "hidden") if "mlp" in (saved_head.get("kind"), head.get("kind")) else ("kind",)
    problems += [  # the settings that shape the head's weights (dropout holds none)
        f"model.head.{key} {saved_head.get(key)!r} there, {head.get(key)!r} here"
        for key in shaping
        if saved_head.get(key) != head.get(key)
    ]
    saved_body, body = backbone_name(saved.get("backbone") or {}), backbone_name(here.get("backbone") or {})
    if saved_body != body:
        problems.append(f"backbone {saved_body} there, {body} here")
    if list(saved.get("class_names") or []) != list(module.class_names):
        problems.append(f"classes {saved.get('class_names')} there, {module.class_names} here")
    state = checkpoint["state_dict"]
    own = module.state_dict()
    if set(state) != set(own):
        names = sorted(set(state) ^ set(own))
        problems.append(f"{len(names)} weights differ in name, e.g. {names[0]}")
    else:
        shapes = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
        if shapes:
            k = shapes[0]
            problems.append(f"{k} is {list(state[k].shape)} there, {list(own[k].shape)} here")
    if problems:
        raise ConfigError(
            f"cannot resume from {path}: it was trained as {describe(saved)}, but this run builds "
            f"{describe(dict(here))} ({'; '.join(problems)}). Resume with the checkpoint's settings "
            "(the run's .hydra/config.yaml has them), or start a new run initialised from its "
            f"body: backbone.weights={path}"
        )


def resume_overrides(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Module arguments for a resumed run: the checkpoint holds every weight, so the pretrained file
    is not read (it may be gone), and the images are preprocessed as in the interrupted run."""
    overrides: dict[str, Any] = {"load_pretrained": False}
    preprocess = checkpoint["hyper_parameters"].get("preprocess")
    if preprocess:
        overrides["preprocess"] = preprocess
    return overrides
