"""Features once at any scale: sharded extraction (W ranks = 1 process, bit for bit), a failing or hung
rank named instead of waited for, rows read from the memory map with bounded resident memory, the
head's batches dealt out to ranks, and two torchrun "nodes" on localhost (slow)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.conftest import TINY, write_image_folder
from tests.helpers.run_if import RunIf
from transfer_cases.data import ImageFolderDataModule
from transfer_cases.features import (
    FeatureCache,
    FeatureSet,
    FeatureStore,
    cached_features,
    mapped,
    resolve_extraction,
    store,
)
from transfer_cases.features.shards import Shard, ShardedArrays
from transfer_cases.utils.config import instantiate_clean, register_resolvers
from transfer_cases.utils.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


def tiny_data(folder: Path) -> tuple[Any, Any]:
    """A frozen tiny body and its image data module (augmenting train transform), set up."""
    torch.manual_seed(0)
    body = instantiate_clean(TINY).build(pretrained=False)
    body.freeze(body.depth)
    data = ImageFolderDataModule(write_image_folder(folder), batch_size=2, image_size=32)
    data.preprocess = body.preprocess
    data.setup("fit")
    return body, data


def _as_rank(rank: int, world: int, init: str, job: Any, out: str) -> None:
    """Run `job()` as rank `rank` of a gloo group; write what it returned, or its error, to `out`."""
    # A forked child must not use the parent's OpenMP thread pool (it hangs there, when the parent
    # ran multi-threaded ops, as under a plain `pytest` without OMP_NUM_THREADS=1).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = {"ok": job()}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}", "after_s": time.monotonic() - START[0]}
    Path(out).write_text(json.dumps(result))
    os._exit(0)  # no teardown: a peer may be gone


START = [0.0]


def run_ranks(
    tmp_path: Path, jobs: list[Any], timeout: float = 60, first: bool = False
) -> list[dict[str, Any]]:
    """Each job in its own forked process, as the ranks of one gloo group; their results in rank order
    (with `first`, the others are killed once rank 0 is done)."""
    ctx = mp.get_context("fork")
    START[0] = time.monotonic()
    outs = [tmp_path / f"rank{r}.json" for r in range(len(jobs))]
    init = tmp_path / "init"
    procs = [
        ctx.Process(target=_as_rank, args=(r, len(jobs), str(init), job, str(out)))
        for r, (job, out) in enumerate(zip(jobs, outs, strict=True))
    ]
    for p in procs:
        p.start()
    for p in procs[: 1 if first else None]:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [json.loads(o.read_text()) if o.exists() else {"error": "no result"} for o in outs]


def extract_views(
    body: Any, dataset: Any, cache: Path, views: tuple[int | None, ...] = (None,)
) -> dict[str, Any]:
    """`dataset` as its transform gives it (view None) or augmented `views`, in batches of 2, stored."""
    numerics = resolve_extraction("fp32", CPU)
    out = {}
    for view in views:
        fs, hit, path = cached_features(
            FeatureStore(cache), body, dataset, device=CPU, numerics=numerics, batch_size=2, view=view
        )
        out[str(view)] = {"path": str(path), "hit": hit, "rows": len(fs.features)}
    return out


def test_one_process_and_two_ranks_extract_bit_identical_features_in_order(
    tmp_path: Path,
) -> None:
    body, data = tiny_data(tmp_path / "images")
    train = data.train_dataset
    single = extract_views(body, train, tmp_path / "one", views=(0, 1))
    results = run_ranks(tmp_path, [lambda: extract_views(body, train, tmp_path / "two", views=(0, 1))] * 2)
    assert all("ok" in r for r in results), results
    for view in ("0", "1"):
        a, b = Path(single[view]["path"]), Path(results[0]["ok"][view]["path"])
        assert results[1]["ok"][view]["path"] == str(b) and not results[0]["ok"][view]["hit"]
        for name in ("features", "labels"):
            one, two = np.load(a / f"{name}.npy"), np.load(b / f"{name}.npy", mmap_mode="r")
            assert one.shape[0] == len(train) and np.array_equal(one, two), (view, name)
        ranks = [json.loads(r.read_text())["rank"] for r in sorted(b.glob("rows-*.json"))]
        assert ranks == [0, 1] * 3  # 6 shards of one batch: rank r of 2 took shards r, r + 2, ...
    # Each view is its own random crop of every image (seeded per image, whichever rank reads it).
    crops = [np.load(Path(single[v]["path"]) / "features.npy") for v in ("0", "1")]
    assert not np.allclose(*crops)


class _Broken:
    """A dataset whose image `bad` cannot be read (as a truncated file), or that hangs there."""

    def __init__(self, dataset: Any, bad: int, hang: bool = False) -> None:
        self.dataset, self.bad, self.hang = dataset, bad, hang
        self.transform = dataset.transform

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> str:
        return self.dataset.fingerprint()

    def __getitem__(self, i: int) -> Any:
        if i == self.bad:
            if self.hang:
                time.sleep(60)
            raise DataError(f"image {i} is truncated")
        return self.dataset[i]


def test_a_failing_rank_stops_the_others_at_once_naming_it(tmp_path: Path) -> None:
    body, data = tiny_data(tmp_path / "images")
    broken = _Broken(data.val_dataset, bad=3)  # row 3: rank 1's second shard
    results = run_ranks(tmp_path, [lambda: extract_views(body, broken, tmp_path / "c")] * 2)
    assert results[1]["error"] == "DataError: image 3 is truncated"
    assert results[0]["error"].startswith("PeerFailed: rank 1 failed (extracting features): DataError")
    assert results[0]["after_s"] < 30
    # Rank 0's shards were recorded; a re-run (one process) extracts only rank 1's.
    folder = next(p for p in (tmp_path / "c").iterdir() if p.is_dir())
    assert sorted(json.loads(r.read_text())["rank"] for r in folder.glob("rows-*.json")) == [0, 0]


def test_a_hung_rank_is_named_when_the_deadline_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, data = tiny_data(tmp_path / "images")
    monkeypatch.setattr(store, "SYNC_GRACE_S", 2.0)
    hung = _Broken(data.val_dataset, bad=3, hang=True)
    results = run_ranks(tmp_path, [lambda: extract_views(body, hung, tmp_path / "c")] * 2, first=True)
    assert results[0]["error"].startswith(
        "PeerFailed: rank 0: another rank did not finish its part (extracting features)"
    )
    assert results[0]["after_s"] < 30


def test_a_rerun_extracts_only_the_missing_shards(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    body, data = tiny_data(tmp_path / "images")
    first = extract_views(body, data.val_dataset, tmp_path / "c")["None"]
    folder = Path(first["path"])
    before = np.load(folder / "features.npy")
    (folder / "rows-000000002-000000004.json").unlink()  # a rank killed before it recorded this shard
    with caplog.at_level("INFO", logger="transfer_cases.features"):
        again = extract_views(body, data.val_dataset, tmp_path / "c")["None"]
    assert not again["hit"] and "rank 0 of 1 extracted 1 of 3 shards" in caplog.text
    assert np.array_equal(np.load(folder / "features.npy"), before)


def _resident_file_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssFile:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("through", ["rows", "map"])
def test_the_loader_reads_rows_without_making_the_file_resident(tmp_path: Path, through: str) -> None:
    """A pass over 64 MB of stored rows in random batches: read by index (`FeatureSet.rows`, what the
    loader uses), resident file pages stay near one batch; gathered through the map (the control),
    they grow to the whole file, so the test can tell."""
    rows, width = 16384, 1024
    arrays = ShardedArrays(tmp_path, "k", rows)
    batches = ((torch.randn(1024, width), torch.arange(b, b + 1024)) for b in range(0, rows, 1024))
    arrays.write(Shard(0, rows), batches, {})
    assert np.load(tmp_path / "features.npy", mmap_mode="r").shape == (rows, width)  # a plain .npy
    features, labels, reader = arrays.open()
    fs = FeatureSet(features, labels, rows=reader if through == "rows" else None)
    dataset = mapped.MappedRows([fs])
    order = torch.randperm(rows).tolist()
    before = _resident_file_kb()
    for i in range(0, rows, 256):
        _, y = dataset.__getitems__(order[i : i + 256])
        assert torch.equal(y, torch.tensor(order[i : i + 256]))  # the labels are the row numbers
    grown_mb = (_resident_file_kb() - before) / 1024
    assert grown_mb < 16 if through == "rows" else grown_mb > 48, grown_mb
    some = torch.tensor(order[:300])
    assert torch.equal(reader[some], features[some])


def test_a_small_features_file_is_read_once_then_served_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, width = 300, 16  # far below SMALL_FILE_BYTES: a syscall per run of rows would cost more
    arrays = ShardedArrays(tmp_path, "k", rows)
    arrays.write(Shard(0, rows), iter([(torch.randn(rows, width), torch.arange(rows))]), {})
    features, _, reader = arrays.open()
    some = torch.randperm(rows)[:64]
    assert torch.equal(reader[some], features[some])

    def no_more_reads(*args: Any) -> int:
        raise AssertionError("read the file again")

    monkeypatch.setattr(os, "preadv", no_more_reads)
    monkeypatch.setattr(np, "fromfile", no_more_reads)
    assert torch.equal(reader[some.flip(0)], features[some.flip(0)])


@pytest.mark.parametrize(("rows", "world"), [(10, 1), (10, 3), (2, 4), (7, 2)])
def test_row_sampler_deals_what_distributed_sampler_deals(rows: int, world: int) -> None:
    for rank in range(world):
        ours, theirs = (
            kind(range(rows), num_replicas=world, rank=rank, seed=5)
            for kind in (mapped.RowSampler, torch.utils.data.DistributedSampler)
        )
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs), (rank, epoch)


def test_ranks_step_through_the_rows_one_process_steps_through(tmp_path: Path) -> None:
    """Rank r of 2 with batch b takes, at every step, its half of what one process with batch 2b takes."""
    body, data = tiny_data(tmp_path / "images")
    cache = FeatureCache(dir=tmp_path / "cache", extraction="fp32").wrap(data, body)
    cache.setup("fit")

    class Trainer:
        def __init__(self, world_size: int, global_rank: int) -> None:
            self.world_size, self.global_rank = world_size, global_rank
            self.strategy = type("S", (), {"root_device": CPU})()

    def batches(world: int, rank: int, batch: int) -> list[set[int]]:
        cache.trainer, cache.images.batch_size = Trainer(world, rank), batch  # type: ignore[assignment]
        loader = cache.train_dataloader()
        loader.sampler.set_epoch(1)  # type: ignore[attr-defined]
        rows = cache.train_dataset.tensors[0]
        return [{int((rows == r).all(1).nonzero()[0]) for r in x} for x, _ in loader]

    one = batches(1, 0, 4)
    halves = [batches(2, r, 2) for r in (0, 1)]
    assert len(one) == 3 and [a | b for a, b in zip(*halves, strict=True)] == one


# --- two torchrun "nodes" (and srun) on localhost, running docs/scale_out.md's commands as written ----

FAKE_SRUN = """#!{python}
import os, subprocess, sys
n = int(os.environ["SLURM_NNODES"]) * int(os.environ["SLURM_NTASKS_PER_NODE"])
tasks = [
    subprocess.Popen(sys.argv[1:], env={{**os.environ, "SLURM_NTASKS": str(n), "SLURM_PROCID": str(r),
                                         "SLURM_LOCALID": "0", "SLURM_NODEID": str(r)}})
    for r in range(n)
]
sys.exit(max(t.wait() for t in tasks))
"""


def docs_multi_node_commands() -> dict[str, str]:
    """The torchrun and srun lines of docs/scale_out.md's multi-node block, continuation lines joined."""
    text = (ROOT / "docs" / "scale_out.md").read_text(encoding="utf-8")
    block = re.search(r"## Many nodes.*?```bash\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
    lines = [ln for ln in block.replace("\\\n", " ").splitlines() if ln and not ln.startswith("#")]
    return {ln.split()[0]: ln for ln in lines}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job(case: str, images: Path) -> list[str]:
    """The job's own settings: a tiny run, several extraction batches (so both ranks get shards)."""
    return [
        f"case={case}",
        "backbone=tiny_cnn",
        f"data.root={images}",
        "data.num_workers=0",
        "data.batch_size=2",
        "cache.batch_size=2",
        "trainer.max_epochs=3",
        "callbacks.progress_bar.refresh_rate=0",
    ]


def launch(cwd: Path, command: str, extra: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    bin_dir = Path(sys.executable).parent
    path = os.pathsep.join([str(cwd / "bin"), str(bin_dir), os.environ["PATH"]])
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path, **env}
    return subprocess.Popen(
        ["bash", "-c", f"{command} {shlex.join(extra)}"],
        cwd=cwd,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]
        outs.append(out)
    return outs


def two_nodes(cwd: Path, launcher: str, extra: list[str]) -> list[str]:
    """The docs' `launcher` command on two "nodes" of localhost; each node's output."""
    command = docs_multi_node_commands()[launcher].replace("29500", str(port := free_port()))
    if launcher == "torchrun":
        env = [{"NODE_RANK": str(r), "MASTER": "127.0.0.1"} for r in (0, 1)]
        return finish([launch(cwd, command, extra, e) for e in env])
    (cwd / "bin").mkdir(exist_ok=True)
    (cwd / "bin" / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (cwd / "bin" / "srun").chmod(0o755)
    slurm = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "two-nodes"}
    env = {**slurm, "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}
    return finish([launch(cwd, command, extra, env)])


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def same_metrics(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Every epoch-level metric equal within float rounding (a step's loss is one rank's batch)."""
    keys = {k for k in a if not k.endswith("_step")}
    assert keys == {k for k in b if not k.endswith("_step")} and "val/loss" in keys
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_two_nodes_head_only_build_the_cache_once_and_train_as_one_process(
    tmp_path: Path, launcher: str
) -> None:
    images = write_image_folder(tmp_path / "images")
    outs = two_nodes(tmp_path, launcher, job("small_similar", images))
    runs = [p for p in (tmp_path / "outputs" / "train" / "runs").iterdir()]
    assert len(runs) == 1 and summary(runs[0])["status"] == "ok"  # one run folder
    assert list(runs[0].rglob("metrics.csv")) == [runs[0] / "csv" / "metrics.csv"]
    names = sorted(p.name for p in (runs[0] / "checkpoints").iterdir())
    assert len(names) == 2 and names[-1] == "last.ckpt", names  # the best epoch and last, once
    # Hydra's outputs are rank 0's alone: rank 1 ran Hydra too, but wrote neither .hydra/ nor log lines.
    assert sorted(p.name for p in runs[0].glob("*.log")) == ["train.log"]
    log = (runs[0] / "train.log").read_text()
    assert "rank 0 of 2 extracted" in log and "rank 1 of 2 extracted" not in log
    output = "\n".join(outs)
    for rank in (0, 1):  # each node extracted its share of every split
        for split in ("train", "val"):
            assert f"extracting {split} features: rank {rank} of 2 extracted" in output
    folders = [p for p in (tmp_path / ".cache" / "features").iterdir() if p.is_dir()]
    records = [json.loads(r.read_text()) for f in folders for r in f.glob("rows-*.json")]
    assert len(folders) == 2 and {(r["rank"], r["world_size"]) for r in records} == {(0, 2), (1, 2)}
    # One process, the same global batch (2 nodes x 2): the features are found complete, the head
    # steps through the same rows and ends with the same metrics.
    one = [*job("small_similar", images), "data.batch_size=4", "trainer=cpu", "hydra.run.dir=one"]
    (out,) = finish([launch(tmp_path, "transfer-train", one, {})])
    assert "feature cache hit for extracting train features" in out and " built " not in out
    same_metrics(summary(runs[0])["metrics"], summary(tmp_path / "one")["metrics"])


@pytest.mark.slow
def test_two_nodes_fine_tuning_trains_as_one_node_with_two_processes(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images")
    two_nodes(tmp_path, "torchrun", job("large_similar", images))
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    assert summary(run)["feature_cache"] is None  # the body trains: no cache
    one_node = [*job("large_similar", images), "trainer=ddp_cpu", "hydra.run.dir=one_node"]
    finish([launch(tmp_path, "transfer-train", one_node, {})])
    same_metrics(summary(run)["metrics"], summary(tmp_path / "one_node")["metrics"])


@RunIf(min_gpus=2)
def test_two_gpus_each_extract_their_share_from_pinned_memory(tmp_path: Path) -> None:
    """`trainer=ddp` on 2 GPUs: each rank extracts its shards on its own GPU (pinned batches, non-blocking
    copies); the rows match one GPU's within float rounding and the head trains on the mapped rows."""
    from tests.test_configs import run_cli

    images = write_image_folder(tmp_path / "images")
    for name, trainer in (("two", ["trainer=ddp", "trainer.devices=2"]), ("one", ["trainer=gpu"])):
        cache = ["cache.extraction=fp32", f"paths.cache_dir={tmp_path / name}"]
        run = run_cli(
            "transfer-train", *job("small_similar", images), *trainer, *cache, cwd=tmp_path, fresh=True
        )
        assert run.returncode == 0, run.stderr[-4000:]
    folders = [p for p in (tmp_path / "two" / "features").iterdir() if (p / "features.npy").exists()]
    assert len(folders) == 2  # train and val
    for folder in folders:
        records = [json.loads(r.read_text()) for r in folder.glob("rows-*.json")]
        assert {r["rank"] for r in records} == {0, 1}
        one_gpu = np.load(tmp_path / "one" / "features" / folder.name / "features.npy")
        np.testing.assert_allclose(np.load(folder / "features.npy"), one_gpu, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_under_ddp_a_rank_that_cannot_read_its_images_stops_the_run_with_one_line_each(
    tmp_path: Path,
) -> None:
    images = write_image_folder(tmp_path / "images")
    victim = images / "train" / "b" / "0.png"  # row 6: the 4th shard of 2 rows, rank 1's
    victim.write_bytes(victim.read_bytes()[:100])
    ddp = [*job("small_similar", images), "trainer=ddp_cpu", "trainer.max_epochs=1"]
    proc = launch(tmp_path, "transfer-train", ddp, {})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert "error: rank 1 failed (extracting train features): DataError: cannot read image" in out
    assert "Traceback" not in out


def test_only_global_rank_zero_writes_hydras_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun or srun every rank runs Hydra before Lightning: `.hydra/` and the log file are
    named by `${on_rank_zero:...}`, so the other ranks write neither."""
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.utilities import rank_zero_only
    from omegaconf import open_dict

    from transfer_cases import config_dir

    register_resolvers()
    for rank, subdir, log in ((0, ".hydra", str(tmp_path / "train.log")), (1, None, "/dev/null")):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("train", return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir, cfg.hydra.job.name = str(tmp_path), "train"
        assert cfg.hydra.output_subdir == subdir
        assert cfg.hydra.job_logging.handlers.file.filename == log
