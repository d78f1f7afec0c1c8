"""Sweeps and shards, measured side by side: wall time of one Optuna search with 1 worker, 2 workers
and 2 workers with pruning; images/s of a full-body extraction pass from a folder and from its shards.

    python bench/sweeps.py [--quick] [--data ROOT] [--out bench/results_sweeps.json]

Part of `make bench`. Run it on an otherwise idle machine (a benchmark, nothing asserted). `--quick`
(3 trials, the tiny backbone on the embedded images) only checks that the script runs; its figures
mean nothing. Writes the Markdown tables beside the JSON (`results_sweeps.md`) and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }


def search(work: Path, name: str, workers: int, pruning: bool, overrides: list[str]) -> float:
    """Seconds from the start of the first worker to the end of the last; each worker a process."""
    args = [
        str(BIN / "transfer-train"),
        "-m",
        "hparams_search=small_similar_optuna",
        f"hydra.sweep.dir={work / name}",
        f"paths.cache_dir={work / 'cache'}",
        "callbacks.progress_bar.refresh_rate=0",
        *overrides,
    ]
    if not pruning:
        args.append("hydra.sweeper.pruner=null")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(args, cwd=work, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(workers)
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{name}: a worker failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - start


def body(backbone: str) -> Any:
    """The configured backbone's whole body, built as transfer-train builds it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from transfer_cases.utils.config import register_resolvers
    from transfer_cases.utils.paths import config_dir

    register_resolvers()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"backbone={backbone}"])
    return instantiate(cfg.backbone).build(pretrained=True).eval()


def extraction(root: str, kind: str, network: Any, image_size: int) -> float:
    """Images/s of one eval-mode pass of the whole body over the train split (the feature cache's work)."""
    import torch
    from torch.utils.data import DataLoader

    from transfer_cases.data import ImageFolderDataModule
    from transfer_cases.data.streaming import ShardDataModule

    module_cls = ShardDataModule if kind == "shards" else ImageFolderDataModule
    data = module_cls(root=root, num_workers=0, batch_size=32, image_size=image_size)
    data.setup()
    train = data.train_dataset
    train.transform = data.val_dataset.transform  # the eval view, as the cache extracts it
    start, n = time.perf_counter(), 0
    with torch.inference_mode():
        for images, _ in DataLoader(train, batch_size=32):
            network(images)
            n += len(images)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 trials, tiny backbone: checks the script")
    parser.add_argument("--data", default=None, help="an image folder (default: the embedded images)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_sweeps.json")
    args = parser.parse_args(argv)
    trials = 3 if args.quick else 12
    backbone = "tiny_cnn" if args.quick else "mobilenet_v2"
    overrides = [f"hydra.sweeper.n_trials={trials}", f"backbone={backbone}", "trainer.accelerator=cpu",
                 "data.num_workers=0"]  # fmt: skip
    if args.data:
        overrides += ["data=imagefolder", f"data.root={args.data}"]
    if args.quick:
        overrides += ["trainer.max_epochs=2", "hydra.sweeper.pruner.n_startup_trials=1"]
    results: dict[str, Any] = {"trials": trials, "backbone": backbone, "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        search(work, "warm_cache", 1, False, [*overrides, "hydra.sweeper.n_trials=1"])  # the features, once
        for name, workers, pruning in (
            ("1 worker", 1, False),
            ("2 workers", 2, False),
            ("2 workers, pruning", 2, True),
        ):
            results[name] = search(work, name.replace(" ", "_").replace(",", ""), workers, pruning, overrides)
        from transfer_cases.commands import shards
        from transfer_cases.utils.paths import asset_path

        folder = args.data or str(asset_path("hymenoptera"))
        shards.main([folder, str(work / "shards")])
        size, network = (64 if args.quick else 224), body(backbone)
        results["folder img/s"] = extraction(folder, "folder", network, size)
        results["shards img/s"] = extraction(str(work / "shards"), "shards", network, size)
    base = results["1 worker"]
    lines = [
        "# make bench: sweeps and shards",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"one torch thread per worker; `python bench/sweeps.py{' --quick' if args.quick else ''}`.",
        "",
        f"| search, {trials} trials ({backbone}) | wall s | speed-up vs 1 worker |",
        "|---|---|---|",
        *(
            f"| {n} | {results[n]:.1f} | {base / results[n]:.2f}x |"
            for n in ("1 worker", "2 workers", "2 workers, pruning")
        ),
        "",
        "| full-body extraction pass, train split | images/s |",
        "|---|---|",
        f"| folder | {results['folder img/s']:.1f} |",
        f"| shards (LitData, local) | {results['shards img/s']:.1f} |",
        "",
    ]
    print("\n".join(lines))
    args.out.with_suffix(".md").parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
