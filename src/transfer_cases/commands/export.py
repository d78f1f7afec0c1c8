"""`transfer-export CKPT --format onnx|torchscript|exported [--out PATH]`: a checkpoint as a deployable model.

The exported model maps a normalised image batch `image` (N, 3, crop, crop; N dynamic) to class
`probabilities` (softmax included). Class names and preprocessing travel with the model (ONNX
`metadata_props`, or a `metadata.json` extra file inside `.pt` / `.pt2`) and in a side file
`<out>.json`, so a deployment needs neither this package nor the checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_cases.commands.cli import friendly_errors
from transfer_cases.training.checkpoint import load_module
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.errors import ConfigError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
INPUT, OUTPUT = "image", "probabilities"
# Opset 18 runs on onnxruntime >= 1.14 and is native to torch's dynamo exporter (no version conversion).
ONNX_OPSET = 18
METADATA_FILE = "metadata.json"  # the extra file inside .pt / .pt2
WRITABLE_FIX = "pass --out with a file (or a folder ending in '/') where you can write"


class Probabilities(nn.Module):
    """The classifier as deployed: body, head, softmax, from plain `nn.Module`s.

    The LightningModule itself does not trace (its `trainer` property raises outside a Trainer),
    and channels_last is a training-time layout choice, so only the two parts that compute are kept.
    """

    def __init__(self, module: TransferModule) -> None:
        super().__init__()
        self.backbone, self.head = module.backbone, module.head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(image)).softmax(dim=1)


def metadata(module: TransferModule, fmt: str, ckpt: Path) -> dict[str, Any]:
    """What a deployment needs to feed the model and read its output."""
    crop = module.preprocess.crop_size
    return {
        "format": fmt,
        "input": {"name": INPUT, "shape": ["batch", 3, crop, crop], "dtype": "float32"},
        "output": {"name": OUTPUT, "shape": ["batch", len(module.class_names)], "dtype": "float32"},
        "class_names": list(module.class_names),
        "preprocess": module.preprocess.to_dict(),
        "case": module.case.name,
        "backbone": module.backbone.name,
        "source_checkpoint": str(ckpt.resolve()),
    }


# -- the three exporters: (model, example batch, output path, metadata) -> None ---------------------
def _batch_dim() -> dict[str, dict[int, Any]]:
    return {INPUT: {0: torch.export.Dim("batch", min=1)}}


def _onnx(model: nn.Module, example: torch.Tensor, out: Path, info: dict[str, Any]) -> None:
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=_batch_dim(),
        opset_version=ONNX_OPSET,
        dynamo=True,
        verbose=False,
    )
    # Every value JSON-encoded, so a reader decodes them all the same way.
    program.model.metadata_props.update({k: json.dumps(v) for k, v in info.items()})
    program.save(str(out))  # weights inline (external data only beyond protobuf's 2 GB limit)


def _torchscript(model: nn.Module, example: torch.Tensor, out: Path, info: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        # Deprecated upstream in favour of torch.export (`--format exported`); still what many runtimes load.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(out), _extra_files={METADATA_FILE: json.dumps(info)})


def _exported(model: nn.Module, example: torch.Tensor, out: Path, info: dict[str, Any]) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim())
    torch.export.save(program, str(out), extra_files={METADATA_FILE: json.dumps(info)})


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path, dict[str, Any]], None]] = {
    "onnx": _onnx,
    "torchscript": _torchscript,
    "exported": _exported,
}


def export(ckpt: str | Path, fmt: str | None = None, out: str | Path | None = None) -> Path:
    """Export the checkpoint's model in `fmt` to `out` (default: next to the checkpoint) and `<out>.json`.

    Without `fmt`, the format is the one `out`'s suffix names (see `choose_format`)."""
    fmt = choose_format(fmt, out)
    if fmt == "onnx":
        _require_onnx()
    ckpt = Path(ckpt).expanduser()
    path = output_path(ckpt, fmt, out)
    module = load_module(ckpt)
    model = Probabilities(module).eval()
    crop = module.preprocess.crop_size
    # A batch of 2 to trace with: a batch of 1 would be specialised into the graph.
    example = torch.rand(2, 3, crop, crop)
    info = metadata(module, fmt, ckpt)
    try:
        with torch.no_grad():
            EXPORTERS[fmt](model, example, path, info)
        Path(f"{path}.json").write_text(json.dumps(info, indent=2) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror or e}); {WRITABLE_FIX}") from None
    return path


