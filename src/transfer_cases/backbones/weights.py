"""Resolve a `weights` setting into a state dict and the preprocessing that goes with it.

`weights` is a torchvision weights name (`IMAGENET1K_V1`, `DEFAULT`), a path to a local file
(our weights format, a checkpoint of this project, a torchvision or timm `.pth`/`.safetensors`
state dict), or None for random init.
Offline machines get one message that names the weights and how to supply a local file.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model_weights

from transfer_cases.backbones.weights_file import load_weights_file
from transfer_cases.training.preprocess import Preprocess
from transfer_cases.utils.errors import ConfigError, WeightsError

# Keys of the original classifier: a weights file may lack them (backbone-only export), and they are
# dropped when the model has none (a timm model whose classifier was removed).
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.")
WEIGHTS_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".safetensors"}


def is_weights_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or Path(weights).suffix in WEIGHTS_SUFFIXES


def load_torchvision_weights(model: nn.Module, arch: str, name: str) -> Preprocess:
    """Load torchvision's `<arch>` weights `name` into `model`; return their preprocessing."""
    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"torchvision has no weights for '{arch}': {e}") from None
    try:
        weights = enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(
            f"backbone.weights={name} is not a weights name of {arch} (choose from: {names}), "
            "nor a path to a local file"
        ) from None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state = weights.get_state_dict(progress=True, check_hash=False)
    except (urllib.error.URLError, OSError) as e:
        raise WeightsError(
            f"could not download {enum.__name__}.{weights.name} ({e.__class__.__name__}: {e}).\n"
            f"This machine seems to be offline. Either fetch {weights.url}\n"
            f"on a connected machine and place it at {cache},\n"
            f"or give a local file: backbone.weights=/path/to/{Path(weights.url).name}"
        ) from None
    model.load_state_dict(state)
    t = weights.transforms()
    return Preprocess(
        mean=tuple(t.mean), std=tuple(t.std), resize_size=int(t.resize_size[0]), crop_size=int(t.crop_size[0])
    )


BODY_PREFIX = "backbone."


def load_weights_path(
    model: nn.Module,
    arch: str,
    path: str | Path,
    *,
    classifier: tuple[str, ...] = CLASSIFIER_PREFIXES,
    default: Preprocess | None = None,
) -> tuple[Preprocess, dict[str, torch.Tensor] | None]:
    """Load a local weights file into `model`, naming the file in every error.

    A checkpoint of this project (keys `backbone.*`, `head.*`) is not loaded into `model`: its body
    state is returned instead, for the staged body, and its head is dropped, so a checkpoint
    trained on other classes can initialise a new task without a head-shape mismatch.
    `classifier` holds the key prefixes of the model's original classifier (see above). The
    preprocessing is the file's where it has some, else `default` (else ImageNet's).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file not found: {path}\n"
            "Set backbone.weights to an existing file, to a torchvision weights name (needs internet), "
            "or to null for random initialisation."
        )
    try:
        wf = load_weights_file(path)
    except Exception as e:
        # torch's own messages for a file that is not a checkpoint ("101", "pop from empty list",
        # "invalid load key") say nothing to a user: name the file, what it should be, and the fix.
        raise WeightsError(
            f"cannot read weights file {path}: it is not a PyTorch state dict or checkpoint "
            f"({type(e).__name__}: {e}).\n"
            "Set backbone.weights to a .pt/.pth/.safetensors file saved with torch.save(model.state_dict()) "
            "(or a transfer-train checkpoint), or to null for random initialisation."
        ) from None
    preprocess = Preprocess.from_dict({**(default or Preprocess()).to_dict(), **wf.meta})
    body_state = {k[len(BODY_PREFIX) :]: v for k, v in wf.state_dict.items() if k.startswith(BODY_PREFIX)}
    if body_state:
        return preprocess, body_state
    if wf.arch is not None and wf.arch != arch:
        raise WeightsError(f"weights file {path} holds '{wf.arch}' weights, but the backbone is '{arch}'")
    own = model.state_dict()
    state = {k: v for k, v in wf.state_dict.items() if k in own or not k.startswith(classifier)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise WeightsError(f"weights file {path} does not fit '{arch}':\n{_first_lines(str(e))}") from None
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path} does not fit '{arch}': "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    return preprocess, None


def _first_lines(text: str, n: int = 6) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[:n] + ([f"... ({len(lines) - n} more lines)"] if len(lines) > n else []))
