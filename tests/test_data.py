"""Data modules: layouts, splits, subsampling, transforms and the user-facing errors."""

from __future__ import annotations

import gzip
import logging
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from transfer_cases.data import (
    CIFAR10DataModule,
    ClassificationDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    eval_transform,
)
from transfer_cases.training.preprocess import Preprocess
from transfer_cases.utils.errors import ConfigError, DataError
from transfer_cases.utils.paths import asset_path

# The shared data sits next to the repository (../shared/data), wherever it is checked out.
SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
CIFAR_ZIP = SHARED_DATA / "cifar10_jpg" / "cifar10_jpg.zip"
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 200)}
SMALL = {"image_size": 8, "random_crop_scale": None, "augment": []}  # tiny and deterministic


def save_image(
    path: Path, colour: tuple[int, int, int] = (128, 128, 128), size: tuple[int, int] = (12, 10)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def make_split(folder: Path, counts: dict[str, int], ext: str = "png") -> None:
    for name, n in counts.items():
        for i in range(n):
            save_image(folder / name / f"{i:03d}.{ext}", COLOURS.get(name, (90, 90, 90)))


def paths_of(dataset) -> set[Path]:
    return {dataset.source.paths[i] for i in dataset.indices}


@pytest.fixture
def three_splits(tmp_path: Path) -> Path:
    make_split(tmp_path / "train", {"dog": 4, "cat": 5, "eel": 3})
    make_split(tmp_path / "val", {"cat": 2, "dog": 2, "eel": 1}, ext="jpg")
    make_split(tmp_path / "test", {"cat": 1, "dog": 1, "eel": 1})
    return tmp_path


@pytest.fixture
def one_folder(tmp_path: Path) -> Path:
    make_split(tmp_path / "data", {"cat": 20, "dog": 10})
    return tmp_path / "data"


# --- ImageFolder: layout, classes, splits -----------------------------------------------------------


def test_classes_are_known_after_init_and_sorted(three_splits: Path) -> None:
    dm = ImageFolderDataModule(three_splits)
    assert dm.classes == ["cat", "dog", "eel"]
    assert dm.num_classes == 3
    assert isinstance(dm, ClassificationDataModule)
    assert dm.train_dataset is None  # nothing decoded before setup


def test_split_sizes_and_labels_follow_train_classes(three_splits: Path) -> None:
    dm = ImageFolderDataModule(three_splits, **SMALL)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (12, 5, 3)
    val_labels = sorted(dm.val_dataset.labels.tolist())
    assert val_labels == [0, 0, 1, 1, 2]
    for image, label in (dm.val_dataset[i] for i in range(len(dm.val_dataset))):
        # each class has its own colour: the label must match the colour of the image
        expected = list(COLOURS)[label]
        assert image[:, 0, 0].argmax().item() == list(COLOURS[expected]).index(200)


def test_setup_is_idempotent(three_splits: Path) -> None:
    dm = ImageFolderDataModule(three_splits)
    dm.setup("fit")
    train = dm.train_dataset
    dm.setup("test")
    assert dm.train_dataset is train


def test_batch_shape_dtype_and_normalisation(tmp_path: Path) -> None:
    make_split(tmp_path / "train", {"cat": 3, "dog": 3})
    make_split(tmp_path / "val", {"cat": 2, "dog": 2})
    pre = {"mean": [0.5, 0.25, 0.0], "std": [0.5, 0.25, 2.0], "resize_size": 20, "crop_size": 16}
    dm = ImageFolderDataModule(tmp_path, preprocess=pre, batch_size=4)
    assert dm.preprocess == Preprocess((0.5, 0.25, 0.0), (0.5, 0.25, 2.0), 20, 16)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert type(images) is torch.Tensor and labels.dtype == torch.int64
    cat = torch.tensor([200, 30, 30]) / 255
    expected = (cat - torch.tensor(pre["mean"])) / torch.tensor(pre["std"])
    cat_images = images[labels == 0]
    assert len(cat_images) == 2
    torch.testing.assert_close(cat_images.mean(dim=(0, 2, 3)), expected, atol=2e-3, rtol=0)
    assert cat_images.std(dim=(2, 3)).max() < 1e-4  # constant colour stays constant


def test_image_size_overrides_resize_and_crop(three_splits: Path) -> None:
    dm = ImageFolderDataModule(
        three_splits, image_size=24, preprocess=Preprocess(resize_size=256, crop_size=224)
    )
    assert (dm.preprocess.resize_size, dm.preprocess.crop_size) == (24, 24)
    dm.setup()
    assert dm.train_dataset[0][0].shape == (3, 24, 24)
    assert dm.val_dataset[0][0].shape == (3, 24, 24)


def test_preprocess_set_after_setup_updates_transforms(three_splits: Path) -> None:
    dm = ImageFolderDataModule(three_splits, random_crop_scale=None)
    dm.setup()
    dm.preprocess = Preprocess(resize_size=10, crop_size=6)
    assert dm.train_dataset[0][0].shape == (3, 6, 6)
    assert dm.test_dataset[0][0].shape == (3, 6, 6)


def test_one_folder_layout_splits_val_seeded_stratified_and_disjoint(one_folder: Path) -> None:
    dm = ImageFolderDataModule(one_folder, seed=3)
    dm.setup()
    train, val = paths_of(dm.train_dataset), paths_of(dm.val_dataset)
    assert not train & val
    assert len(train | val) == 30
    assert sorted(dm.val_dataset.labels.tolist()) == [0] * 4 + [1] * 2  # default 0.2 of each class
    again = ImageFolderDataModule(one_folder, seed=3)
    again.setup()
    assert paths_of(again.val_dataset) == val
    other = ImageFolderDataModule(one_folder, seed=4)
    other.setup()
    assert paths_of(other.val_dataset) != val


def test_val_fraction_is_honoured(one_folder: Path) -> None:
    dm = ImageFolderDataModule(one_folder, val_fraction=0.5)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (15, 15)


def test_a_val_folder_wins_over_val_fraction(three_splits: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="transfer_cases.data"):
        dm = ImageFolderDataModule(three_splits, val_fraction=0.3)
    assert f"using {three_splits / 'val'} as the val split; data.val_fraction=0.3 is not used" in caplog.text
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (12, 5)
    assert paths_of(dm.val_dataset) == set((three_splits / "val").rglob("*.jpg"))


def test_samples_per_class_exact_reproducible_nested(one_folder: Path) -> None:
    def train_paths(k: int, seed: int) -> set[Path]:
        dm = ImageFolderDataModule(one_folder, samples_per_class=k, seed=seed)
        dm.setup()
        assert np.bincount(dm.train_dataset.labels).tolist() == [k, k]
        return paths_of(dm.train_dataset)

    base = train_paths(3, seed=0)
    assert train_paths(3, seed=0) == base
    assert train_paths(3, seed=1) != base
    assert base < train_paths(5, seed=0)  # a larger k extends the smaller subset


def test_samples_per_class_does_not_move_val(one_folder: Path) -> None:
    full = ImageFolderDataModule(one_folder)
    small = ImageFolderDataModule(one_folder, samples_per_class=2)
    full.setup()
    small.setup()
    assert paths_of(full.val_dataset) == paths_of(small.val_dataset)
    assert not paths_of(small.train_dataset) & paths_of(small.val_dataset)


def test_samples_per_class_larger_than_a_class_names_it(one_folder: Path) -> None:
    dm = ImageFolderDataModule(one_folder, samples_per_class=9)  # dog keeps 8 after val
    with pytest.raises(DataError, match=r"class 'dog' has only 8 .*samples_per_class=9"):
        dm.setup()


def test_train_order_is_seeded(one_folder: Path) -> None:
    def first_labels(seed: int) -> list[int]:
        dm = ImageFolderDataModule(one_folder, seed=seed, batch_size=24, **SMALL)
        return next(iter(dm.train_dataloader()))[1].tolist()

    assert first_labels(0) == first_labels(0)
    assert first_labels(0) != first_labels(1)
    dm = ImageFolderDataModule(one_folder, **SMALL)
    assert [labels.tolist() for _, labels in dm.val_dataloader()] == [sorted(dm.val_dataset.labels.tolist())]


def test_non_rgb_images_become_three_channels(tmp_path: Path) -> None:
    make_split(tmp_path / "train", {"cat": 2})
    odd = tmp_path / "train" / "odd"
    odd.mkdir()
    Image.new("L", (9, 9), 100).save(odd / "gray.png")
    Image.new("RGBA", (9, 9), (10, 220, 30, 40)).save(odd / "alpha.PNG")
    palette = Image.new("P", (9, 9), 1)
    palette.putpalette([0, 0, 0, 250, 5, 5] + [0] * 762)
    palette.save(odd / "palette.gif", transparency=0)
    palette.save(odd / "palette_t.png", transparency=bytes([0, 128] + [255] * 254))  # per-entry alpha
    dm = ImageFolderDataModule(tmp_path, preprocess={"mean": [0, 0, 0], "std": [1, 1, 1]}, **SMALL)
    dm.setup()
    source = dm.train_dataset.source
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when palette transparency is dropped carelessly
        tensors = {p.name: dm.train_dataset.transform(source.load(i)) for i, p in enumerate(source.paths)}
    expected = {
        "gray.png": (100, 100, 100),
        "alpha.PNG": (10, 220, 30),
        "palette.gif": (250, 5, 5),
        "palette_t.png": (250, 5, 5),
    }
    for name, rgb in expected.items():
        assert tensors[name].shape == (3, 8, 8), name
        torch.testing.assert_close(tensors[name][:, 4, 4], torch.tensor(rgb) / 255, atol=3e-3, rtol=0)


def test_eval_transform_handles_single_images_and_tensors() -> None:
    transform = eval_transform(Preprocess(resize_size=12, crop_size=10))
    assert transform(Image.new("LA", (30, 16))).shape == (3, 10, 10)
    assert transform(torch.zeros(1, 16, 30, dtype=torch.uint8)).shape == (3, 10, 10)


def test_random_crop_and_augment_settings(three_splits: Path) -> None:
    default = ImageFolderDataModule(three_splits).train_transform()
    kinds = [type(t) for t in default.transforms]
    assert v2.RandomResizedCrop in kinds and v2.RandomHorizontalFlip in kinds
    fixed = ImageFolderDataModule(three_splits, random_crop_scale=None, augment=[v2.RandomGrayscale(p=1.0)])
    kinds = [type(t) for t in fixed.train_transform().transforms]
    assert v2.RandomResizedCrop not in kinds and v2.CenterCrop in kinds
    assert v2.RandomGrayscale in kinds and v2.RandomHorizontalFlip not in kinds
    with pytest.raises(ConfigError, match="random_crop_scale"):
        ImageFolderDataModule(three_splits, random_crop_scale=(0.8, 0.2))


def test_hidden_and_non_image_files_are_ignored(three_splits: Path, caplog: pytest.LogCaptureFixture) -> None:
    (three_splits / "train" / "cat" / "notes.txt").write_text("x")
    (three_splits / "train" / "eel" / "labels.csv").write_text("x")
    (three_splits / "train" / "eel" / ".DS_Store").write_text("x")
    save_image(three_splits / "train" / "cat" / ".ipynb_checkpoints" / "copy.png")
    save_image(three_splits / "train" / ".hidden" / "x.png")
    with caplog.at_level(logging.INFO, logger="transfer_cases.data"):
        dm = ImageFolderDataModule(three_splits)
    assert dm.classes == ["cat", "dog", "eel"]
    assert len(dm._load_splits().train) == 12
    said = [r.getMessage() for r in caplog.records if "non-image" in r.getMessage()]
    assert said == [f"skipped 2 non-image file(s) under {three_splits / 'train'} (e.g. cat/notes.txt)"]


# --- ImageFolder: errors ----------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data folder not found: .*nowhere.*data\.root="):
        ImageFolderDataModule(tmp_path / "nowhere")


def test_one_class_is_refused_and_named(tmp_path: Path) -> None:
    make_split(tmp_path / "train", {"cat": 2})
    with pytest.raises(DataError, match=r"found 1 class folder\(s\) in .*train \(cat\)"):
        ImageFolderDataModule(tmp_path)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    make_split(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*dog has no images"):
        ImageFolderDataModule(tmp_path)


def test_val_class_missing_from_train_is_named(three_splits: Path) -> None:
    make_split(three_splits / "val", {"fox": 1})
    with pytest.raises(DataError, match=r"val split has class 'fox'"):
        ImageFolderDataModule(three_splits)


def test_val_lacking_a_class_is_logged_and_keeps_labels(
    three_splits: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for path in (three_splits / "val" / "dog").iterdir():
        path.unlink()
    (three_splits / "val" / "dog").rmdir()
    dm = ImageFolderDataModule(three_splits)
    with caplog.at_level(logging.INFO, logger="transfer_cases.data"):
        dm.setup()
        dm.setup("validate")  # said once, not at every setup call
    assert sorted(dm.val_dataset.labels.tolist()) == [0, 0, 2]  # eel keeps label 2
    said = [r for r in caplog.records if "no images of class" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert said[0].getMessage().startswith("the val split has no images of class dog;")


def test_a_class_too_small_to_give_val_an_image_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_split(tmp_path, {"cat": 6, "dog": 1})  # one dog image: it must stay in train
    dm = ImageFolderDataModule(tmp_path)
    with caplog.at_level(logging.WARNING, logger="transfer_cases.data"):
        dm.setup()
    assert "the val split has no images of class dog;" in caplog.text


def test_split_folders_without_train(tmp_path: Path) -> None:
    make_split(tmp_path / "val", {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="no train/ folder"):
        ImageFolderDataModule(tmp_path)


def test_no_test_split(one_folder: Path) -> None:
    dm = ImageFolderDataModule(one_folder)
    with pytest.raises(DataError, match="no test split"):
        dm.test_dataloader()


def test_corrupt_image_is_named_when_loaded(three_splits: Path) -> None:
    bad = three_splits / "train" / "dog" / "001.png"
    bad.write_bytes(b"not a png at all")
    dm = ImageFolderDataModule(three_splits)
    dm.setup()
    index = dm.train_dataset.source.paths.index(bad)
    with pytest.raises(DataError, match=r"001\.png.*delete or replace") as info:
        dm.train_dataset[index]
    assert str(bad) in str(info.value)
    dm.train_dataset[(index + 1) % len(dm.train_dataset)]  # the others still load


def test_check_images_reports_all_bad_files_at_setup(three_splits: Path) -> None:
    bad = [three_splits / "train" / "cat" / "002.png", three_splits / "val" / "eel" / "000.jpg"]
    bad[0].write_bytes(b"\x89PNG garbage")
    bad[1].write_bytes(b"")
    ImageFolderDataModule(three_splits).setup()  # not checked by default
    with pytest.raises(DataError, match=r"2 unreadable image\(s\)") as info:
        ImageFolderDataModule(three_splits, check_images=True).setup()
    assert all(str(path) in str(info.value) for path in bad)


# --- embedded hymenoptera ---------------------------------------------------------------------------


def test_hymenoptera_splits() -> None:
    dm = ImageFolderDataModule(asset_path("hymenoptera"))
    assert dm.classes == ["ants", "bees"]
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (245, 153)
    assert np.bincount(dm.val_dataset.labels).tolist() == [70, 83]
    assert dm.test_dataset is None


def test_hymenoptera_batch() -> None:
    dm = ImageFolderDataModule(asset_path("hymenoptera"), batch_size=3, samples_per_class=2)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 224, 224)
    assert set(labels.tolist()) <= {0, 1}
    assert -3 < images.mean() < 3 and images.std() > 0.1  # normalised natural images


# --- MNIST ------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(10), 5)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_labels[:, None, None] * np.ones((1, 6, 6)) * 20)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 255, (7, 6, 6)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(7))
    return tmp_path


def test_mnist_idx_files_plain_and_gzipped(tiny_mnist: Path) -> None:
    dm = MNISTDataModule(tiny_mnist, preprocess={"mean": [0, 0, 0], "std": [1, 1, 1]}, **SMALL)
    assert dm.classes == [str(d) for d in range(10)]
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (40, 10, 7)
    assert np.bincount(dm.val_dataset.labels).tolist() == [1] * 10  # stratified default 0.1
    image, label = dm.val_dataset[3]
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image, torch.full((3, 8, 8), label * 20 / 255))


def test_mnist_missing_files_are_listed(tiny_mnist: Path) -> None:
    (tiny_mnist / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        DataError, match=r"missing .*: t10k-labels-idx1-ubyte;.*train-images-idx3-ubyte\[\.gz\]"
    ):
        MNISTDataModule(tiny_mnist)


def test_mnist_bad_idx_file_is_named(tiny_mnist: Path) -> None:
    (tiny_mnist / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03junk")
    dm = MNISTDataModule(tiny_mnist)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is not an unsigned-byte idx file"):
        dm.setup()


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"shared MNIST copy not found at {MNIST_DIR}")
def test_real_mnist() -> None:
    dm = MNISTDataModule(MNIST_DIR, image_size=32, batch_size=4)
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 60_000 and len(dm.test_dataset) == 10_000
    assert dm.train_dataset.source.labels[:5].tolist() == [5, 0, 4, 1, 9]
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [7, 2, 1, 0]
    pre = dm.preprocess
    pixels = images * torch.tensor(pre.std)[:, None, None] + torch.tensor(pre.mean)[:, None, None]
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2], atol=1e-5, rtol=0)  # gray in all 3 channels
    assert pixels.max() > 0.9


# --- CIFAR-10 ---------------------------------------------------------------------------------------


def make_cifar_folder(base: Path) -> Path:
    make_split(base / "train", {"cat": 10, "dog": 10}, ext="jpg")
    make_split(base / "test", {"cat": 2, "dog": 3}, ext="jpg")
    return base


def zip_folder(folder: Path, zip_path: Path, prefix: str) -> Path:
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*.jpg")):
            zf.write(path, prefix + path.relative_to(folder).as_posix())
    return zip_path


@pytest.mark.parametrize("layout", ["zip", "zip_no_prefix", "folder_with_zip", "folder", "nested_folder"])
def test_cifar_layouts(tmp_path: Path, layout: str) -> None:
    folder = make_cifar_folder(tmp_path / "extracted" / "cifar10_jpg")
    root = {
        "zip": lambda: zip_folder(folder, tmp_path / "cifar10_jpg.zip", "cifar10_jpg/"),
        "zip_no_prefix": lambda: zip_folder(folder, tmp_path / "c.zip", ""),
        "folder_with_zip": lambda: zip_folder(folder, tmp_path / "cifar10_jpg.zip", "cifar10_jpg/").parent,
        "folder": lambda: folder,
        "nested_folder": lambda: folder.parent,
    }[layout]()
    dm = CIFAR10DataModule(root, **SMALL)
    assert dm.classes == ["cat", "dog"]
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (18, 2, 5)
    image, label = dm.test_dataset[4]
    assert image.shape == (3, 8, 8) and label == 1


def test_cifar_zip_source_survives_pickling_and_workers(tmp_path: Path) -> None:
    root = zip_folder(make_cifar_folder(tmp_path / "x"), tmp_path / "c.zip", "")
    dm = CIFAR10DataModule(root, num_workers=1, batch_size=5, **SMALL)
    dm.setup()
    source = dm.test_dataset.source
    source.load(0)  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(source))
    assert clone._zip is None and clone.load(0).size == (12, 10)
    images, labels = next(iter(dm.test_dataloader()))  # read in a worker process
    assert images.shape == (5, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1, 1]


def test_cifar_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found: .*data\.root="):
        CIFAR10DataModule(tmp_path / "absent.zip")
    with pytest.raises(DataError, match=r"neither train/ and test/ folders nor cifar10_jpg\.zip"):
        CIFAR10DataModule(tmp_path)


@pytest.mark.skipif(not CIFAR_ZIP.is_file(), reason=f"shared CIFAR-10 zip not found at {CIFAR_ZIP}")
def test_real_cifar_zip() -> None:
    dm = CIFAR10DataModule(CIFAR_ZIP, image_size=32, batch_size=4)
    assert dm.classes[:3] == ["airplane", "automobile", "bird"] and dm.num_classes == 10
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (45_000, 5_000, 10_000)
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 0, 0]
