"""Image transforms built from a `Preprocess`, shared by training, evaluation and `transfer-predict`.

Both pipelines start with an RGB conversion so that grayscale (8- and 16-bit), RGBA and palette
images all reach the network as 3 channels of 8 bits, and end with a plain float tensor normalised
the way the weights expect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from transfer_cases.training.preprocess import Preprocess
from transfer_cases.utils.errors import ConfigError, DataError

# 16-bit grayscale (PNG, TIFF, PGM): PIL's own conversion to 8 bit clips at 255, turning a
# 16-bit photo white; 0..65535 is scaled to 0..255 instead. PIL opens some 16-bit files as "I".
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """A 3-channel 8-bit copy of `img`. Palette images with transparency go through RGBA to keep their
    colours; 16-bit grayscale is scaled to 8 bit, float grayscale is read as 0..1. Raises `DataError`
    (without a file name: the caller adds it) for pixels it cannot interpret."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        return _gray_to_8bit(img).convert("RGB")
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise DataError(f"image mode {img.mode} cannot be converted to RGB ({err}); save it as RGB") from err


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    pixels = np.asarray(img)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if img.mode == "F":
        if not (np.isfinite(pixels).all() and low >= 0 and high <= 1):
            raise DataError(
                f"float pixels must lie in 0..1, these span {low:g}..{high:g}; save it as 8- or 16-bit"
            )
        scaled = pixels * 255.0
    else:
        if low < 0 or high > 65535:
            raise DataError(
                f"{img.mode} pixels span {low:g}..{high:g}, outside 16 bit (0..65535); "
                "save it as an 8- or 16-bit image"
            )
        scaled = pixels.astype(np.float64) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # 2-D uint8: mode L


class ToRGB:
    """Transform step: PIL images of any mode, and 1- or 4-channel tensors, become 3-channel RGB."""

    def __call__(self, img: Any) -> Any:
        if isinstance(img, Image.Image):
            return to_rgb(img)
        if isinstance(img, torch.Tensor) and img.ndim >= 3:
            if img.shape[-3] == 1:
                return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).clone()
            if img.shape[-3] == 4:
                return img[..., :3, :, :]
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _resize_center_crop(preprocess: Preprocess) -> list[Callable]:
    return [v2.Resize(preprocess.resize_size, antialias=True), v2.CenterCrop(preprocess.crop_size)]


def _to_normalised_tensor(preprocess: Preprocess) -> list[Callable]:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std)),
        v2.ToPureTensor(),
    ]


def eval_transform(preprocess: Preprocess) -> v2.Compose:
    """Deterministic pipeline for validation, test and single-image prediction: resize, centre crop."""
    return v2.Compose(
        [ToRGB(), *_resize_center_crop(preprocess), v2.ToImage(), *_to_normalised_tensor(preprocess)]
    )


def train_transform(
    preprocess: Preprocess,
    random_crop_scale: Sequence[float] | None = (0.5, 1.0),
    augment: Iterable[Callable] | None = None,
) -> v2.Compose:
    """Training pipeline: a random resized crop (or the eval crop when `random_crop_scale` is None),
    then the `augment` transforms on the uint8 image (so RandAugment & co. work), then normalisation."""
    if random_crop_scale is None:
        crop = _resize_center_crop(preprocess)
    else:
        scale = check_crop_scale(random_crop_scale)
        crop = [v2.RandomResizedCrop(preprocess.crop_size, scale=scale, antialias=True)]
    extra = [v2.RandomHorizontalFlip()] if augment is None else list(augment)
    return v2.Compose([ToRGB(), *crop, v2.ToImage(), *extra, *_to_normalised_tensor(preprocess)])


def check_crop_scale(scale: Sequence[float]) -> tuple[float, float]:
    """`(low, high)` as floats, refused unless 0 < low <= high <= 1 (fractions of the image area)."""
    values = tuple(float(v) for v in scale)
    if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
        raise ConfigError(
            f"data.random_crop_scale={list(values)} is not a (low, high) pair with 0 < low <= high <= 1; "
            "use e.g. [0.5, 1.0], or null for a fixed centre crop"
        )
    return values[0], values[1]
