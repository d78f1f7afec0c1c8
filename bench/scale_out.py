"""Features once at scale (issue 19), measured: sharded extraction, memory-mapped rows, two nodes.

    python bench/scale_out.py [--quick] [--out bench/results_scale_out]

Writes `<out>.md` and `<out>.json`. Three measurements, each in fresh processes:

1. Extraction throughput on the same images (the embedded ants/bees train split through the embedded
   MobileNetV2 at 224 px, torch fp32 channels_last, batches of 32): 1 process with 1 thread, 2 processes
   with 1 thread each (rank r of 2 in a gloo group, as `trainer=ddp_cpu` sets the cache up), 1 process
   with 2 threads. Images/s from the first rank's start to the last rank's end, the ranks' meeting and
   the digest check included; best of `--repeats`.
2. Peak resident memory (ru_maxrss) of a head-only epoch on synthetic feature sets of 10k, 100k and 1M
   rows x 1280 (float32: 1M rows is 5.1 GB on disk): the store's hit path (digests checked, rows
   mapped), `MappedRows` and `RowSampler` as the cached-feature data module uses them, and a
   linear head trained with SGD at batch 256. The sets are written by another process first.
3. Wall time of the two-node run of `make two-nodes` (two torchrun agents on localhost, gloo, one CPU
   process each, the head-only case) against one process with the same global batch.

Run it on an otherwise idle machine: a benchmark, nothing asserted. `--quick` (tiny body, small sets)
only checks that the script works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

WIDTH, BATCH, CLASSES = 1280, 256, 10


# -- in a child process ------------------------------------------------------------------------------
def extract_role(args: argparse.Namespace) -> dict[str, Any]:
    """One rank's extraction of the split into a fresh cache folder; its start and end times."""
    torch.set_num_threads(args.threads)
    if args.world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=args.world
        )
    from hydra import compose, initialize_config_dir

    from transfer_cases import build, config_dir
    from transfer_cases.features import FeatureStore, cached_features, resolve_extraction

    quick = ["backbone=tiny_cnn", "data.samples_per_class=16"] if args.quick else ["backbone=mobilenet_v2"]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["data=hymenoptera", "data.num_workers=0", *quick, f"paths.output_dir={args.dir}"],
        )
    torch.manual_seed(0)  # the same body on every rank (the tiny body of --quick is random)
    module, images = build(cfg)
    images.setup("fit")
    dataset = images.train_dataset
    dataset.transform = images.predict_transform()
    body, cpu = module.backbone, torch.device("cpu")
    with torch.no_grad():  # warm the body up (allocator, kernels), untimed
        body.eval()(torch.stack([dataset[0][0]]))
    if args.world > 1:
        dist.barrier()
    start = time.time()
    numerics = resolve_extraction("channels_last", cpu)
    _, hit, _ = cached_features(
        FeatureStore(args.dir), body, dataset, device=cpu, numerics=numerics, batch_size=32
    )
    assert not hit
    return {"start": start, "end": time.time(), "images": len(dataset)}


def _parts(rows: int) -> dict[str, Any]:
    return {"bench": "synthetic features", "rows": rows, "width": WIDTH}


def write_features_role(args: argparse.Namespace) -> dict[str, Any]:
    """A synthetic feature set of `args.rows` rows, written through the store."""
    from transfer_cases.features import FeatureStore

    def batches(shards: list[Any]) -> Any:
        for shard in shards:
            g = torch.Generator().manual_seed(shard.start)
            for b in range(shard.start, shard.stop, 4096):
                n = min(4096, shard.stop - b)
                yield torch.randn(n, WIDTH, generator=g), torch.randint(CLASSES, (n,), generator=g)

    FeatureStore(args.dir).get_or_build_rows(_parts(args.rows), args.rows, 4096, batches)
    return {}


def head_epoch_role(args: argparse.Namespace) -> dict[str, Any]:
    """One head-only epoch over the stored set: peak resident memory before and after."""
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader

    from transfer_cases.features import FeatureStore
    from transfer_cases.features.mapped import MappedRows, RowSampler

    def never(_: Any) -> Any:
        raise RuntimeError("the set should be stored already")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    fs, hit, _ = FeatureStore(args.dir).get_or_build_rows(_parts(args.rows), args.rows, 4096, never)
    opened = time.perf_counter() - start
    rows = MappedRows([fs])
    sampler = RowSampler(rows, num_replicas=1, rank=0, seed=0)
    loader = DataLoader(rows, batch_size=BATCH, sampler=sampler, collate_fn=lambda b: b)
    head = torch.nn.Linear(WIDTH, CLASSES)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    start = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        optimizer.step()
    return {
        "hit": hit,
        "baseline_mb": round(before, 1),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "open_and_check_s": round(opened, 2),
        "epoch_s": round(time.perf_counter() - start, 2),
    }


ROLES = {"extract": extract_role, "write-features": write_features_role, "head-epoch": head_epoch_role}


# -- the parent --------------------------------------------------------------------------------------
def child(role: str, out: Path, *extra: str, threads: int = 1) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    argv = [sys.executable, __file__, "--role", role, "--result", str(out), *extra]
    return subprocess.Popen(argv, env=env, text=True)


def wait(procs: list[subprocess.Popen[str]], outs: list[Path]) -> list[dict[str, Any]]:
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"{' '.join(map(str, p.args))} failed")  # type: ignore[arg-type]
    return [json.loads(o.read_text()) for o in outs]


