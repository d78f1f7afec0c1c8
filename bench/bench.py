"""`make bench`: the template's costs, measured side by side in one run on this machine.

Writes `bench/results.md` (quoted by the README), `bench/results.json` and `bench/results.png`. Every
figure is measured in the run that writes the file; each row says what reproduces it. Run it on an
otherwise idle machine: this is a benchmark, not a test (nothing here asserts a speed).

    python bench/bench.py [--quick]     # --quick: fewer repeats, epochs and trials (checks the script)
    python bench/bench.py --only engines --quick   # the body's engines and import times alone
    python bench/bench.py --import-baseline <git rev>   # also `import` time of the package at that commit
"""

from __future__ import annotations

import argparse
import csv
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
import matplotlib.pyplot as plt
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import BaseFinetuning
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, DataLoader

from transfer_cases import build, config_dir
from transfer_cases.commands.train import train
from transfer_cases.features import EXTRACTIONS, Extraction, choose_backend, extract, resolve_extraction
from transfer_cases.features.batch import FeatureBatch
from transfer_cases.features.onnx_body import export_body, missing_runtime
from transfer_cases.training.recipe import phase_data
from transfer_cases.utils.config import instantiate_clean, instantiate_list

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = ("callbacks.progress_bar.refresh_rate=0", "callbacks.model_summary=null")
CPU = torch.device("cpu")


