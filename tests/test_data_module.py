"""The data module's contract: named random streams, fingerprints, settings checks and what it logs."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from PIL import Image

from tests.test_data import make_cifar_folder, make_split, paths_of, tiny_mnist, zip_folder  # noqa: F401
from transfer_cases import build
from transfer_cases.data import (
    CIFAR10DataModule,
    ClassificationDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    Splits,
    Stream,
)
from transfer_cases.utils.config import instantiate_clean
from transfer_cases.utils.errors import ConfigError
from transfer_cases.utils.paths import asset_path

HYMENOPTERA = asset_path("hymenoptera")


def names(dataset) -> list[str]:
    return sorted(f"{p.parent.name}/{p.name}" for p in paths_of(dataset))


# --- named random streams ---------------------------------------------------------------------------


def test_streams_keep_the_numbers_splits_were_drawn_with() -> None:
    # Seed 0 on the embedded ants and bees, recorded before the streams were named (`_rng(1)`,
    # `_rng(2)`, a torch generator seeded with the seed): naming them must not move any image.
    assert [int(s) for s in (Stream.SHUFFLE, Stream.VAL_SPLIT, Stream.SUBSAMPLE)] == [0, 1, 2]
    carved = ImageFolderDataModule(HYMENOPTERA / "train", seed=0, samples_per_class=3)
    carved.setup()
    val = "\n".join(names(carved.val_dataset))
    assert len(carved.val_dataset) == 49
    assert hashlib.sha256(val.encode()).hexdigest()[:16] == "017b2d87a1e9cc23"
    assert names(carved.train_dataset) == [
        "ants/207947948_3ab29d7207.jpg", "ants/6240329_72c01e663e.jpg", "ants/82852639_52b7f7f5e3.jpg",
        "bees/2321139806_d73d899e66.jpg", "bees/2792000093_e8ae0718cf.jpg", "bees/2959730355_416a18c63c.jpg",
    ]  # fmt: skip
    folders = ImageFolderDataModule(HYMENOPTERA, seed=0, samples_per_class=3, batch_size=8)
    folders.setup()
    assert names(folders.train_dataset) == [
        "ants/1693954099_46d4c20605.jpg", "ants/540889389_48bb588b21.jpg", "ants/9715481_b3cb4114ff.jpg",
        "bees/2486746709_c43cec0e42.jpg", "bees/3100226504_c0d4f1e3f1.jpg", "bees/507288830_f46e8d4cb2.jpg",
    ]  # fmt: skip
    full = ImageFolderDataModule(HYMENOPTERA, seed=0, batch_size=8)
    assert next(iter(full.train_dataloader().batch_sampler)) == [109, 148, 49, 127, 216, 224, 176, 136]


# --- plugging in a source ---------------------------------------------------------------------------


class ArrayData(ClassificationDataModule):
    """A data module of one's own, written the way the datamodule docstring says."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.classes = ["dark", "light"]

    def _load_splits(self) -> Splits:
        from transfer_cases.data.mnist import ArraySource

        labels = np.repeat([0, 1], 10)
        images = (labels[:, None, None] * 200 + np.zeros((1, 6, 6))).astype(np.uint8)
        return Splits(train=ArraySource(images, labels))


def test_a_new_source_plugs_in_through_load_splits() -> None:
    dm = ArrayData(image_size=4, random_crop_scale=None, augment=[])
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (18, 2)  # default val_fraction 0.1
    assert sorted(dm.val_dataset.labels.tolist()) == [0, 1]
    with pytest.raises(NotImplementedError, match="_load_splits"):
        ClassificationDataModule().setup()


# --- fingerprints -----------------------------------------------------------------------------------


