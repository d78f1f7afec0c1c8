"""The project's own weights-file format: a state dict plus the metadata that goes with it.

A file holds `{"format", "arch", "state_dict", "meta"}` with only tensors, strings and numbers,
so it loads with `torch.load(weights_only=True)`. `meta` carries the preprocessing the
weights expect (`mean`, `std`, `resize_size`, `crop_size`), `categories` and provenance.
Plain state-dict files (torchvision's `.pth` downloads, timm's `.pth`/`.safetensors`) load too,
with empty meta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Independent of the package name, so a project renamed from this template still reads the file.
FORMAT = "staged-body-weights/1"


@dataclass
class WeightsFile:
    state_dict: dict[str, torch.Tensor]
    arch: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_weights_file(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    *,
    arch: str,
    meta: dict[str, Any],
    half: bool = True,
) -> None:
    """Write a weights file; `half` stores floating tensors as float16 to halve the size."""
    tensors = {
        k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in state_dict.items()
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "arch": arch, "state_dict": tensors, "meta": meta}, path)


def load_weights_file(path: str | Path) -> WeightsFile:
    """Read a weights file (ours or a plain state dict); floating tensors come back as float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        obj = _load_safetensors(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state, arch, meta = obj["state_dict"], obj.get("arch"), dict(obj.get("meta") or {})
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        # A Lightning checkpoint: keep the preprocessing its model was trained with.
        state, arch = obj["state_dict"], None
        meta = dict((obj.get("hyper_parameters") or {}).get("preprocess") or {})
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, arch, meta = obj, None, {}
    else:
        raise ValueError(f"{path} holds neither a state dict nor a transfer_cases weights file")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return WeightsFile(state_dict=state, arch=arch, meta=meta)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError(
            "reading .safetensors files needs the safetensors package (it comes with timm: "
            'pip install -e ".[timm]")'
        ) from None
    return load_file(path, device="cpu")
