"""The feature cache: hits, misses and invalidation for every key part, corrupt files, concurrent runs,
and checkpoints trained on cached features that classify raw images exactly like the in-memory model."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any
from unittest.mock import PropertyMock, patch

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import TINY, case_config, write_image_folder
from transfer_cases.backbones.tiny import _TinyNet
from transfer_cases.backbones.weights_file import save_weights_file
from transfer_cases.data import ImageFolderDataModule
from transfer_cases.features import CachedFeatureDataModule, FeatureCache, FeatureSet, FeatureStore
from transfer_cases.features.cached import SeededItems
from transfer_cases.training.checkpoint import load_module
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.errors import ConfigError


def weights_file(path: Path, seed: int = 0, widths: tuple[int, ...] = (8, 16, 32)) -> Path:
    torch.manual_seed(seed)
    save_weights_file(path, _TinyNet(list(widths)).state_dict(), arch="tiny_cnn", meta={}, half=False)
    return path


def cached(
    root: Path,
    images: Path,
    weights: Path,
    *,
    case: str = "small_similar",
    backbone: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    **cache: Any,
) -> tuple[TransferModule, CachedFeatureDataModule]:
    """A module and its cached data module, set up (features extracted or loaded)."""
    module = TransferModule(
        backbone={**TINY, "weights": str(weights), **(backbone or {})}, case=case_config(case), num_classes=2
    )
    dm = ImageFolderDataModule(images, batch_size=4, image_size=32, **(data or {}))
    dm.preprocess = module.preprocess
    wrapped = FeatureCache(dir=root / "cache", **{"extraction": "fp32", **cache}).wrap(dm, module.backbone)
    assert isinstance(wrapped, CachedFeatureDataModule)
    wrapped.setup("fit")
    return module, wrapped


def hits(dm: CachedFeatureDataModule) -> dict[str, bool]:
    return {label: f["hit"] for label, f in dm.report["files"].items()}


@pytest.fixture
def setup(tmp_path: Path, image_folder: Path) -> tuple[Path, Path, Path]:
    return tmp_path, image_folder, weights_file(tmp_path / "w.pt")


def test_second_setup_hits_and_serves_the_same_features(setup: tuple[Path, Path, Path]) -> None:
    root, images, weights = setup
    module, first = cached(root, images, weights)
    assert hits(first) == {"train": False, "val": False}
    _, second = cached(root, images, weights)
    assert hits(second) == {"train": True, "val": True}
    for a, b in ((first.train_dataset, second.train_dataset), (first.val_dataset, second.val_dataset)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    # The cached val features are the body's output on the val images, as computed (fp32, stored fp32).
    x = torch.stack([first.images.val_dataset[i][0] for i in range(len(first.images.val_dataset))])
    module.eval()
    with torch.no_grad():
        expected = module.backbone(x)
    torch.testing.assert_close(first.val_dataset.tensors[0], expected)


# Each entry changes one thing that changes the features; the train features must be rebuilt.
CHANGES: dict[str, dict[str, Any]] = {
    "weights content": {"weights_seed": 1},
    "architecture": {"backbone": {"widths": [8, 16, 48]}, "weights_widths": (8, 16, 48)},
    "cut (keep)": {"case": "small_different"},
    "image size": {"data": {"image_size": 24}},
    "normalisation": {"data": {"preprocess": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}}},
    # The train split's numerics, then the val split's: each changes only its own files.
    "extraction numerics": {"cache": {"extraction": "bf16"}, "rebuilt": {"train"}},
    "eval extraction numerics": {"cache": {"eval_extraction": "bf16"}, "rebuilt": {"val"}},
    # Buffers are weights too: BatchNorm statistics alone (same parameters) change the features.
    "BatchNorm statistics": {"bn_shift": 0.5},
}


@pytest.mark.parametrize("change", CHANGES)
def test_changing_one_key_part_rebuilds(setup: tuple[Path, Path, Path], change: str) -> None:
    root, images, weights = setup
    cached(root, images, weights)
    spec = CHANGES[change]
    if "weights_seed" in spec or "weights_widths" in spec:
        weights = weights_file(
            root / "other.pt", spec.get("weights_seed", 0), spec.get("weights_widths", (8, 16, 32))
        )
    data = spec.get("data")
    module = TransferModule(
        backbone={**TINY, "weights": str(weights), **spec.get("backbone", {})},
        case=case_config(spec.get("case", "small_similar")),
        num_classes=2,
    )
    for m in module.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean += spec.get("bn_shift", 0.0)
    dm = ImageFolderDataModule(images, batch_size=4, image_size=(data or {}).get("image_size", 32))
    dm.preprocess = {**module.preprocess.to_dict(), **(data or {}).get("preprocess", {})}
    wrapped = FeatureCache(dir=root / "cache", **{"extraction": "fp32", **spec.get("cache", {})}).wrap(
        dm, module.backbone
    )
    wrapped.setup("fit")
    rebuilt = spec.get("rebuilt", {"train", "val"})
    assert hits(wrapped) == {split: split not in rebuilt for split in ("train", "val")}, change


def test_changing_the_data_files_rebuilds(setup: tuple[Path, Path, Path]) -> None:
    root, images, weights = setup
    cached(root, images, weights)
    victim = next((images / "train" / "a").glob("*.png"))
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, newer file
    _, second = cached(root, images, weights)
    assert hits(second) == {"train": False, "val": True}
    _, subset = cached(root, images, weights, data={"samples_per_class": 3})
    assert hits(subset)["train"] is False


def test_augmented_views_are_cached_per_view_and_seed(setup: tuple[Path, Path, Path]) -> None:
    root, images, weights = setup
    _, one = cached(root, images, weights, train_views=1)
    assert hits(one) == {"train view 1/1": False, "val": False}
    _, two = cached(root, images, weights, train_views=2)
    # View 1 is the same file (same seed, same view index); view 2 is new.
    assert hits(two)["train view 1/2"] is True and hits(two)["train view 2/2"] is False
    views = two.train_dataset.tensors[0]
    assert views.shape[:2] == (len(two.images.train_dataset), 2)
    assert not torch.equal(views[:, 0], views[:, 1])  # two different random crops
    _, crop = cached(root, images, weights, train_views=1, data={"random_crop_scale": [0.2, 0.4]})
    assert hits(crop)["train view 1/1"] is False  # augmentation settings are part of the key
    _, reseeded = cached(root, images, weights, train_views=1, data={"seed": 7})
    assert hits(reseeded)["train view 1/1"] is False


def test_epoch_picks_the_view(setup: tuple[Path, Path, Path]) -> None:
    root, images, weights = setup
    module, dm = cached(root, images, weights, train_views=2)
    feats = dm.train_dataset.tensors[0][:3]
    for epoch in (0, 1, 2):
        with (
            patch.object(TransferModule, "current_epoch", new_callable=PropertyMock, return_value=epoch),
            torch.no_grad(),
        ):
            got = module.forward_cached(feats)
        torch.testing.assert_close(got, module.head(feats[:, epoch % 2]))


def test_a_damaged_or_unrecorded_shard_is_rebuilt_alone(
    setup: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root, images, weights = setup
    _, first = cached(root, images, weights, batch_size=2)  # batches of 2: several shards
    folder = Path(first.report["files"]["train"]["path"])
    records = sorted(folder.glob("rows-*.json"))
    assert len(records) == 6  # 12 train images, one batch each
    expected = first.train_dataset.tensors[0].clone()

    def again(rebuilt: str) -> CachedFeatureDataModule:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="transfer_cases.features"):
            _, dm = cached(root, images, weights, batch_size=2)
        assert hits(dm)["train"] is False and f"rank 0 of 1 extracted {rebuilt} of 6 shards" in caplog.text
        assert torch.equal(dm.train_dataset.tensors[0], expected)
        return dm

    # A readable file whose rows do not match their shard's checksum (bit rot, a foreign write).
    start = json.loads(records[2].read_text())["start"]
    rows = np.load(folder / "features.npy", mmap_mode="r+")
    rows[start] += 1
    rows.flush()
    del rows
    again("1")
    assert f"{records[2].stem} does not match its checksum; rebuilding it" in caplog.text
    records[4].unlink()  # a rank killed before it recorded its shard: that shard alone
    again("1")
    features = folder / "features.npy"
    features.write_bytes(features.read_bytes()[: features.stat().st_size // 2])  # truncated: all again
    again("6")


def _build_slowly(root: str, marker: str) -> None:
    def build() -> FeatureSet:
        with open(marker, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        return FeatureSet(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0]))

    fs, _, _ = FeatureStore(root).get_or_build({"k": 1}, build)
    assert fs.features.shape == (3, 2)


def test_two_concurrent_runs_build_once_and_both_get_the_features(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_build_slowly, args=(str(tmp_path / "c"), str(marker))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert marker.read_text().splitlines() == ["built"]
    assert not list((tmp_path / "c").glob("*.tmp"))  # no temp file left behind


def test_unwritable_cache_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"cache\.enabled=false"):
        FeatureStore(blocker / "features").get_or_build({"k": 1}, lambda: None)  # type: ignore[arg-type,return-value]


def test_only_fully_frozen_bodies_are_cached(tmp_path: Path, image_folder: Path) -> None:
    cache = FeatureCache(dir=tmp_path)
    dm = ImageFolderDataModule(image_folder, batch_size=4, image_size=32)
    for case, expect in (("small_similar", True), ("small_different", True), ("large_similar", False)):
        module = TransferModule(backbone=TINY, case=case_config(case), num_classes=2)
        assert isinstance(cache.wrap(dm, module.backbone), CachedFeatureDataModule) is expect, case
    module = TransferModule(backbone=TINY, case=case_config("small_similar"), num_classes=2)
    assert FeatureCache(enabled=False, dir=tmp_path).wrap(dm, module.backbone) is dm
    with pytest.raises(ConfigError, match="train_views"):
        FeatureCache(dir=tmp_path, train_views=-1)
    with pytest.raises(ConfigError, match="extraction"):
        FeatureCache(dir=tmp_path, extraction="int8")


def test_checkpoint_trained_on_features_classifies_raw_images_like_the_in_memory_model(
    setup: tuple[Path, Path, Path],
) -> None:
    root, images, weights = setup
    module, dm = cached(root, images, weights)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    val_acc = float(trainer.callback_metrics["val/acc"])
    trainer.save_checkpoint(root / "head.ckpt")
    loaded = load_module(root / "head.ckpt")
    module.eval()
    val_images = dm.images.val_dataset
    x = torch.stack([val_images[i][0] for i in range(len(val_images))])
    y = torch.as_tensor(val_images.labels)
    with torch.no_grad():
        in_memory, from_ckpt = module(x), loaded(x)
        on_features = module.forward_head(dm.val_dataset.tensors[0])
    assert torch.equal(in_memory, from_ckpt)  # an ordinary checkpoint: body and head
    assert torch.equal(in_memory.argmax(1), on_features.argmax(1))
    assert float((from_ckpt.argmax(1) == y).float().mean()) == pytest.approx(val_acc)


def test_every_split_is_served_with_its_labels(tmp_path: Path) -> None:
    """Ten classes and a test split: every split is served from features with the right labels."""
    images = write_image_folder(tmp_path / "ten", classes=tuple("abcdefghij"), per_class=4, size=24)
    for c in "abcdefghij":
        (images / "test" / c).mkdir(parents=True)
        (images / "val" / c / "0.png").rename(images / "test" / c / "0.png")
    module = TransferModule(backbone=TINY, case=case_config("small_similar"), num_classes=10)
    dm = ImageFolderDataModule(images, batch_size=4, image_size=32)
    dm.preprocess = module.preprocess
    wrapped = FeatureCache(dir=tmp_path / "cache", extraction="fp32").wrap(dm, module.backbone)
    wrapped.setup("fit")
    for split in ("train", "val", "test"):
        feats = getattr(wrapped, f"{split}_dataset").tensors
        assert feats[0].shape == (len(getattr(dm, f"{split}_dataset")), module.backbone.out_features)
        assert torch.equal(feats[1], torch.as_tensor(getattr(dm, f"{split}_dataset").labels))


def test_a_full_disk_for_the_cache_trains_on_the_features_in_memory(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root, images, weights = setup

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with caplog.at_level(logging.WARNING):
        _, dm = cached(root, images, weights)
    assert dm.report["files"]["train"] == {"path": None, "hit": False, "extraction": "fp32"}
    assert len(dm.train_dataset) == len(dm.images.train_dataset)
    assert "no space left on device" in caplog.text and "in memory" in caplog.text
    assert not list((root / "cache").rglob("rows-*.json"))  # no shard recorded: nothing counts as stored


def test_feature_files_get_the_usual_file_mode(setup: tuple[Path, Path, Path]) -> None:
    root, images, weights = setup
    _, dm = cached(root, images, weights)
    folder = Path(dm.report["files"]["train"]["path"])
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder / "features.npy", folder / "labels.npy", *folder.glob("rows-*.json")):
        mode = path.stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, path  # not mkstemp's 0600: a shared cache is readable by its group


def test_feature_loaders_serve_the_batches_a_plain_loader_would(setup: tuple[Path, Path, Path]) -> None:
    """Train batches are fetched a batch at a time, yet are the rows, order and labels of a per-row
    loader over epoch e's permutation of the seed (+ e), as DistributedSampler draws it on any number
    of ranks; val and test come whole (no metric depends on it)."""
    root, images, weights = setup
    _, dm = cached(root, images, weights)
    loader = dm.train_dataloader()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        order = torch.randperm(
            len(dm.train_dataset), generator=torch.Generator().manual_seed(dm.images.seed + epoch)
        )
        plain = DataLoader(
            TensorDataset(*dm.train_dataset.tensors), batch_size=dm.images.batch_size, sampler=order.tolist()
        )
        served = list(loader)
        assert len(served) == len(plain) > 1
        for (x, y), (px, py) in zip(served, plain, strict=True):
            assert torch.equal(x, px) and torch.equal(y, py)
    (val,) = list(dm.val_dataloader())
    assert all(torch.equal(a, b) for a, b in zip(val, dm.val_dataset.tensors, strict=True))


def test_without_views_the_head_trains_on_the_un_augmented_images(setup: tuple[Path, Path, Path]) -> None:
    """`train_views=0` means the eval transform's view: with random crops on (the default), the train
    features equal those of the same images with augmentation switched off, never a random crop."""
    root, images, weights = setup
    _, augmented = cached(root, images, weights)
    _, plain = cached(root / "plain", images, weights, data={"random_crop_scale": None})
    torch.testing.assert_close(augmented.train_dataset.tensors[0], plain.train_dataset.tensors[0])
    _, one_view = cached(root, images, weights, train_views=1)  # a random crop: other features
    assert not torch.allclose(one_view.train_dataset.tensors[0][:, 0], plain.train_dataset.tensors[0])


def test_each_items_crop_is_seeded_on_the_cpu_generator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # `torch.manual_seed` also queues a seed for every lazily initialised accelerator, recording a
    # stack trace each time: per image, that cost more than the body's pass over small images.
    def everywhere(seed: int) -> None:
        raise AssertionError("torch.manual_seed seeds every device, per item")

    class Draw(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.rand(2)

    monkeypatch.setattr(torch, "manual_seed", everywhere)
    before = torch.get_rng_state()
    items = SeededItems(Draw(), stream=7)
    first = [items[i] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, [items[i] for i in range(3)], strict=True))
    assert not torch.equal(first[0], first[1])  # each image its own stream
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left as it was