def choose_format(fmt: str | None, out: str | Path | None) -> str:
    """The format to write: `fmt`, else the one whose suffix `out` ends in, else onnx.

    A file named for one format holding another (`--format torchscript --out model.onnx`) would be
    handed to the wrong runtime, so a suffix of another format is refused; a suffix no format uses
    (`model.bin`) is the user's choice and kept."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    is_file = out is not None and not (Path(out).expanduser().is_dir() or str(out).endswith(("/", os.sep)))
    suffix = Path(out).suffix.lower() if is_file else ""
    named = next((name for name, ext in FORMATS.items() if ext == suffix), None)
    if fmt is None:
        return named or "onnx"
    if named is not None and named != fmt:
        raise ConfigError(
            f"--out {out} ends in {suffix}, the suffix of the {named} format, but --format {fmt} writes "
            f"{fmt}; name the file {Path(out).with_suffix(FORMATS[fmt]).name} (or pass --format {named}, "
            "or leave --format out: the suffix chooses the format)"
        )
    return fmt


def output_path(ckpt: Path, fmt: str, out: str | Path | None) -> Path:
    """`out` (a file, or a folder for `<ckpt stem><suffix>`) or next to the checkpoint (checked writable)."""
    default_name = ckpt.stem + FORMATS[fmt]
    if out is None:
        return _writable(ckpt.with_name(default_name))
    path = Path(out).expanduser()
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        path = path / default_name
    return _writable(path)


def _writable(path: Path) -> Path:
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"cannot write {path}: {existing} is a file, not a folder; {WRITABLE_FIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create the output folder {path.parent} ({e.strerror or e}); {WRITABLE_FIX}"
        ) from None
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"the output folder {path.parent} is not writable; {WRITABLE_FIX}")
    return path


def _require_onnx() -> None:
    for name in ("onnx", "onnxscript"):  # what torch.onnx's exporter imports
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(
                f"--format onnx needs the package '{name}', which is not installed; "
                'install the extra: pip install -e ".[export]"'
            ) from None


# -- usage ------------------------------------------------------------------------------------------
_LOAD = {
    "onnx": """\
import json

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(MODEL_PATH, providers=["CPUExecutionProvider"])
info = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}


def run(x):
    return session.run(["probabilities"], {"image": x})[0]
""",
    "torchscript": """\
import json

import numpy as np
import torch
from PIL import Image, ImageOps

extra = {"metadata.json": ""}
model = torch.jit.load(MODEL_PATH, _extra_files=extra)
info = json.loads(extra["metadata.json"])


def run(x):
    return model(torch.from_numpy(x)).detach().numpy()
""",
    "exported": """\
import json

import numpy as np
import torch
from PIL import Image, ImageOps

extra = {"metadata.json": ""}
model = torch.export.load(MODEL_PATH, extra_files=extra).module()
info = json.loads(extra["metadata.json"])


def run(x):
    return model(torch.from_numpy(x)).detach().numpy()
""",
}

# The validation transform (transfer_cases.data.transforms.eval_transform) in PIL and numpy; `to_rgb`
# is the pipeline's own (transforms.to_rgb, less its error messages): PIL's convert("RGB") clips
# 16-bit grey at 255, so a 16-bit scan would reach the model near white. tests/test_export.py keeps
# the two equal.
_PREPROCESS = """\


def to_rgb(img):
    \"\"\"As training reads images: 16-bit grey scaled (not clipped) to 8 bit, float grey read as 0..1,
    transparent palettes through RGBA.\"\"\"
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        x = np.asarray(img)
        x = x * 255.0 if img.mode == "F" else x.astype(np.float64) / 257.0
        img = Image.fromarray(np.rint(x).astype(np.uint8))
    elif img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess(path):
    \"\"\"Resize the short side, centre-crop, scale to [0, 1], normalise: a (1, 3, crop, crop) batch.\"\"\"
    p = info["preprocess"]
    img = to_rgb(ImageOps.exif_transpose(Image.open(path)))  # upright, as the EXIF orientation says
    (w, h), size, crop = img.size, p["resize_size"], p["crop_size"]
    long = int(size * max(w, h) / min(w, h))
    img = img.resize((size, long) if w <= h else (long, size), Image.BILINEAR)
    left, top = round((img.width - crop) / 2), round((img.height - crop) / 2)
    img = img.crop((left, top, left + crop, top + crop))
    x = np.asarray(img, dtype=np.float32) / 255
    x = (x - np.array(p["mean"], np.float32)) / np.array(p["std"], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


probs = run(preprocess(IMAGE_PATH))[0]  # stack several images on axis 0 for a batch
best = int(probs.argmax())
print(info["class_names"][best], round(float(probs[best]), 4))
"""


def usage(fmt: str, path: str | Path, image: str = "image.jpg") -> str:
    """A self-contained Python snippet that loads the exported model and classifies `image`."""
    # Placeholders rather than str.format: the snippet is full of braces. JSON string literals are
    # Python ones, with double quotes like the rest of the snippet.
    snippet = _LOAD[fmt] + _PREPROCESS
    return snippet.replace("MODEL_PATH", json.dumps(str(path))).replace("IMAGE_PATH", json.dumps(image))


@friendly_errors
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="transfer-export", description=__doc__)
    parser.add_argument("ckpt", type=Path, help="checkpoint written by transfer-train")
    parser.add_argument(
        "--format",
        choices=list(FORMATS),
        default=None,
        help="onnx (onnxruntime and friends; needs the 'export' extra), torchscript (.pt), "
        "exported (torch.export, .pt2); default: the one --out's suffix names, else onnx. "
        "A --out suffix of another format is refused",
    )
    parser.add_argument(
        "--out", default=None, help="output file, or folder ending in '/' (default: next to the checkpoint)"
    )
    args = parser.parse_args(argv)
    fmt = choose_format(args.format, args.out)
    path = export(args.ckpt, fmt, args.out)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({fmt}, {size:.1f} MB) and {path}.json (class names, preprocessing)")
    print("\nusage (pip install onnxruntime pillow numpy):" if fmt == "onnx" else "\nusage:")
    print(usage(fmt, path))


if __name__ == "__main__":
    main()
