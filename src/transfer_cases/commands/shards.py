"""`transfer-shards`: write a data set (your class folders, CIFAR-10 or MNIST) into streaming shards
that `data=shards data.root=<out>` trains from, locally or after copying them to object storage."""

from __future__ import annotations

import argparse
from pathlib import Path

from transfer_cases.commands.cli import friendly_errors
from transfer_cases.data.datamodule import ClassificationDataModule
from transfer_cases.utils.errors import ConfigError

KINDS = ("imagefolder", "cifar10", "mnist")


def _module(kind: str, root: Path) -> ClassificationDataModule:
    from transfer_cases import data

    factory = {
        "imagefolder": data.ImageFolderDataModule,
        "cifar10": data.CIFAR10DataModule,
        "mnist": data.MNISTDataModule,
    }[kind]
    return factory(root=root)


@friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="transfer-shards", description=__doc__)
    parser.add_argument("source", type=Path, help="the data: a folder of class folders (or --kind's root)")
    parser.add_argument("out", type=Path, help="the shards' folder (then: data=shards data.root=OUT)")
    parser.add_argument("--kind", choices=KINDS, default="imagefolder", help="what the source is")
    parser.add_argument("--chunk-bytes", default="64MB", help="size of one shard file (default 64MB)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise ConfigError(f"{args.out} is not empty; give a new folder for the shards (or delete it)")
    from transfer_cases.data.streaming import split_sources, write_shards

    module = _module(args.kind, args.source)
    counts = write_shards(split_sources(module._load_splits()), module.classes, args.out, args.chunk_bytes)
    listing = ", ".join(f"{split} {n}" for split, n in counts.items())
    print(f"wrote {listing} images of {len(module.classes)} classes to {args.out}")


if __name__ == "__main__":
    main()
