"""Does the data audit find planted problems? A seeded copy of the embedded ants/bees data with k
train images copied into val (half byte-exact, half resized to 50 % and re-saved as JPEG) and m train
labels flipped (the file moved to the other class folder), audited by `transfer-audit` with the
default backbone (embedded ImageNet MobileNetV2). Scored: planted duplicate pairs found, confirmed
pairs that were not planted, flipped labels among the top 2m suspects.

    python -m studies.audit_planted                       # k=10, m=12, seeds 0 1 2
    python -m studies.audit_planted --seeds 0 -k 6 -m 6 --out outputs/audit_planted
    python -m studies.audit_planted -- backbone=tiny_cnn  # overrides after -- go to transfer-audit

Not a test: each seed extracts MobileNetV2 features of ~420 images (a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transfer_cases import asset_path


def plant(src: Path, dst: Path, k: int, m: int, seed: int) -> dict[str, Any]:
    """Copy `src` (train/, val/ with class folders) to `dst` with k duplicates and m flipped labels."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("NOTICE.txt"))
    rng = np.random.default_rng(seed)
    train = sorted((dst / "train").glob("*/*"))
    chosen = rng.permutation(len(train))
    duplicates, flipped = [], []
    for n, i in enumerate(chosen[:k]):
        original = train[i]
        copy = dst / "val" / original.parent.name / f"planted_{original.stem}.jpg"
        if n % 2 == 0:
            shutil.copyfile(original, copy)  # byte-exact (same JPEG under another name)
        else:
            with Image.open(original) as image:
                small = image.convert("RGB").resize(
                    (image.width // 2, image.height // 2), Image.Resampling.BICUBIC
                )
                small.save(copy, quality=85)
        duplicates.append(
            {"train": original.name, "val": copy.name, "kind": "exact" if n % 2 == 0 else "resized"}
        )
    classes = sorted(d.name for d in (dst / "train").iterdir())
    for i in chosen[k : k + m]:  # never an image that was also copied into val
        original = train[i]
        other = classes[(classes.index(original.parent.name) + 1) % len(classes)]
        target = dst / "train" / other / original.name
        original.rename(target)
        flipped.append({"file": original.name, "given": other, "true": original.parent.name})
    return {"duplicates": duplicates, "flipped": flipped}


def score(audit: dict[str, Any], planted: dict[str, Any], m: int) -> dict[str, Any]:
    name = lambda path: Path(path).name  # noqa: E731
    found = {(name(p["file_a"]), name(p["file_b"])) for p in audit["duplicates"]["pairs"]}
    planted_pairs = {(d["train"], d["val"]) for d in planted["duplicates"]}
    hits = found & planted_pairs
    extra = sorted(found - planted_pairs)
    flipped = {f["file"] for f in planted["flipped"]}
    top = [name(s["file"]) for s in audit["label_issues"]["suspects"][: 2 * m]]
    caught = flipped & set(top)
    return {
        "duplicates_found": len(hits),
        "duplicates_planted": len(planted_pairs),
        "duplicate_recall": len(hits) / max(len(planted_pairs), 1),
        "unplanted_pairs": extra,
        "flips_in_top_2m": len(caught),
        "flips_planted": len(flipped),
        "flip_recall_top_2m": len(caught) / max(len(flipped), 1),
        "flagged": audit["label_issues"]["flagged"],
        "probe_accuracy": audit["label_issues"]["probe_accuracy"],
        "audit_s": audit.get("audit_s"),
        "total_s": audit.get("total_s"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-k", type=int, default=10, help="duplicates planted from train into val")
    parser.add_argument("-m", type=int, default=12, help="train labels flipped")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/audit_planted"))
    parser.add_argument("overrides", nargs="*", help="transfer-audit overrides (after --)")
    args = parser.parse_args(argv)
    exe = Path(sys.executable).with_name("transfer-audit")
    results = []
    for seed in args.seeds:
        data, run = args.out / f"data_seed{seed}", args.out / f"audit_seed{seed}"
        planted = plant(asset_path("hymenoptera"), data, args.k, args.m, seed)
        command = [
            str(exe),
            f"data.root={data.resolve()}",
            f"audit.max_listed={max(50, 2 * args.m)}",
            f"paths.cache_dir={(args.out / 'cache').resolve()}",
            f"hydra.run.dir={run.resolve()}",
            *args.overrides,
        ]
        subprocess.run(command, check=True)
        audit = json.loads((run / "audit.json").read_text())
        results.append({"seed": seed, **score(audit, planted, args.m), "planted": planted})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "planted"}), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    recall = np.mean([r["duplicate_recall"] for r in results])
    flips = np.mean([r["flip_recall_top_2m"] for r in results])
    extra = sum(len(r["unplanted_pairs"]) for r in results)
    print(
        f"k={args.k} m={args.m} seeds={args.seeds}: duplicates found {recall:.0%} (target >= 90 %), "
        f"confirmed pairs not planted {extra} (target 0), flips in top 2m {flips:.0%} (target >= 60 %)"
    )


if __name__ == "__main__":
    main()
