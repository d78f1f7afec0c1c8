"""`transfer-predict CKPT IMAGES [--out predictions.csv]`: classify a folder of images into a CSV.

Nothing finished is lost: the output location is checked before any work, rows are written batch
by batch (an interruption or a full disk keeps the whole batches finished, never a row cut mid-line),
and an unreadable image gets a row with its `error` instead of ending the run; every bad file is named
at the end. File names that are not valid UTF-8 are written as their original bytes.

`--backend` chooses the engine of the body (`features.backend`): `auto` runs it on onnxruntime on a
CPU when installed and the folder is work enough to repay the body's one-time export (kept in
`--cache-dir`, shared with training's feature cache), else on torch as `transfer-eval` does; the head
always runs on torch. A body onnxruntime cannot run falls back to torch with one warning.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from transfer_cases.commands.cli import friendly_errors
from transfer_cases.data.imagefolder import is_image_file
from transfer_cases.data.sources import open_image
from transfer_cases.data.transforms import eval_transform
from transfer_cases.features.backend import BACKENDS, check_backend, choose_backend
from transfer_cases.features.cached import MODELS_DIR
from transfer_cases.training.checkpoint import load_module
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.atomic import atomic_pieces
from transfer_cases.utils.errors import ConfigError, DataError, OutputError
from transfer_cases.utils.folders import check_writable_dir

log = logging.getLogger(__name__)
FIELDS = ("file", "class", "probability", "error")
DEFAULT_CACHE_DIR = Path(".cache/features")  # training's default cache.dir (paths.cache_dir=.cache)


def list_images(target: Path) -> list[Path]:
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise DataError(f"no such file or folder: {target}")
    images = sorted(p for p in target.rglob("*") if is_image_file(p))
    if not images:
        raise DataError(f"no images found under {target}")
    return images


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"--batch-size must be a whole number >= 1, got {batch_size!r}; e.g. --batch-size 32"
        )
    return batch_size


def body_runner(
    module: TransferModule, images: int, backend: str = "auto", cache_dir: str | Path = DEFAULT_CACHE_DIR
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's body as `backend` runs it for `images` images: images -> pooled features.

    On onnxruntime, a body that cannot be exported or run falls back to torch at the first batch."""
    chosen, why = choose_backend(
        backend, torch.device("cpu"), images, module.preprocess.crop_size, "--backend"
    )
    log.info("predict: body on %s (%s)", chosen, why)
    if chosen == "torch":
        return module.forward_features
    from transfer_cases.features.onnx_body import BackendUnavailable, OnnxBody

    body = OnnxBody(module.backbone, Path(cache_dir).expanduser() / MODELS_DIR)
    state = {"run": body}

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            return state["run"](x)
        except BackendUnavailable as e:
            log.warning("onnxruntime backend: %s; running the body on torch", e)
            state["run"] = module.forward_features
            return module.forward_features(x)

    return run


@torch.inference_mode()
def iter_predictions(
    module: TransferModule,
    images: Sequence[Path],
    batch_size: int = 32,
    backend: str = "auto",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
) -> Iterator[list[dict[str, object]]]:
    """Rows batch by batch: `file`, predicted `class`, its `probability`, and `error` ('' when fine).

    An image that cannot be read gets a row with empty class and probability and the reason in
    `error`; the others are predicted as usual (preprocessed as in validation), the body on
    `backend` (see `body_runner`).
    """
    check_batch_size(batch_size)
    features = body_runner(module, len(images), backend, cache_dir)
    transform = eval_transform(module.preprocess)
    quiet = True if len(images) < 2 * batch_size else None  # None: a bar on a terminal only, not in logs
    with tqdm(total=len(images), desc="predict", unit="img", disable=quiet) as bar:
        for batch in _batches(images, batch_size):
            rows: dict[Path, dict[str, object]] = {}
            tensors, readable = [], []
            for path in batch:
                try:
                    tensors.append(transform(open_image(path, str(path))))
                    readable.append(path)
                except (DataError, OSError) as e:
                    rows[path] = {"file": str(path), "class": "", "probability": "", "error": str(e)}
            if tensors:
                logits = module.forward_head(features(torch.stack(tensors)))
                conf, idx = logits.softmax(dim=1).max(dim=1)
                for path, c, i in zip(readable, conf.tolist(), idx.tolist(), strict=True):
                    rows[path] = {
                        "file": str(path),
                        "class": module.class_names[i],
                        "probability": round(c, 6),
                        "error": "",
                    }
            bar.update(len(batch))
            yield [rows[p] for p in batch]


def predict(
    ckpt: str | Path,
    target: str | Path,
    batch_size: int = 32,
    backend: str = "auto",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
) -> list[dict[str, object]]:
    """One row per image (see `iter_predictions`), in file order."""
    check_batch_size(batch_size)
    module, images = load_module(ckpt), list_images(Path(target))
    return [row for rows in iter_predictions(module, images, batch_size, backend, cache_dir) for row in rows]


def check_output(out: Path | None) -> None:
    """Before any work: a missing folder is created; a folder given as the file, or a location that
    cannot be written, is one clear message."""
    if out is None:
        return
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name, e.g. --out {out / 'predictions.csv'}")
    check_writable_dir(out.parent, "--out folder")


def write_predictions(
    rows_by_batch: Iterator[list[dict[str, object]]], commit: Callable[[str], None]
) -> list[str]:
    """Write rows as they come, each batch as one piece (`commit`), so an interruption keeps the
    whole batches finished; returns the files that could not be read, with the reason."""
    failed: list[str] = []
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    for rows in rows_by_batch:
        writer.writerows(rows)
        commit(buffer.getvalue())
        buffer.seek(0)
        buffer.truncate()
        failed += [f"{r['file']}: {r['error']}" for r in rows if r["error"]]
    if buffer.getvalue():
        commit(buffer.getvalue())  # the header of an empty run
    return failed


def _stdout_commit(text: str) -> None:
    """A batch to standard output, with surrogate-escaped names as their original bytes."""
    binary = getattr(sys.stdout, "buffer", None)
    if binary is None:  # a text-only stream (a notebook's): the bytes that are not UTF-8 escaped
        sys.stdout.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
        return
    sys.stdout.flush()
    binary.write(text.encode("utf-8", "surrogateescape"))
    binary.flush()


@friendly_errors
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="transfer-predict", description=__doc__)
    parser.add_argument("ckpt", type=Path, help="checkpoint written by transfer-train")
    parser.add_argument("images", type=Path, help="an image or a folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="CSV file to write (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="the body engine: auto (onnxruntime on a CPU when installed and worth it), torch, onnxruntime",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help=f"where the body exported for onnxruntime is kept (default: {DEFAULT_CACHE_DIR}, as training's)",
    )
    args = parser.parse_args(argv)
    check_batch_size(args.batch_size)
    check_backend(args.backend, "--backend")
    check_output(args.out)
    module, images = load_module(args.ckpt), list_images(args.images)
    predictions = iter_predictions(module, images, args.batch_size, args.backend, args.cache_dir)
    if args.out:
        with atomic_pieces(args.out, what="predictions CSV", setting="--out") as commit:
            failed = write_predictions(predictions, commit)
    else:
        failed = write_predictions(predictions, _stdout_commit)
    if args.out:
        print(f"wrote {len(images)} rows to {args.out}", file=sys.stderr)
    if failed:
        print(
            f"warning: {len(failed)} of {len(images)} images could not be read "
            "(their rows have the reason in the error column):\n  " + "\n  ".join(failed),
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
