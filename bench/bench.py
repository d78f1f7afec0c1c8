"""`make bench`: the cost of the template measured side by side in one run.

Writes `bench/results.md`, `bench/results.json` and `bench/results.png`. Every figure is measured here, in
this run, on this machine; each line of the Markdown says the command that reproduces it. Run it on an
otherwise idle machine: it is a benchmark, not a test (nothing here asserts a speed).

    python bench/bench.py [--quick]     # --quick: fewer repeats and epochs, for checking the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from lightning.pytorch.callbacks import BaseFinetuning  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader  # noqa: E402

from transfer_cases import build, config_dir  # noqa: E402
from transfer_cases.cli import instantiate_list  # noqa: E402
from transfer_cases.config import instantiate_clean  # noqa: E402
from transfer_cases.features import EXTRACTIONS, extract, resolve_extraction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = ("callbacks.progress_bar.refresh_rate=0", "callbacks.model_summary.max_depth=0")


# -- helpers ------------------------------------------------------------------------------------------
def compose_cfg(*overrides: str, out: Path) -> DictConfig:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", *overrides])
    return cfg


def cli(args: Sequence[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time of a console script run as a user runs it."""
    start = time.perf_counter()
    run = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return wall, run


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# -- 1. start-up and one forward pass -----------------------------------------------------------------
def startup_seconds(repeats: int) -> float:
    """Process start plus the imports every entry point pays (Python, torch, Lightning, Hydra)."""
    code = "import transfer_cases.train"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_pass_seconds(tmp: Path, extraction: str) -> float:
    """One eval forward pass of the default job's frozen body over all its images (train + val),
    data loading included, as a plain loop would do it."""
    cfg = compose_cfg("cache.enabled=false", out=tmp / "fwd")
    module, dm = build(cfg)
    dm.setup("fit")
    clean_train = type(dm.train_dataset)(dm.train_dataset.source, dm.train_dataset.indices, dm.predict_transform())
    data = ConcatDataset([clean_train, dm.val_dataset])
    loader = DataLoader(data, batch_size=64, num_workers=dm.num_workers)
    numerics = resolve_extraction(extraction, torch.device("cpu"))
    seconds, _ = timed(lambda: extract(module.backbone, loader, torch.device("cpu"), numerics, total=len(data)))
    return seconds


