"""Streaming shards (LitData) as a data source: written from a folder they hold the same images in the
same order, train to the same result, key the feature cache by their chunks, and a truncated shard
is one error naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.test_configs import TINY_OVERRIDES, run_cli
from transfer_cases.commands import shards
from transfer_cases.data import ImageFolderDataModule
from transfer_cases.data.streaming import ShardDataModule
from transfer_cases.utils.errors import DataError

pytest.importorskip("litdata")


@pytest.fixture
def shard_folder(tmp_path: Path, image_folder: Path) -> Path:
    out = tmp_path / "shards"
    shards.main([str(image_folder), str(out), "--chunk-bytes", "20KB"])
    return out


def test_shards_hold_the_folders_images_in_its_order(shard_folder: Path, image_folder: Path) -> None:
    folder, streamed = ImageFolderDataModule(root=image_folder), ShardDataModule(root=shard_folder)
    assert streamed.classes == folder.classes
    want, got = folder._load_splits(), streamed._load_splits()
    for split in ("train", "val"):
        a, b = getattr(want, split), getattr(got, split)
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert len(b.chunks) > 1  # several shards, read across their boundaries
        np.testing.assert_array_equal(a.labels, b.labels)
        for i in range(len(a)):
            np.testing.assert_array_equal(np.asarray(a.load(i)), np.asarray(b.load(i)))


def test_the_cache_key_follows_the_shards(shard_folder: Path) -> None:
    before = ShardDataModule(root=shard_folder)._load_splits().train.fingerprint()
    assert ShardDataModule(root=shard_folder)._load_splits().train.fingerprint() == before
    chunk = sorted((shard_folder / "train").glob("*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes())  # same bytes, new mtime: a rewritten shard
    assert ShardDataModule(root=shard_folder)._load_splits().train.fingerprint() != before


@pytest.fixture
def s3_bucket(shard_folder: Path) -> Iterator[str]:
    """`s3://bucket` served by LitData's own S3 code path, with its S3 client replaced by a copy from
    `shard_folder` (no network here): our side (URL roots, LitData's downloaders, the download cache)
    runs as it would against S3."""
    from litdata.streaming import downloader

    class LocalS3(downloader.LocalDownloader):
        def download_file(self, remote_filepath: str, local_filepath: str) -> None:
            super().download_file(remote_filepath.replace("s3://bucket", str(shard_folder)), local_filepath)

    real = downloader._DOWNLOADERS["s3://"]
    downloader.register_downloader("s3://", LocalS3, overwrite=True)
    try:
        yield "s3://bucket"
    finally:
        downloader.register_downloader("s3://", real, overwrite=True)


def test_shards_at_an_s3_url_are_read_through_the_download_cache(
    s3_bucket: str, image_folder: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "downloaded"
    remote = ShardDataModule(root=s3_bucket, cache_dir=str(cache))
    folder = ImageFolderDataModule(root=image_folder)
    assert remote.classes == folder.classes
    got, want = remote._load_splits().train, folder._load_splits().train
    for i in range(len(want)):
        np.testing.assert_array_equal(np.asarray(got.load(i)), np.asarray(want.load(i)))
    assert (cache / "classes.json").is_file() and list((cache / "train").rglob("chunk-*.bin"))  # downloaded
    with pytest.raises(DataError, match=r"cannot read s3://bucket/nowhere/classes.json .*credentials"):
        ShardDataModule(root=f"{s3_bucket}/nowhere", cache_dir=str(cache))


def test_a_truncated_shard_is_one_error_naming_it(shard_folder: Path) -> None:
    chunk = sorted((shard_folder / "train").glob("*.bin"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"shard {chunk} is \d+ bytes but its index.json says \d+"):
        ShardDataModule(root=shard_folder)._load_splits()


def test_the_shard_command_refuses_a_folder_that_is_not_empty(tmp_path: Path, image_folder: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(SystemExit) as exit_:
        shards.main([str(image_folder), str(tmp_path / "out")])
    assert exit_.value.code == 2


@pytest.mark.slow
def test_training_from_shards_gives_the_folders_result(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "shards"
    made = run_cli("transfer-shards", str(image_folder), str(out), cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    metrics = {}
    for name, data in (("folder", f"data.root={image_folder}"), ("shards", f"data.root={out}")):
        extra = ["data=shards"] if name == "shards" else []
        run = run_cli(
            "transfer-train",
            *extra,
            data,
            "case=large_similar",  # fine-tunes on images: every epoch reads the shards
            *TINY_OVERRIDES,
            "debug=limit",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={tmp_path / name}",
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        metrics[name] = json.loads((tmp_path / name / "summary.json").read_text())["metrics"]
    assert metrics["shards"] == metrics["folder"]


@pytest.mark.slow
def test_under_ddp_each_shard_item_is_trained_on_once_per_epoch(tmp_path: Path, image_folder: Path) -> None:
    """Two `ddp_cpu` processes fine-tuning from shards: each epoch, the ranks' samplers split the
    train items between them, every item to exactly one rank (12 items: no padding by the sampler)."""
    out = tmp_path / "shards"
    shards.main([str(image_folder), str(out), "--chunk-bytes", "20KB"])
    seen = tmp_path / "seen"
    run = run_cli(
        "transfer-train",
        "data=shards",
        f"data.root={out}",
        "trainer=ddp_cpu",
        "case=large_similar",  # images every epoch: the shards are read, not cached features
        *TINY_OVERRIDES,
        "trainer.max_epochs=2",
        "data.batch_size=2",
        "callbacks.progress_bar.refresh_rate=0",
        "+callbacks.seen._target_=tests.helpers.lightning.SampledIndices",
        f"+callbacks.seen.out={seen}",
        cwd=tmp_path,
        fresh=True,  # Lightning starts the other rank from sys.argv
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for epoch in (0, 1):
        ranks = [json.loads((seen / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert all(r["world"] == 2 and r["dataset"] == 12 for r in ranks)
        a, b = ranks[0]["indices"], ranks[1]["indices"]
        assert len(a) == len(b) == 6 and sorted(a + b) == list(range(12))  # each item once, none twice
    first = json.loads((seen / "rank0_epoch0.json").read_text())["indices"]
    assert first != json.loads((seen / "rank0_epoch1.json").read_text())["indices"]  # reshuffled per epoch
