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
from transfer_cases.commands.export_usage import usage
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
