"""`transfer-predict CKPT IMAGES [--out predictions.csv]`: classify a folder of images into a CSV."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from transfer_cases.checkpoint import load_module
from transfer_cases.cli import friendly_errors
from transfer_cases.data.imagefolder import is_image_file
from transfer_cases.data.sources import open_image
from transfer_cases.data.transforms import eval_transform
from transfer_cases.errors import DataError


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


@torch.inference_mode()
def predict(ckpt: str | Path, target: str | Path, batch_size: int = 32) -> list[dict[str, object]]:
    """One row per image: `file`, predicted `class` and its `probability`, preprocessed as in validation."""
    module = load_module(ckpt)
    transform = eval_transform(module.preprocess)
    images = list_images(Path(target))
    rows: list[dict[str, object]] = []
    with tqdm(total=len(images), desc="predict", unit="img", disable=len(images) < 2 * batch_size) as bar:
        for batch in _batches(images, batch_size):
            x = torch.stack([transform(open_image(p, str(p))) for p in batch])
            probs = module(x).softmax(dim=1)
            conf, idx = probs.max(dim=1)
            for path, c, i in zip(batch, conf.tolist(), idx.tolist(), strict=True):
                rows.append({"file": str(path), "class": module.class_names[i], "probability": round(c, 6)})
            bar.update(len(batch))
    return rows


@friendly_errors
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="transfer-predict", description=__doc__)
    parser.add_argument("ckpt", type=Path, help="checkpoint written by transfer-train")
    parser.add_argument("images", type=Path, help="an image or a folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="CSV file to write (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    rows = predict(args.ckpt, args.images, args.batch_size)
    out = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115 - stdout is not ours to close
    try:
        writer = csv.DictWriter(out, fieldnames=["file", "class", "probability"])
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if args.out:
            out.close()
            print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