# -- helpers ------------------------------------------------------------------------------------------
def compose_cfg(*overrides: str, out: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", *overrides])


def cli(*args: str, cwd: Path) -> float:
    """Wall time of a console script, run as a user runs it."""
    start = time.perf_counter()
    run = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return time.perf_counter() - start


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def raw_image_val_acc(ckpt: Path, cwd: Path) -> float:
    """Accuracy of a checkpoint on the val images, fp32, through `transfer-eval` (what deployment sees)."""
    out = cwd / f"eval-{ckpt.parent.parent.name}"
    cli(
        "transfer-eval",
        f"ckpt_path={ckpt}",
        "split=val",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={out}",
        cwd=cwd,
    )
    with open(out / "metrics.csv") as f:
        return float(next(r for r in csv.DictReader(f) if r["class"] == "accuracy")["f1"])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# -- 1. start-up and one forward pass -----------------------------------------------------------------
def startup_seconds(repeats: int) -> float:
    """Process start plus the imports every entry point pays (Python, torch, Lightning, Hydra)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import transfer_cases.commands.train"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_seconds(code: str, repeats: int, pythonpath: Path | None = None) -> float:
    """Median wall time of a fresh interpreter running `code` (imports), the package from `pythonpath`
    when given (an older commit's `src`), else the installed one."""
    env = {**os.environ, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_times(tmp: Path, repeats: int, baseline: str | None) -> dict[str, float]:
    """What `import transfer_cases.commands.train` costs beyond the libraries under it (torch,
    Lightning, Hydra, torchvision), and, with `baseline` (a git revision), the same import at that commit."""
    floor = "import torch, torchvision, lightning, hydra, omegaconf, PIL, numpy"
    result = {
        "libraries_s": import_seconds(floor, repeats),
        "train_s": import_seconds("import transfer_cases.commands.train", repeats),
    }
    if baseline:
        src = tmp / "baseline"
        src.mkdir()
        archive = subprocess.run(
            ["git", "archive", baseline, "src"], cwd=ROOT, check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        result["baseline"] = baseline
        result["baseline_train_s"] = import_seconds(
            "import transfer_cases.commands.train", repeats, src / "src"
        )
    return result


def onnxruntime_numerics() -> Extraction | None:
    """The onnxruntime pass (fp32), or None when onnxruntime is not installed."""
    return None if missing_runtime() else resolve_extraction("fp32", CPU, backend="onnxruntime")


def default_data(tmp: Path, name: str) -> tuple[Any, Any, int]:
    """The default job's module, its images (train through the eval transform, then val) and its
    data-loader workers."""
    module, dm = build(compose_cfg("cache.enabled=false", out=tmp / name))
    dm.setup("fit")
    train = type(dm.train_dataset)(dm.train_dataset.source, dm.train_dataset.indices, dm.predict_transform())
    return module, ConcatDataset([train, dm.val_dataset]), dm.num_workers


def cache_overrides(name: str) -> tuple[str, ...]:
    """The settings that make `transfer-train` extract with the pass `name` of `forward_pass_seconds`."""
    if name.startswith("onnxruntime"):
        return ("cache.backend=onnxruntime", "cache.extraction=fp32")
    return ("cache.backend=torch", f"cache.extraction={name}")


def forward_pass_seconds(tmp: Path, only: str | None = None) -> dict[str, dict[str, float]]:
    """One eval forward pass of the default job's frozen body over all its images (train + val), per
    extraction setting and engine: with the data loading a plain loop does (the default job's 2
    workers), and on tensors already in memory (the model alone). onnxruntime's one-time export of
    the body is timed apart, and done before the timed passes, as a later run finds the body kept.
    `only`: that setting alone."""
    module, data, workers = default_data(tmp, "fwd")
    batches = list(DataLoader(data, batch_size=64, num_workers=workers))
    settings = {n: EXTRACTIONS[n] for n in EXTRACTIONS if "fp16" not in n}
    ort = onnxruntime_numerics()
    result: dict[str, dict[str, float]] = {}
    if ort is not None:
        settings[ort.name] = ort
    if only is not None:
        settings = {only: settings[only]}
    if ort is not None and ort.name in settings:
        export_s, _ = timed(lambda: export_body(module.backbone.eval(), batches[0][0][:2]))
        result[ort.name] = {"export_s": export_s}
        extract(module.backbone, batches[:1], CPU, ort, models_dir=tmp / "onnx")  # export, kept: untimed
    for name, numerics in settings.items():
        loader = DataLoader(data, batch_size=64, num_workers=workers)
        run = lambda batches: extract(module.backbone, batches, CPU, numerics, models_dir=tmp / "onnx")  # noqa: B023, E731
        with_loading, _ = timed(lambda: run(loader))  # noqa: B023
        model_only, _ = timed(lambda: run(batches))  # noqa: B023
        result.setdefault(name, {}).update({"with_loading_s": with_loading, "model_only_s": model_only})
    return result


# -- 2. the body's engines side by side ---------------------------------------------------------------
def engines(
    body: torch.nn.Module, batches: list[Any], tmp: Path, rounds: int, compile_: bool
) -> dict[str, Any]:
    """Images per second of `body`'s pass over `batches` (tensors in memory: the model alone) per engine
    and setting, the median of `rounds` interleaved rounds after an untimed warm-up; each one's max abs
    difference from torch fp32's features; one-time costs (onnxruntime's export, torch.compile's and
    OpenVINO's compilation) apart. torch.compile only with `compile_`, OpenVINO only when installed."""
    body.eval()
    images = sum(len(x) for x, _ in batches)
    runners: dict[str, Callable[[list[Any]], torch.Tensor]] = {}
    setup_s: dict[str, float] = {}
    notes: dict[str, str] = {}

    def torch_runner(
        numerics: Extraction, module: torch.nn.Module = body
    ) -> Callable[[list[Any]], torch.Tensor]:
        return lambda bs: extract(module, bs, CPU, numerics, models_dir=tmp / "onnx")[0]

    for label, name in (
        ("torch fp32", "fp32"),
        ("torch fp32 channels_last", "channels_last"),
        ("torch bf16 autocast + channels_last", "bf16_channels_last"),
    ):
        runners[label] = torch_runner(EXTRACTIONS[name])
    ort = onnxruntime_numerics()
    if ort is not None:
        runners["onnxruntime fp32"] = torch_runner(ort)
    else:
        notes["onnxruntime fp32"] = "not installed"
    if compile_:
        try:
            runners["torch.compile fp32 channels_last"] = torch_runner(
                EXTRACTIONS["channels_last"], torch.compile(body)
            )
        except Exception as e:  # no compiler on the machine, an unsupported op
            notes["torch.compile fp32 channels_last"] = f"unavailable: {type(e).__name__}: {e}"[:200]
    try:
        import openvino as ov
    except ImportError:
        notes["OpenVINO fp32"] = "not installed"
    else:
        onnx_file = tmp / "openvino-body.onnx"
        onnx_file.write_bytes(export_body(body, batches[0][0][:2]))
        compiled = ov.Core().compile_model(ov.convert_model(str(onnx_file)), "CPU")
        runners["OpenVINO fp32"] = lambda bs: torch.cat(
            [torch.from_numpy(compiled(x.numpy())[0]) for x, _ in bs]
        )
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        for label, name in (
            ("torch fp32 (CUDA)", "fp32"),
            ("torch fp16 autocast + channels_last (CUDA)", "fp16_channels_last"),
        ):
            numerics = EXTRACTIONS[name]
            runners[label] = lambda bs, n=numerics: _synced(lambda: extract(body, bs, gpu, n)[0])
    for label, run in list(runners.items()):  # warm-up: exports, compilations, kernel set-up
        try:
            setup_s[label], _ = timed(lambda: run(batches[:1]))  # noqa: B023
        except Exception as e:
            notes[label] = f"failed: {type(e).__name__}: {e}"[:200]
            del runners[label]
    seconds: dict[str, list[float]] = {label: [] for label in runners}
    features: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for label, run in runners.items():
            t, features[label] = timed(lambda: run(batches))  # noqa: B023
            seconds[label].append(t)
    reference = features["torch fp32"].float()
    return {
        "images": images,
        "rows": {
            label: {
                "images_per_s": images / statistics.median(seconds[label]),
                "runs_s": seconds[label],
                "setup_s": setup_s[label],
                "max_abs_diff": float((features[label].float().cpu() - reference).abs().max()),
            }
            for label in runners
        },
        "notes": notes,
    }


def _synced(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    torch.cuda.synchronize()
    out = fn()
    torch.cuda.synchronize()
    return out


def engine_table(
    tmp: Path, rounds: int, quick: bool, timm_name: str | None, compile_: bool
) -> dict[str, Any]:
    """`engines` for the embedded MobileNetV2 over the default job's images, and for a timm body (random
    weights, nothing downloaded: its speed and agreement, not its accuracy) over the same tensors."""
    module, data, workers = default_data(tmp, "engines")
    limit = 128 if quick else len(data)
    loader = DataLoader(torch.utils.data.Subset(data, range(limit)), batch_size=64, num_workers=workers)
    batches = list(loader)
    result = {"embedded MobileNetV2": engines(module.backbone, batches, tmp, rounds, compile_)}
    if timm_name:
        try:
            body = instantiate_clean(
                {"_target_": "transfer_cases.backbones.TimmBackbone", "name": timm_name, "weights": None}
            ).build(pretrained=False)
        except Exception as e:  # timm not installed, or a model that is not a staged body
            result[f"timm {timm_name}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        else:
            body.freeze(body.depth)
            result[f"timm {timm_name} (random weights)"] = engines(body, batches, tmp, rounds, compile_)
    return result


def engine_markdown(e: dict[str, Any], imports: dict[str, float]) -> list[str]:
    """The engines table and the import-time rows, as Markdown lines."""
    lines = [
        "| body | engine and setting | images/s | × torch fp32 | max abs diff vs torch fp32 | one-time set-up |",
        "|---|---|---|---|---|---|",
    ]
    for body, res in e.items():
        if "error" in res:
            lines.append(f"| {body} | not measured: {res['error']} | | | | |")
            continue
        base = res["rows"]["torch fp32"]["images_per_s"]
        for label, row in res["rows"].items():
            lines.append(
                f"| {body} ({res['images']} images) | {label} | {row['images_per_s']:.1f} | "
                f"{row['images_per_s'] / base:.2f}× | {row['max_abs_diff']:.2e} | {row['setup_s']:.1f} s |"
            )
        lines += [f"| {body} | {label} | {note} | | | |" for label, note in res["notes"].items()]
    lines += [
        "",
        "| import | seconds |",
        "|---|---|",
        f"| `import torch, torchvision, lightning, hydra, omegaconf, PIL, numpy` (the libraries) | {imports['libraries_s']:.2f} |",
        f"| `import transfer_cases.commands.train` (now) | {imports['train_s']:.2f} |",
    ]
    if "baseline" in imports:
        lines.append(
            f"| `import transfer_cases.commands.train` at `{imports['baseline']}` | {imports['baseline_train_s']:.2f} |"
        )
    return lines


# -- 3. Lightning fit vs a plain PyTorch loop ---------------------------------------------------------
def fit_vs_plain(tmp: Path, epochs: int, pairs: int) -> dict[str, Any]:
    """Images per second of fine-tuning (large_similar): `trainer.fit` with the template's callbacks,
    logger and per-epoch checkpoints against a hand-written loop with the same model, data (2 loader
    workers), optimizer, schedule and steps (validation off in both). The clock covers the training
    itself (data setup included, model building not: that is the same code in both).

    On 2 cores the first steps of a run compete with the loader workers' start and oneDNN's kernel
    set-up, so one run varies by +-15 %: an untimed warm-up run first, then `pairs` interleaved pairs;
    the best of each (interference only slows a run down) and every run are reported."""
    overrides = ("case=large_similar", f"trainer.max_epochs={epochs}", "+trainer.limit_val_batches=0", *QUIET)

    def template() -> tuple[float, int]:
        cfg = compose_cfg(*overrides, out=tmp / "fit")
        L.seed_everything(0, verbose=False)
        module, dm = build(cfg)
        trainer = instantiate_clean(
            cfg.trainer,
            callbacks=instantiate_list(cfg.callbacks),
            logger=instantiate_list(cfg.logger) or False,
            num_sanity_val_steps=0,
        )
        seconds, _ = timed(lambda: trainer.fit(module, dm))
        return seconds, len(dm.train_dataset) * epochs

    def plain() -> tuple[float, int]:
        cfg = compose_cfg(*overrides, out=tmp / "plain")
        L.seed_everything(0, verbose=False)
        module, dm = build(cfg)
        start = time.perf_counter()
        dm.setup("fit")
        configured = module.configure_optimizers()
        optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
        loader = dm.train_dataloader()
        module.train()
        for _ in range(epochs):
            for x, y in loader:
                loss = module.loss(module(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
        return time.perf_counter() - start, len(dm.train_dataset) * epochs

    plain()  # warm-up, untimed
    rates: dict[str, list[float]] = {"template": [], "plain": []}
    for _ in range(pairs):
        for name, fn in (("plain", plain), ("template", template)):
            seconds, images = fn()
            rates[name].append(images / seconds)
    return {
        **{name: max(values) for name, values in rates.items()},
        "runs": rates,
        "epochs": epochs,
        "images_per_epoch": images // epochs,
    }


# -- 4. our frozen step vs the naive one --------------------------------------------------------------
def frozen_vs_naive(tmp: Path, steps: int) -> dict[str, float]:
    """Median seconds per training step on the same image batches (32 images, 224 px): our frozen body
    (prefix under no_grad, BatchNorm in eval mode); the naive kind, Lightning's
    `BaseFinetuning.freeze(train_bn=True)` as `BackboneFinetuning` does in its frozen phase (weights
    frozen but BatchNorm trainable, so backward runs through the whole body); our head on cached features."""
    L.seed_everything(0, verbose=False)
    ours, dm = build(compose_cfg("cache.enabled=false", out=tmp / "steps"))
    dm.setup("fit")
    batches = [b for _, b in zip(range(steps + 2), dm.train_dataloader(), strict=False)]
    naive, _ = build(compose_cfg("case=large_similar", "cache.enabled=false", out=tmp / "steps2"))
    BaseFinetuning.freeze(naive.backbone, train_bn=True)

    def step_time(
        module: Any, inputs: list[tuple[torch.Tensor, torch.Tensor]], batch_type: Any = None
    ) -> float:
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        module.train()
        times = []
        for i, (x, y) in enumerate(inputs):
            start = time.perf_counter()
            loss = module.loss(module._logits(batch_type(x, y) if batch_type else (x, y)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= 2:  # warm-up steps left out
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.no_grad():
        ours.eval()
        features = [(ours.forward_features(x), y) for x, y in batches]
    return {
        "ours": step_time(ours, batches),
        "naive": step_time(naive, batches),
        "cached": step_time(ours, features, FeatureBatch),
        "naive_trainable": sum(p.numel() for p in naive.parameters() if p.requires_grad),
        "ours_trainable": sum(p.numel() for p in ours.parameters() if p.requires_grad),
    }


# -- 5. where an Optuna trial goes --------------------------------------------------------------------
def trial_parts(tmp: Path, cache_dir: Path, repeats: int) -> dict[str, float]:
    """Median seconds, in this process on warm cached features, of what one trial of
    `hparams_search=small_similar_optuna` runs, next to the floors under it: Hydra composing the
    trial's config; `train()` (build, then `trainer.fit` of 50 head epochs with the template's
    metrics, logger, callbacks and best-checkpoint writes); the same 50 epochs (same head, features,
    batches and validation) in a bare LightningModule with no metrics, logger, callbacks or
    checkpoints; and in a plain PyTorch loop."""
    search = ("hparams_search=small_similar_optuna", *QUIET, f"paths.cache_dir={cache_dir}")
    compose_s, train_s, bare_s, plain_s = [], [], [], []
    for i in range(repeats):
        seconds, cfg = timed(lambda: compose_cfg(*search, out=tmp / f"trial{i}"))  # noqa: B023
        compose_s.append(seconds)
        train_s.append(timed(lambda: train(cfg))[0])  # noqa: B023
    module, images = build(cfg)
    dm = phase_data(cfg, module, images)  # the cached features the trials train on
    dm.setup("fit")
    epochs, lr = cfg.trainer.max_epochs, cfg.model.optimizer.lr
    head = lambda: torch.nn.Linear(module.backbone.out_features, len(module.class_names))  # noqa: E731

    class Bare(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = head()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.head(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.head(batch[0])

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=lr)

    def bare() -> None:
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(Bare(), dm.train_dataloader(), dm.val_dataloader())

    def plain() -> None:
        model = head()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
        for _ in range(epochs):
            model.train()
            for x, y in train_loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                for x, _ in val_loader:
                    model(x)

    for _ in range(repeats):
        bare_s.append(timed(bare)[0])
        plain_s.append(timed(plain)[0])
    median = statistics.median
    return {
        "compose_s": median(compose_s),
        "train_s": median(train_s),
        "bare_lightning_s": median(bare_s),
        "plain_s": median(plain_s),
        "epochs": epochs,
        "repeats": repeats,
    }


# -- the run --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, epochs and trials")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--only", choices=("all", "engines"), default="all", help="engines: that table alone")
    parser.add_argument(
        "--timm", default="convnext_atto", help="the timm body of the engines table ('' for none)"
    )
    parser.add_argument("--compile", action="store_true", help="add torch.compile to the engines table")
    parser.add_argument(
        "--import-baseline", default=None, help="git revision whose import time to measure too"
    )
    args = parser.parse_args(argv)
    head_epochs, trials = (3, 2) if args.quick else (30, 12)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    # What the default job's passes run on (cache.backend=auto over its 398 images at 224 px).
    backend, _ = choose_backend("auto", CPU, 398, 224)
    auto = resolve_extraction("auto", CPU, backend=backend).name
    r: dict[str, Any] = {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "auto_extraction_cpu": auto,
        },
        "head_epochs": head_epochs,
    }
    step = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731
    step("import times")
    r["imports"] = import_times(tmp, 1 if args.quick else 5, args.import_baseline)
    step("the body's engines side by side")
    r["engines"] = engine_table(tmp, 1 if args.quick else 3, args.quick, args.timm or None, args.compile)
    if args.only == "engines":
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engines.json").write_text(json.dumps(r, indent=2) + "\n")
        text = "\n".join(["# make bench: engines", "", *engine_markdown(r["engines"], r["imports"]), ""])
        (args.out / "engines.md").write_text(text)
        shutil.rmtree(tmp, ignore_errors=True)
        print(text)
        return
    step("start-up")
    r["startup_s"] = startup_seconds(1 if args.quick else 3)
    step("one forward pass per extraction setting")
    r["forward"] = forward_pass_seconds(tmp)

    # The default job against its floor, interleaved: one noisy run of either would decide the ratio.
    rounds = 1 if args.quick else 3
    step(f"default job, cold cache, {rounds} rounds interleaved with its floor; then warm cache")
    fastest = min(r["forward"], key=lambda name: r["forward"][name]["with_loading_s"])
    starts, passes, colds = [], [], []
    for i in range(rounds):
        starts.append(startup_seconds(1))
        passes.append(forward_pass_seconds(tmp / f"floor{i}", only=fastest)[fastest]["with_loading_s"])
        job = ("transfer-train", *QUIET, f"paths.cache_dir={tmp / f'cache{i}'}")
        colds.append(cli(*job, f"hydra.run.dir={tmp / f'cold{i}'}", cwd=tmp))
    warm = cli(
        "transfer-train",
        *QUIET,
        f"paths.cache_dir={tmp / 'cache0'}",
        f"hydra.run.dir={tmp / 'warm'}",
        cwd=tmp,
    )
    # The floor: start-up plus the fastest pass measured (a cold cache also exports the body once).
    floor = statistics.median(starts) + statistics.median(passes)
    cold = statistics.median(colds)
    r["default_job"] = {
        "cold_s": cold,
        "cold_runs_s": colds,
        "startup_runs_s": starts,
        "pass_runs_s": passes,
        "warm_s": warm,
        "val_acc": summary(tmp / "cold0")["metrics"]["val/acc"],
        "epochs": summary(tmp / "cold0")["epochs"],
        "floor_s": floor,
        "fastest": fastest,
        "ratio": cold / floor,
    }

    step(f"{head_epochs} head epochs: uncached, then cached with each extraction setting")
    heads = {}
    runs = [("uncached", ("cache.enabled=false",))]
    runs += [(f"cached, {e}", (*cache_overrides(e), f"paths.cache_dir={tmp / e}")) for e in r["forward"]]
    for name, extra in runs:
        run_dir = tmp / name.replace(", ", "-")
        wall = cli(
            "transfer-train",
            *QUIET,
            f"trainer.max_epochs={head_epochs}",
            *extra,
            f"hydra.run.dir={run_dir}",
            cwd=tmp,
        )
        s = summary(run_dir)
        heads[name] = {
            "wall_s": wall,
            "fit_s": s["train_time_s"],
            "val_acc_logged": s["metrics"]["val/acc"],
            "val_acc_raw": raw_image_val_acc(run_dir / "checkpoints" / "last.ckpt", tmp),
        }
        step(f"  {name}: {wall:.1f} s, val acc {heads[name]['val_acc_raw']:.3f}")
    r["heads"] = heads

    step("trainer.fit vs a plain loop (fine-tuning)")
    r["fit_vs_plain"] = fit_vs_plain(tmp, 1 if args.quick else 2, 1 if args.quick else 3)
    step("frozen vs naive training step")
    r["steps"] = frozen_vs_naive(tmp, 5 if args.quick else 20)

    step(f"Optuna search, {trials} trials, fully frozen case")
    optuna = cli(
        "transfer-train",
        "hparams_search=small_similar_optuna",
        f"hydra.sweeper.n_trials={trials}",
        *QUIET,
        f"paths.cache_dir={tmp / 'optuna-cache'}",
        f"hydra.sweep.dir={tmp / 'optuna'}",
        cwd=tmp,
    )
    r["optuna"] = {"trials": trials, "wall_s": optuna}
    step("where a trial goes: compose, train(), bare Lightning, plain loop")
    r["trial"] = trial_parts(tmp, tmp / "cache", 2 if args.quick else 5)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(r))
    figure(r, args.out / "results.png")
    shutil.rmtree(tmp, ignore_errors=True)
    print((args.out / "results.md").read_text())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rates(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def markdown(r: dict[str, Any]) -> str:
    m, d, h, f, s, o = r["machine"], r["default_job"], r["heads"], r["fit_vs_plain"], r["steps"], r["optuna"]
    t = r["trial"]
    auto, epochs = m["auto_extraction_cpu"], r["head_epochs"]
    fwd = r["forward"]
    unc = h["uncached"]
    rows = [
        f"| start-up: process + imports | {r['startup_s']:.1f} s | | `python -c 'import transfer_cases.commands.train'` |",
        *(
            f"| one forward pass of the frozen body, 398 images, `{name}` | {v['with_loading_s']:.1f} s "
            f"({v['model_only_s']:.1f} s model only) | {fwd['fp32']['with_loading_s'] / v['with_loading_s']:.2f}× fp32 | "
            f"`{' '.join(cache_overrides(name))}` |"
            for name, v in fwd.items()
        ),
        *(
            f"| one-time export of the body for onnxruntime (kept in `cache.dir/onnx`) | {v['export_s']:.1f} s | | "
            "first `cache.backend=onnxruntime` run |"
            for v in fwd.values()
            if "export_s" in v
        ),
        f"| **default job**, cold cache (val acc {d['val_acc']:.3f}, {d['epochs']} head epochs; median of "
        f"{len(d['cold_runs_s'])} runs interleaved with its floor's) | {d['cold_s']:.1f} s | "
        f"**{d['ratio']:.2f}×** start-up + one `{d['fastest']}` pass ({d['floor_s']:.1f} s) | `make train` |",
        f"| **default job**, warm cache | {d['warm_s']:.1f} s | start-up + {d['warm_s'] - r['startup_s']:.1f} s | "
        "`make train` again |",
        f"| {epochs} head epochs on images (val acc {unc['val_acc_raw']:.3f}) | {unc['wall_s']:.1f} s | | "
        f"`transfer-train trainer.max_epochs={epochs} cache.enabled=false` |",
        *(
            f"| {epochs} head epochs on features, {name.split(', ')[1]} (val acc {v['val_acc_raw']:.3f}) | "
            f"{v['wall_s']:.1f} s | **{unc['wall_s'] / v['wall_s']:.1f}×** faster; val acc "
            f"{100 * (v['val_acc_raw'] - unc['val_acc_raw']):+.1f} points | "
            f"`transfer-train trainer.max_epochs={epochs} {' '.join(cache_overrides(name.split(', ')[1]))}` |"
            for name, v in h.items()
            if name != "uncached"
        ),
        f"| fine-tuning (large_similar), plain PyTorch loop, best of {len(f['runs']['plain'])} "
        f"({_rates(f['runs']['plain'])} img/s) | {f['plain']:.1f} img/s | | bench `fit_vs_plain` |",
        f"| fine-tuning (large_similar), template `trainer.fit`, best of {len(f['runs']['template'])} "
        f"({_rates(f['runs']['template'])} img/s) | {f['template']:.1f} img/s | "
        f"**{f['template'] / f['plain']:.3f}×** the plain loop | `transfer-train case=large_similar` |",
        f"| training step, naive frozen body (backward through it; {s['naive_trainable']:,} trainable) | "
        f"{1000 * s['naive']:.0f} ms | | `BaseFinetuning.freeze(train_bn=True)` |",
        f"| training step, our frozen body (no_grad prefix, eval BatchNorm; {s['ours_trainable']:,} trainable) | "
        f"{1000 * s['ours']:.0f} ms | **{s['naive'] / s['ours']:.2f}×** faster than naive | `cache.enabled=false` |",
        f"| training step, our head on cached features | {1000 * s['cached']:.2f} ms | "
        f"**{s['naive'] / s['cached']:.0f}×** faster than naive | default |",
        f"| Optuna, {o['trials']} trials of small_similar (50 head epochs each) | {o['wall_s']:.1f} s | "
        f"start-up + one pass + {o['wall_s'] - d['floor_s']:.1f} s | `transfer-train hparams_search=small_similar_optuna` |",
        f"| one trial, in this process, warm features: Hydra composing its config | {t['compose_s']:.2f} s | | "
        "bench `trial_parts` |",
        f"| one trial's `train()`: build, then {t['epochs']} head epochs with the template's metrics, logger, "
        f"callbacks, best checkpoints | {t['train_s']:.2f} s | | bench `trial_parts` |",
        f"| the same {t['epochs']} head epochs in a bare LightningModule (no metrics, logger, callbacks, "
        f"checkpoints) | {t['bare_lightning_s']:.2f} s | trial `train()` = **{t['train_s'] / t['bare_lightning_s']:.1f}×** "
        "bare Lightning | bench `trial_parts` |",
        f"| the same {t['epochs']} head epochs in a plain PyTorch loop | {t['plain_s']:.2f} s | bare Lightning = "
        f"**{t['bare_lightning_s'] / t['plain_s']:.1f}×** the plain loop | bench `trial_parts` |",
    ]
    best = h[f"cached, {auto}"]
    return "\n".join(
        [
            "# make bench",
            "",
            f"Machine: {m['cores']} CPU cores ({m['cpu']}), no GPU; torch {m['torch']} with {m['torch_threads']} "
            f"threads, Python {m['python']}. `cache.backend=auto` with `cache.extraction=auto` chose `{auto}` here. The data is the default "
            "job's (embedded hymenoptera, 245 train + 153 val images, 224 px; embedded MobileNetV2). Every figure "
            "was measured in the same run of `make bench` (`python bench/bench.py`); val acc is the final "
            "checkpoint's accuracy on the val images in fp32 (`transfer-eval`), as a deployed model sees them.",
            "",
            "| what | measured | ratio | reproduce |",
            "|---|---|---|---|",
            *rows,
            "",
            "The frozen body's pass per engine (tensors in memory, median of interleaved rounds), and the "
            "imports every command pays:",
            "",
            *engine_markdown(r["engines"], r["imports"]),
            "",
            f"Cached head (`{auto}` features) after {epochs} epochs: val acc {best['val_acc_raw']:.3f} against "
            f"{unc['val_acc_raw']:.3f} trained on images ({100 * (best['val_acc_raw'] - unc['val_acc_raw']):+.1f} "
            f"points), {unc['wall_s'] / best['wall_s']:.1f}× faster as a whole job "
            f"({unc['fit_s'] / best['fit_s']:.1f}× in `trainer.fit`, extraction included).",
            "",
        ]
    )


def figure(r: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    labels = [
        "start-up",
        *(f"forward pass\n{k}" for k in r["forward"]),
        "default job\ncold cache",
        "default job\nwarm cache",
    ]
    values = [
        r["startup_s"],
        *(v["with_loading_s"] for v in r["forward"].values()),
        r["default_job"]["cold_s"],
        r["default_job"]["warm_s"],
    ]
    colors = ["grey", *["tab:blue"] * len(r["forward"]), "tab:green", "tab:olive"]
    ax.barh(labels, values, color=colors)
    ax.axvline(r["default_job"]["floor_s"], color="black", linestyle=":", label="start-up + one auto pass")
    ax.set_xlabel("seconds")
    ax.set_title("the default job against its floor")
    ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax = axes[1]
    names = list(r["heads"])
    ax.barh(
        names, [r["heads"][n]["wall_s"] for n in names], color=["tab:red", *["tab:orange"] * (len(names) - 1)]
    )
    for i, n in enumerate(names):
        ax.text(
            r["heads"][n]["wall_s"],
            i,
            f" val acc {r['heads'][n]['val_acc_raw']:.3f}",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("seconds (whole job)")
    ax.set_title(f"{r['head_epochs']} head epochs: images vs cached features")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