# -- 3. Lightning fit vs a plain PyTorch loop ---------------------------------------------------------
def fit_vs_plain(tmp: Path, epochs: int) -> dict[str, float]:
    """Same model, data, optimizer, schedule and steps: `trainer.fit` with the template's callbacks and
    logger (validation off in both) against a hand-written loop."""
    overrides = ("case=large_similar", f"trainer.max_epochs={epochs}", "trainer.limit_val_batches=0", *QUIET)

    def template() -> int:
        cfg = compose_cfg(*overrides, out=tmp / "fit")
        L.seed_everything(0, verbose=False)
        module, dm = build(cfg)
        trainer = instantiate_clean(
            cfg.trainer,
            callbacks=instantiate_list(cfg.callbacks),
            logger=instantiate_list(cfg.logger) or False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, dm)
        return len(dm.train_dataset) * epochs

    def plain() -> int:
        cfg = compose_cfg(*overrides, out=tmp / "plain")
        L.seed_everything(0, verbose=False)
        module, dm = build(cfg)
        dm.setup("fit")
        opt = module.configure_optimizers()
        optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
        loader = dm.train_dataloader()
        module.train()
        for _ in range(epochs):
            for x, y in loader:
                loss = module.loss(module(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
        return len(dm.train_dataset) * epochs

    rates: dict[str, list[float]] = {"template": [], "plain": []}
    for _ in range(2):  # interleaved, so drift in the machine's speed hits both alike
        for name, fn in (("plain", plain), ("template", template)):
            seconds, images = timed(fn)
            rates[name].append(images / seconds)
    return {name: max(values) for name, values in rates.items()}


# -- 4. our frozen step vs the naive one --------------------------------------------------------------
def frozen_vs_naive(tmp: Path, steps: int) -> dict[str, float]:
    """Seconds per training step on the same image batches: our frozen body (no_grad prefix, eval-mode
    BatchNorm), the naive kind (Lightning's `BaseFinetuning.freeze(train_bn=True)`: weights frozen but
    BatchNorm trainable, so backward runs through the whole body), and our head on cached features."""
    cfg = compose_cfg("cache.enabled=false", out=tmp / "steps")
    L.seed_everything(0, verbose=False)
    ours, dm = build(cfg)
    dm.setup("fit")
    batches = [b for _, b in zip(range(steps + 2), dm.train_dataloader(), strict=False)]
    naive, _ = build(compose_cfg("case=large_similar", "cache.enabled=false", out=tmp / "steps2"))
    BaseFinetuning.freeze(naive.backbone, train_bn=True)

    def step_time(module: Any, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        module.train()
        times = []
        for i, (x, y) in enumerate(inputs):
            start = time.perf_counter()
            loss = module.loss(module._logits(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= 2:  # warm-up steps excluded
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.no_grad():
        ours.eval()
        feats = [(ours.forward_features(x), y) for x, y in batches]
    return {
        "ours": step_time(ours, batches),
        "naive": step_time(naive, batches),
        "cached": step_time(ours, feats),
        "naive_trainable": sum(p.numel() for p in naive.parameters() if p.requires_grad),
    }


# -- the report -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and epochs (checks the script)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args(argv)
    head_epochs = 3 if args.quick else 30
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    cache = tmp / "cache"
    r: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "auto_extraction_cpu": resolve_extraction("auto", torch.device("cpu")).name,
        }
    }
    print("start-up ...", flush=True)
    r["startup_s"] = startup_seconds(1 if args.quick else 3)
    print("one forward pass per extraction setting ...", flush=True)
    r["forward_s"] = {name: forward_pass_seconds(tmp, name) for name in EXTRACTIONS if "fp16" not in name}
    auto = r["machine"]["auto_extraction_cpu"]

    print("default job, cold and warm cache ...", flush=True)
    job = ["transfer-train", *QUIET, f"paths.cache_dir={cache}"]
    cold, _ = cli([*job, f"hydra.run.dir={tmp / 'cold'}"], cwd=tmp)
    warm, _ = cli([*job, f"hydra.run.dir={tmp / 'warm'}"], cwd=tmp)
    r["default_job"] = {
        "cold_s": cold,
        "warm_s": warm,
        "val_acc": summary(tmp / "cold")["metrics"]["val/acc"],
        "epochs": summary(tmp / "cold")["epochs"],
        "ratio": cold / (r["startup_s"] + r["forward_s"][auto]),
    }

    print(f"{head_epochs} head epochs, cached vs uncached, and each extraction setting ...", flush=True)
    heads = {}
    for name, extra in (
        ("uncached", ["cache.enabled=false"]),
        *((f"cached {e}", [f"cache.extraction={e}", f"paths.cache_dir={tmp / e}"]) for e in r["forward_s"]),
    ):
        wall, _ = cli(
            ["transfer-train", *QUIET, f"trainer.max_epochs={head_epochs}", *extra, f"hydra.run.dir={tmp / name}"],
            cwd=tmp,
        )
        s = summary(tmp / name)
        heads[name] = {"wall_s": wall, "fit_s": s["train_time_s"], "val_acc": s["metrics"]["val/acc"]}
    r["heads"] = heads

    print("trainer.fit vs a plain loop (fine-tuning) ...", flush=True)
    r["fit_vs_plain"] = fit_vs_plain(tmp, 1 if args.quick else 2)
    print("frozen vs naive step ...", flush=True)
    r["steps"] = frozen_vs_naive(tmp, 5 if args.quick else 20)

    print("Optuna search on cached features ...", flush=True)
    trials = 3 if args.quick else 12
    optuna_wall, _ = cli(
        [
            "transfer-train",
            "hparams_search=small_similar_optuna",
            f"hydra.sweeper.n_trials={trials}",
            *QUIET,
            f"paths.cache_dir={tmp / 'optuna-cache'}",
            f"hydra.sweep.dir={tmp / 'optuna'}",
        ],
        cwd=tmp,
    )
    r["optuna"] = {"trials": trials, "wall_s": optuna_wall}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(r, head_epochs))
    figure(r, args.out / "results.png")
    shutil.rmtree(tmp, ignore_errors=True)
    print((args.out / "results.md").read_text())


def markdown(r: dict[str, Any], head_epochs: int) -> str:
    m, d, h, f, s, o = r["machine"], r["default_job"], r["heads"], r["fit_vs_plain"], r["steps"], r["optuna"]
    auto = m["auto_extraction_cpu"]
    base = r["startup_s"] + r["forward_s"][auto]
    best_cached = h[f"cached {auto}"]
    lines = [
        "# make bench",
        "",
        f"Machine: {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']} with {m['torch_threads']} threads, "
        f"Python {m['python']}; no GPU. Extraction setting chosen by `cache.extraction=auto` here: `{auto}`. "
        "Every figure below was measured in the same run of `make bench` (`python bench/bench.py`).",
        "",
        "| what | measured | ratio | reproduce |",
        "|---|---|---|---|",
        f"| start-up (process + imports) | {r['startup_s']:.1f} s | | "
        "`python -c 'import transfer_cases.train'` |",
        *(
            f"| one forward pass, frozen body, 398 images, `{name}` | {sec:.1f} s | "
            f"{r['forward_s']['fp32'] / sec:.2f}× fp32 speed | bench `forward_pass_seconds` |"
            for name, sec in r["forward_s"].items()
        ),
        f"| default job, cold cache (val acc {d['val_acc']:.3f}, {d['epochs']} epochs) | {d['cold_s']:.1f} s | "
        f"**{d['ratio']:.2f}×** (start-up + one `{auto}` pass = {base:.1f} s) | `make train` |",
        f"| default job, warm cache | {d['warm_s']:.1f} s | start-up + {d['warm_s'] - r['startup_s']:.1f} s | "
        "`make train` again |",
        f"| {head_epochs} head epochs, uncached (val acc {h['uncached']['val_acc']:.3f}) | "
        f"{h['uncached']['wall_s']:.1f} s | | `transfer-train trainer.max_epochs={head_epochs} cache.enabled=false` |",
        *(
            f"| {head_epochs} head epochs, {name} (val acc {v['val_acc']:.3f}) | {v['wall_s']:.1f} s | "
            f"**{h['uncached']['wall_s'] / v['wall_s']:.1f}×** faster, val acc "
            f"{100 * (v['val_acc'] - h['uncached']['val_acc']):+.1f} points | "
            f"`transfer-train trainer.max_epochs={head_epochs} cache.extraction={name.split()[1]}` |"
            for name, v in h.items()
            if name != "uncached"
        ),
        f"| fine-tuning throughput, plain PyTorch loop | {f['plain']:.1f} img/s | | bench `fit_vs_plain` |",
        f"| fine-tuning throughput, template `trainer.fit` | {f['template']:.1f} img/s | "
        f"**{f['template'] / f['plain']:.3f}×** the plain loop | `transfer-train case=large_similar` |",
        f"| step, naive frozen body (backward through it, BN trainable: {s['naive_trainable']:,} params) | "
        f"{1000 * s['naive']:.0f} ms | | `BaseFinetuning.freeze(train_bn=True)` |",
        f"| step, our frozen body (no_grad prefix, eval BN) | {1000 * s['ours']:.0f} ms | "
        f"**{s['naive'] / s['ours']:.2f}×** faster than naive | `cache.enabled=false` |",
        f"| step, our head on cached features | {1000 * s['cached']:.2f} ms | "
        f"**{s['naive'] / s['cached']:.0f}×** faster than naive | default |",
        f"| Optuna, {o['trials']} trials, fully frozen case | {o['wall_s']:.1f} s | "
        f"one pass + {o['wall_s'] - r['forward_s'][auto] - r['startup_s']:.1f} s after start-up | "
        "`transfer-train hparams_search=small_similar_optuna` |",
        "",
        f"The cached head (`{auto}` features) reached val acc {best_cached['val_acc']:.3f} against "
        f"{h['uncached']['val_acc']:.3f} uncached after {head_epochs} epochs.",
        "",
    ]
    return "\n".join(lines)


def figure(r: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    labels = ["start-up", *(f"pass {k}" for k in r["forward_s"]), "default job\n(cold)", "default job\n(warm)"]
    values = [r["startup_s"], *r["forward_s"].values(), r["default_job"]["cold_s"], r["default_job"]["warm_s"]]
    ax.barh(labels, values, color=["grey", *["tab:blue"] * len(r["forward_s"]), "tab:green", "tab:olive"])
    ax.set_xlabel("seconds")
    ax.set_title("default job vs its floor")
    ax = axes[1]
    names = list(r["heads"])
    ax.barh(names, [r["heads"][n]["wall_s"] for n in names], color="tab:orange")
    for i, n in enumerate(names):
        ax.text(r["heads"][n]["wall_s"], i, f" val {r['heads'][n]['val_acc']:.3f}", va="center")
    ax.set_xlabel("seconds (whole job)")
    ax.set_title("head training, cached vs uncached")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
