"""Reading images: high bit depths, modes that cannot be read, files cut short, errors in workers."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import TINY, case_config
from tests.helpers.lightning import save_checkpoint
from tests.test_configs import run_cli
from tests.test_data import make_split
from transfer_cases.commands.cli import friendly_errors
from transfer_cases.data import FileSource, ImageFolderDataModule, SubsetDataset
from transfer_cases.data.sources import open_image, verify_image
from transfer_cases.data.transforms import eval_transform, to_rgb
from transfer_cases.training.module import TransferModule
from transfer_cases.training.preprocess import Preprocess
from transfer_cases.utils.errors import DataError
from transfer_cases.utils.paths import asset_path

ANT = asset_path("hymenoptera") / "train" / "ants" / "0013035.jpg"


def gradient16(shape: tuple[int, int] = (16, 24)) -> np.ndarray:
    """A 16-bit gradient over most of the range, so clipping at 255 would show."""
    return np.linspace(300, 65000, shape[0] * shape[1]).reshape(shape).astype(np.uint16)


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    pixels = gradient16()
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")  # what PIL makes of a 16-bit grayscale PNG
    rgb = np.asarray(open_image(path, str(path)))
    assert rgb.shape == (16, 24, 3) and rgb.dtype == np.uint8
    assert abs(rgb.mean() - pixels.mean() / 257) < 0.6  # clipped, the mean would be 255
    np.testing.assert_allclose(rgb[..., 0], pixels / 257, atol=0.51)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_a_16_bit_png_reaches_the_network_scaled(tmp_path: Path) -> None:
    make_split(tmp_path / "train", {"cat": 2, "dog": 2})
    Image.fromarray(np.full((10, 12), 40000, np.uint16)).save(tmp_path / "train" / "cat" / "deep.png")
    dm = ImageFolderDataModule(tmp_path, preprocess=Preprocess((0, 0, 0), (1, 1, 1), 8, 8), image_size=8)
    dm.setup()
    source = dm.val_dataset.source
    index = source.paths.index(tmp_path / "train" / "cat" / "deep.png")
    tensor = eval_transform(dm.preprocess)(source.load(index))
    assert abs(tensor.mean().item() - round(40000 / 257) / 255) < 1e-3


@pytest.mark.parametrize(
    ("mode", "pixels", "expected"),
    [
        ("I;16", np.array([[0, 257, 65535]], np.uint16), [0, 1, 255]),
        ("I;16B", np.array([[0, 25700, 65535]], ">u2"), [0, 100, 255]),
        ("I;16L", np.array([[0, 25700, 65535]], "<u2"), [0, 100, 255]),
        ("I", np.array([[0, 25700, 65535]], np.int32), [0, 100, 255]),
        ("F", np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
    ],
)
def test_high_bit_depth_modes_are_scaled_to_8_bit(mode: str, pixels: np.ndarray, expected: list[int]) -> None:
    img = Image.frombytes(mode, pixels.shape[::-1], pixels.tobytes())
    assert img.mode == mode
    rgb = np.asarray(to_rgb(img))
    assert rgb[0, :, 1].tolist() == expected


@pytest.mark.parametrize(
    ("mode", "pixels", "reason"),
    [
        ("F", np.array([[0.0, 7.0, 700.0]], "f4"), r"float pixels must lie in 0\.\.1, these span 0\.\.700"),
        ("F", np.array([[0.0, np.nan]], np.float32), r"float pixels must lie in 0\.\.1"),
        ("I", np.array([[-5, 70000]], np.int32), r"I pixels span -5\.\.70000, outside 16 bit"),
    ],
    ids=["float_beyond_1", "float_nan", "int_beyond_16_bit"],
)
def test_pixels_that_cannot_be_interpreted_are_refused_naming_the_file(
    tmp_path: Path, mode: str, pixels: np.ndarray, reason: str
) -> None:
    path = tmp_path / "odd.tif"
    Image.frombytes(mode, pixels.shape[::-1], pixels.tobytes()).save(path)
    with pytest.raises(DataError, match=rf"cannot use image .*odd\.tif: {reason}"):
        open_image(path, str(path))


def truncated_copy(folder: Path, name: str = "cut.jpg") -> Path:
    """The embedded ant photo, cut to half its bytes: PIL's `verify()` still accepts it."""
    data = ANT.read_bytes()
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as img:
        img.verify()  # the reason an extra check is needed
    return path


