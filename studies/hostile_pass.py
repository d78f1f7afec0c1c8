"""Replay the hostile pass of issue 24 through the real commands and count the outcomes.

Each input runs as a user runs it (a fresh `transfer-*` process, tiny backbone, a temporary folder)
and is classified from its exit status and output: `clear` (exit 2, one `error:` line, no
traceback), `ok` (exit 0 where the input is valid), `traceback`, `hang` (still running after the
timeout), `partly clear` (another non-zero exit without our one line), `wrong ok` (exit 0 where the
input is invalid: the silent wrong results). Inputs whose check needs more than a command line (a
resume, a full disk, EXIF, a non-UTF-8 name, DDP) are named with the test that replays them.

    python -m studies.hostile_pass [--jobs 2] [--out outputs/hostile_pass.md]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
TINY = [
    "backbone=tiny_cnn",
    "data.image_size=32",
    "trainer.max_epochs=1",
    "callbacks.progress_bar.refresh_rate=0",
]

# (command, arguments, what a correct tool does: "error" or "ok")
TRAIN = [
    ("callbacks.last_checkpoint.min_interval_s=abc", "error"),
    ("callbacks.last_checkpoint.min_interval_s=-1", "error"),
    ("data=imagefolder", "error"),
    ("model.optimizer.lr=inf", "error"),
    ("model.optimizer.weight_decay=inf", "error"),
    ("trainer.precision=16-true case=large_similar", "error"),
    ("model.head.dropout=true", "error"),
    ("model.head.dropout=1", "error"),
    ("model.head.hidden=0 model.head.kind=mlp", "error"),
    ("+trainer.limit_train_batches=0", "error"),
    ("cache.enabled=no", "ok"),
    ("cache.enabled=off", "ok"),
    ("cache.enabled=abc", "error"),
    ("seed=-1", "error"),
    ("seed=abc", "error"),
    ("seed=99999999999", "error"),
    ("trainer.log_every_n_steps=0", "error"),
    ("trainer.check_val_every_n_epoch=0", "error"),
    ("+trainer.accumulate_grad_batches=0", "error"),
    ("optimized_metric=val/nope", "error"),
    ("data.augment=foo", "error"),
    ("data.image_size=100000", "error"),
    ("backbone.image_size=0", "error"),
    ("+model.optimizer.betas=[2,3]", "error"),
    ("trainer.devices=0", "error"),
    ("trainer.devices=-1", "error"),
    ("trainer.devices=abc", "error"),
    ("trainer.precision=foo", "error"),
    ("model.head.kind=foo", "error"),
    ("model.head.dropout=2", "error"),
    ("data.random_crop_scale=abc", "error"),
    ("data.random_crop_scale=0.5", "error"),
    ("+trainer.max_epoch=3", "error"),
    ("+data.batchsize=4", "error"),
    ("+model.foo=1", "error"),
    ("trainer.max_epoch=3", "error"),
    ("case=auto case.keep=2", "error"),
    ("backbone.widths=[]", "error"),
    ("backbone.widths=[0,0,0]", "error"),
    ("backbone.widths=abc", "error"),
    ("model.head.hidden=true model.head.kind=mlp", "error"),
    ("cache.dir=null", "error"),
    ("data=imagefolder data.root=/tmp/my images", "error"),
    ("data=imagefolder data.root=/tmp/café", "error"),
    ("paths.cache_dir=/proc/x", "error"),
    ("experiment=mnist_small_different paths.data_dir=/nonexistent", "error"),
    ("data=cifar10 paths.data_dir=/nonexistent", "error"),
    ("optimized_metric=val/loss -m hparams_search=small_similar_optuna hydra.sweeper.n_trials=1", "error"),
    ("-m hparams_search=small_similar_optuna hydra.sweeper.n_trials=0", "error"),
]
ADVISE = [
    ("advisor.small_max_per_class=-1", "error"),
    ("advisor.tie_sems=nan", "error"),
    ("advisor.seed=abc", "error"),
    ("advisor.small_max_per_class=abc", "error"),
]
# Inputs replayed by a test rather than a command line (the test fails on the code before the fix).
BY_TEST = {
    "a checkpoint trained at a data.image_size other than the weights'": "tests/test_best_metrics.py",
    "resume with a longer trainer.max_epochs (cosine T_max)": "tests/test_resume_schedule.py",
    "EXIF orientation": "tests/test_images.py",
    "content swapped with mtimes restored (cache.stamp=content)": "tests/test_features.py",
    "a failing Optuna trial": "tests/test_optuna_failures.py",
    "re-export on a full disk; torchscript on a full disk": "tests/test_export.py",
    "eval without ckpt_path; non-UTF-8 names; full disk mid-CSV": "tests/test_inputs_more.py",
    "full disk in Hydra's config save": "tests/test_atomic.py",
    "a resume whose head kind differs": "tests/test_resume.py",
    "rank 1's traceback under ddp_cpu": "tests/test_distributed.py (slow)",
    "transfer-report on metrics that are not a mapping": "tests/test_inputs_more.py",
}


def classify(proc: subprocess.CompletedProcess[str] | None, expect: str) -> str:
    if proc is None:
        return "hang"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    if "Traceback (most recent call last)" in proc.stderr:
        return "traceback"
    if proc.returncode == 0:
        return "ok" if expect == "ok" else "wrong ok"
    if proc.returncode == 2 and len(errors) == 1:
        return "clear" if expect == "error" else "refused valid input"
    return "partly clear"


def run_one(command: str, args: str, expect: str, images: Path, timeout: float) -> tuple[str, str, str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [str(BIN / command)]
        given = args.split()
        if command in ("transfer-train", "transfer-advise"):
            # The base settings first, the input last (a later override wins); `-m` before both.
            flags = [a for a in given if a.startswith("-")]
            given = [a for a in given if not a.startswith("-")]
            multirun = "-m" in flags
            root = [] if "data=" in args or "experiment=" in args else [f"data.root={images}"]
            out = f"hydra.sweep.dir={tmp}/sweep" if multirun else f"hydra.run.dir={tmp}/run"
            base = TINY if command == "transfer-train" else ["backbone=tiny_cnn", "data.image_size=32"]
            argv += [*flags, *base, *root, out, f"paths.cache_dir={tmp}/cache"]
        argv += given
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""}
        try:
            proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc = None
    outcome = classify(proc, expect)
    last = ""
    if proc is not None:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        last = next((line for line in lines if line.startswith("error: ")), lines[-1] if lines else "")
    return command, args, outcome, last[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--images", type=Path, default=None, help="an image folder with train/ and val/")
    parser.add_argument("--out", type=Path, default=Path("outputs/hostile_pass.md"))
    args = parser.parse_args()
    images = args.images or _tiny_images(Path(tempfile.mkdtemp()) / "images")
    todo = [("transfer-train", a, e) for a, e in TRAIN] + [("transfer-advise", a, e) for a, e in ADVISE]
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda t: run_one(*t, images, args.timeout), todo))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[2]] = counts.get(row[2], 0) + 1
    lines = [
        "# Hostile pass (issue 24), replayed",
        "",
        f"`python -m studies.hostile_pass`: {len(rows)} "
        "command lines; " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".",
        "",
        "| command | arguments | outcome | what the user sees |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c} | `{a}` | {o} | `{s}` |" for c, a, o, s in rows]
    lines += ["", "Replayed by tests:", ""] + [f"- {k}: `{v}`" for k, v in BY_TEST.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))


def _tiny_images(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros(3)
                base[c] = 200
                pixels = np.clip(base + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


if __name__ == "__main__":
    main()