def test_file_fingerprints_follow_files_subsets_and_seed(tmp_path: Path) -> None:
    make_split(tmp_path, {"cat": 8, "dog": 8})

    def fingerprints(**kwargs) -> tuple[str, str]:
        dm = ImageFolderDataModule(tmp_path, **kwargs)
        dm.setup()
        return dm.train_dataset.fingerprint(), dm.val_dataset.fingerprint()

    base = fingerprints(seed=0)
    assert fingerprints(seed=0) == base  # rebuilt: same value
    assert len(set(base)) == 2
    assert fingerprints(seed=1)[0] != base[0] and fingerprints(seed=1)[1] != base[1]
    assert fingerprints(seed=0, samples_per_class=3)[0] != base[0]
    assert fingerprints(seed=0, samples_per_class=3)[1] == base[1]  # val does not move
    one = tmp_path / "cat" / "003.png"
    stat = one.stat()
    os.utime(one, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    touched = fingerprints(seed=0)
    assert touched[0] != base[0] or touched[1] != base[1]
    Image.new("RGB", (30, 30), (1, 2, 3)).save(one)  # replaced
    os.utime(one, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fingerprints(seed=0) not in (base, touched)


def test_fingerprints_are_cheap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_split(tmp_path, {"cat": 3, "dog": 3})
    dm = ImageFolderDataModule(tmp_path)
    dm.setup()

    def no_decoding(*_: object, **__: object) -> None:
        raise AssertionError("a fingerprint must not open images")

    monkeypatch.setattr(Image, "open", no_decoding)
    assert len(dm.train_dataset.fingerprint()) == 64


def test_mnist_fingerprints_follow_the_idx_files(tiny_mnist: Path) -> None:  # noqa: F811
    def fingerprints() -> tuple[str, str]:
        dm = MNISTDataModule(tiny_mnist)
        dm.setup()
        return dm.train_dataset.fingerprint(), dm.test_dataset.fingerprint()

    base = fingerprints()
    assert fingerprints() == base and base[0] != base[1]
    path = tiny_mnist / "t10k-images-idx3-ubyte"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    train, test = fingerprints()
    assert train == base[0] and test != base[1]


def test_cifar_zip_fingerprints_follow_the_zip(tmp_path: Path) -> None:
    zip_path = zip_folder(make_cifar_folder(tmp_path / "x"), tmp_path / "c.zip", "")

    def fingerprints() -> tuple[str, str]:
        dm = CIFAR10DataModule(zip_path)
        dm.setup()
        return dm.train_dataset.fingerprint(), dm.test_dataset.fingerprint()

    base = fingerprints()
    assert fingerprints() == base and base[0] != base[1]
    stat = zip_path.stat()
    os.utime(zip_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert set(fingerprints()).isdisjoint(base)


# --- the imagefolder config: a val/ folder or a carved fraction -------------------------------------


@pytest.mark.parametrize("layout", ["train_and_val", "class_folders"])
def test_imagefolder_config_uses_val_folder_else_carves_a_fraction(
    compose_train: Callable[..., DictConfig], tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "images"
    if layout == "train_and_val":
        make_split(root / "train", {"cat": 10, "dog": 10})
        make_split(root / "val", {"cat": 3, "dog": 3})
    else:
        make_split(root, {"cat": 10, "dog": 10})
    cfg = compose_train("data=imagefolder", f"data.root={root}")
    assert cfg.data.val_fraction == 0.2  # the README's example leaves it at the config's value
    with caplog.at_level(logging.INFO, logger="transfer_cases.data"):
        dm = instantiate_clean(cfg.data)
        dm.setup()
    sizes = (len(dm.train_dataset), len(dm.val_dataset))
    if layout == "train_and_val":
        assert sizes == (20, 6)
        assert f"using {root / 'val'} as the val split; data.val_fraction=0.2 is not used" in caplog.text
    else:
        assert sizes == (16, 4) and "as the val split" not in caplog.text


# --- settings a user can get wrong ------------------------------------------------------------------


BAD_DATA_SETTINGS = {
    "data.batch_size=0": r"data\.batch_size=0 is not a whole number >= 1 .*per device.*batch_size=32",
    "data.batch_size=-1": r"data\.batch_size=-1 is not a whole number >= 1",
    "data.batch_size=abc": r"data\.batch_size='abc' is not a whole number >= 1",
    "data.batch_size=2.5": r"data\.batch_size=2\.5 is not a whole number >= 1",
    "data.batch_size=true": r"data\.batch_size=True is not a whole number >= 1",
    "data.num_workers=-1": r"data\.num_workers=-1 is not a whole number >= 0 .*data\.num_workers=2",
    "data.num_workers=two": r"data\.num_workers='two' is not a whole number >= 0",
    "data.samples_per_class=0": r"data\.samples_per_class=0 is not a whole number >= 1 or null",
    "data.image_size=big": r"data\.image_size='big' is not a whole number >= 1 or null",
    "data.image_size=0": r"data\.image_size=0 is not a whole number >= 1 or null \(pixels; .*image_size=64",
    "data.val_fraction=half": r"data\.val_fraction='half' must be between 0 and 1",
    "data.val_fraction=1": r"data\.val_fraction=1 must be between 0 and 1",
}


@pytest.mark.parametrize("override", BAD_DATA_SETTINGS)
def test_bad_data_settings_name_the_setting_and_a_valid_value(
    compose_train: Callable[..., DictConfig], override: str
) -> None:
    cfg = compose_train("backbone=tiny_cnn", override)
    with pytest.raises(ConfigError, match=BAD_DATA_SETTINGS[override]):
        build(cfg)


# --- what is logged, once, on rank zero -------------------------------------------------------------


def test_images_smaller_than_the_crop_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_split(tmp_path, {"cat": 4, "dog": 4})  # 12x10 images
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tmp_path / "cat" / "dot.png")
    Image.new("RGB", (5, 9), (200, 30, 30)).save(tmp_path / "cat" / "small.png")
    dm = ImageFolderDataModule(tmp_path, check_images=True, image_size=8)
    with caplog.at_level(logging.INFO, logger="transfer_cases.data"):
        dm.setup()
    assert "2 image(s) smaller than 8 px will be upscaled (smallest 1x1)" in caplog.text
    source = dm.train_dataset.source
    dot = source.load(source.paths.index(tmp_path / "cat" / "dot.png"))
    assert dm.train_dataset.transform(dot).shape == (3, 8, 8)


def test_global_batch_size_is_logged_at_fit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_split(tmp_path, {"cat": 4, "dog": 4})
    dm = ImageFolderDataModule(tmp_path, batch_size=8)
    dm.trainer = SimpleNamespace(world_size=4, accumulate_grad_batches=1)  # as Lightning attaches it
    with caplog.at_level(logging.INFO, logger="transfer_cases.data"):
        dm.setup("validate")
        assert "global batch size" not in caplog.text
        dm.setup("fit")
    assert "global batch size 32: data.batch_size=8 per device x 4 device(s)" in caplog.text


def test_data_messages_are_silent_off_rank_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_split(tmp_path / "train", {"cat": 2, "dog": 2})
    make_split(tmp_path / "val", {"cat": 1})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    said = ("skipped 1 non-image file(s)", "as the val split", "the val split has no images of class dog")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with caplog.at_level(logging.INFO, logger="transfer_cases.data"):
        ImageFolderDataModule(tmp_path).setup()
    assert caplog.records == []
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    with caplog.at_level(logging.INFO, logger="transfer_cases.data"):
        ImageFolderDataModule(tmp_path).setup()
    assert all(message in caplog.text for message in said)