def test_a_jpeg_cut_in_its_second_half_is_caught_up_front(tmp_path: Path) -> None:
    make_split(tmp_path / "train", {"cat": 3, "dog": 3}, ext="jpg")
    bad = truncated_copy(tmp_path / "train" / "dog")
    dm = ImageFolderDataModule(tmp_path, check_images=True)
    with pytest.raises(DataError, match=r"1 unreadable image\(s\)") as info:
        dm.setup()
    assert f"{bad}: truncated JPEG" in str(info.value)


def test_a_truncated_png_is_caught_up_front(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(gradient16().astype(np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"cut\.png"):
        verify_image(path, str(path))


def test_whole_jpegs_pass_even_with_data_after_the_image(tmp_path: Path) -> None:
    whole = shutil.copy(ANT, tmp_path / "whole.jpg")
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(ANT.read_bytes() + b"\x00" * 100)
    trailer = tmp_path / "motion.jpg"  # e.g. a motion photo: a video after the end-of-image marker
    trailer.write_bytes(ANT.read_bytes() + b"ftypmp42" + bytes(range(256)) * 20)
    size = Image.open(ANT).size
    for path in (Path(whole), padded, trailer):
        assert verify_image(path, str(path)) == size
        assert open_image(path, str(path)).size == size


def test_an_image_error_in_a_dataloader_worker_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = truncated_copy(tmp_path)
    dataset = SubsetDataset(FileSource([bad], [0]), np.array([0]), eval_transform(Preprocess()))

    @friendly_errors
    def run() -> None:
        next(iter(DataLoader(dataset, num_workers=1)))

    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith(f"error: cannot read image {bad} (image file is truncated")
    assert printed.endswith("delete or replace the file")
    assert "\n" not in printed and "Traceback" not in printed


def sideways_photo(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A JPEG stored sideways with EXIF Orientation=6 (turn 90° clockwise to view), as a phone saves
    a photo taken in portrait. Returns the pixels as stored and as the photo is meant to be seen."""
    with Image.open(ANT) as ant:
        stored = ant.convert("RGB").resize((64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as img:
        decoded = img.convert("RGB")  # the pixels as stored, JPEG loss included
    return np.asarray(decoded), np.asarray(decoded.transpose(Image.Transpose.ROTATE_270))


def test_a_photo_stored_sideways_is_read_upright(tmp_path: Path) -> None:
    path = tmp_path / "portrait.jpg"
    stored, upright = sideways_photo(path)
    assert stored.shape == (40, 64, 3) and upright.shape == (64, 40, 3)
    np.testing.assert_array_equal(np.asarray(open_image(path, str(path))), upright)


@pytest.mark.slow  # transfer-predict end to end; the reading itself is tested above
def test_predict_sees_a_sideways_photo_upright(tmp_path: Path) -> None:
    """transfer-predict (and training, through the same `open_image`) classifies what the photo shows:
    the EXIF-oriented JPEG scores as its upright pixels do, not as its stored ones."""
    module = TransferModule(
        backbone=TINY, case=case_config("small_similar"), num_classes=2, class_names=["a", "b"]
    )
    ckpt = save_checkpoint(module, tmp_path / "model.ckpt")
    images = tmp_path / "images"
    images.mkdir()
    stored, upright = sideways_photo(images / "photo.jpg")
    Image.fromarray(upright).save(images / "upright.png")
    Image.fromarray(stored).save(images / "sideways.png")
    run = run_cli("transfer-predict", str(ckpt), str(images), "--out", str(tmp_path / "p.csv"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "p.csv", newline="") as f:
        rows = {Path(r["file"]).name: (r["class"], r["probability"]) for r in csv.DictReader(f)}
    assert rows["photo.jpg"] == rows["upright.png"] != rows["sideways.png"]