def extraction(tmp: Path, quick: bool, repeats: int) -> dict[str, Any]:
    setups = {
        "1 process x 1 thread": (1, 1),
        "2 processes x 1 thread": (2, 1),
        "1 process x 2 threads": (1, 2),
    }
    result = {}
    for name, (world, threads) in setups.items():
        best = None
        for i in range(repeats):
            run = tmp / f"extract-{world}-{threads}-{i}"
            run.mkdir()
            outs = [run / f"rank{r}.json" for r in range(world)]
            flags = [
                "--world",
                str(world),
                "--threads",
                str(threads),
                "--dir",
                str(run),
                "--init",
                str(run / "init"),
            ]
            procs = [
                child(
                    "extract", out, *flags, "--rank", str(r), *(["--quick"] if quick else []), threads=threads
                )
                for r, out in enumerate(outs)
            ]
            ranks = wait(procs, outs)
            seconds = max(r["end"] for r in ranks) - min(r["start"] for r in ranks)
            best = seconds if best is None else min(best, seconds)
            shutil.rmtree(run)
        result[name] = {"seconds": round(best, 2), "images_per_s": round(ranks[0]["images"] / best, 1)}
    base = result["1 process x 1 thread"]["images_per_s"]
    for row in result.values():
        row["vs_1x1"] = round(row["images_per_s"] / base, 2)
    return result


def memory(tmp: Path, sizes: list[int]) -> dict[str, Any]:
    result = {}
    for rows in sizes:
        folder = tmp / f"features-{rows}"
        wait(
            [child("write-features", tmp / "w.json", "--dir", str(folder), "--rows", str(rows))],
            [tmp / "w.json"],
        )
        out = tmp / f"head-{rows}.json"
        (result[str(rows)],) = wait(
            [child("head-epoch", out, "--dir", str(folder), "--rows", str(rows))], [out]
        )
        result[str(rows)]["file_mb"] = round(rows * WIDTH * 4 / 2**20, 1)
        shutil.rmtree(folder)
    peaks = [result[str(n)]["peak_mb"] for n in sizes]
    return {"sizes": result, "growth_mb": round(peaks[-1] - peaks[0], 1), "from_to": [sizes[0], sizes[-1]]}


def two_nodes(tmp: Path, quick: bool) -> dict[str, Any]:
    from tests.conftest import write_image_folder
    from tests.test_scale_out import finish, job, launch
    from tests.test_scale_out import two_nodes as run_two_nodes

    images = write_image_folder(tmp / "images", per_class=6 if quick else 40)
    start = time.perf_counter()
    run_two_nodes(tmp, "torchrun", job("small_similar", images))
    two = time.perf_counter() - start
    shutil.rmtree(tmp / ".cache")  # the single process extracts too
    start = time.perf_counter()
    one = [*job("small_similar", images), "data.batch_size=4", "trainer=cpu", "hydra.run.dir=one"]
    finish([launch(tmp, "transfer-train", one, {})])
    single = time.perf_counter() - start
    return {"two_nodes_s": round(two, 1), "one_process_s": round(single, 1), "ratio": round(two / single, 2)}


def report(results: dict[str, Any], command: str) -> str:
    ex, mem, nodes = results["extraction"], results["memory"], results["two_nodes"]
    lines = [
        "# Features once at scale: measured",
        "",
        f"Machine: {results['machine']}. Command: `{command}`.",
        "",
        "## Extraction throughput (same images, fresh cache each time)",
        "",
        "| setup | seconds | images/s | vs 1 process x 1 thread |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {k} | {v['seconds']} | {v['images_per_s']} | {v['vs_1x1']} |" for k, v in ex.items()),
        "",
        f"## Peak resident memory of a head-only epoch ({WIDTH}-wide float32 rows, batch {BATCH})",
        "",
        "| rows | file MB | baseline MB | peak MB | open + digest check s | epoch s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {n} | {v['file_mb']} | {v['baseline_mb']} | {v['peak_mb']} | {v['open_and_check_s']} | {v['epoch_s']} |"
            for n, v in mem["sizes"].items()
        ),
        "",
        f"Growth of the peak from {mem['from_to'][0]} to {mem['from_to'][1]} rows: {mem['growth_mb']} MB.",
        "",
        "## Two torchrun nodes on localhost vs one process (head-only, same global batch)",
        "",
        f"Two nodes: {nodes['two_nodes_s']} s; one process: {nodes['one_process_s']} s; ratio {nodes['ratio']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny body and sets: checks the script")
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results_scale_out"), help="<out>.md, <out>.json"
    )
    parser.add_argument("--repeats", type=int, default=2)
    for flag in ("--role", "--result", "--dir", "--init"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--rank", "--world", "--threads", "--rows"):
        parser.add_argument(flag, type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        Path(args.result).write_text(json.dumps(ROLES[args.role](args)))
        return
    sizes = [1_000, 5_000, 20_000] if args.quick else [10_000, 100_000, 1_000_000]
    tmp = Path(tempfile.mkdtemp(prefix="scale_out_"))
    try:
        results = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "quick": args.quick,
            "extraction": extraction(tmp, args.quick, 1 if args.quick else args.repeats),
            "memory": memory(tmp, sizes),
            "two_nodes": two_nodes(tmp, args.quick),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    command = "python bench/scale_out.py" + (" --quick" if args.quick else "")
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(report(results, command))
    print(report(results, command))


if __name__ == "__main__":
    main()
