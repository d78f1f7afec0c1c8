"""The embedded ImageNet MobileNetV2: right answers in eval mode, and BatchNorm that also works in train mode.

The weights come from a TF-Lite file whose BatchNorm was folded away; the converter re-estimated the
BatchNorm statistics so that fine-tuning (train mode) sees what eval mode sees. These tests load the shipped
file the way users do (`load_weights_file` + a plain torchvision `mobilenet_v2`) and need no network.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

from transfer_cases.backbones.weights_file import load_weights_file
from transfer_cases.convert.tflite_mobilenet import (
    SHARED_DIR,
    TFLITE_NAME,
    convert_tflite_mobilenet_v2,
    reestimate_batchnorm,
    set_identity_batchnorm,
)
from transfer_cases.utils.paths import asset_path

WEIGHTS = asset_path("mobilenet_v2_imagenet.pt")
SAMPLES = Path(__file__).parent / "assets" / "imagenet_samples"
HYMENOPTERA_VAL = asset_path("hymenoptera/val")
BEE, ANT = 309, 310  # ImageNet-1k indices in torchvision order (checked against the labels below)


def _transform(meta: dict, whole_frame: bool = False) -> v2.Compose:
    """The preprocessing the weights file asks for; `whole_frame` squashes the image to the crop instead."""
    crop = meta["crop_size"]
    resize = (
        [v2.Resize((crop, crop))] if whole_frame else [v2.Resize(meta["resize_size"]), v2.CenterCrop(crop)]
    )
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            *resize,
            v2.Normalize(meta["mean"], meta["std"]),
        ]
    )


def _load(paths: list[Path], meta: dict, whole_frame: bool = False) -> Tensor:
    transform = _transform(meta, whole_frame)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


@torch.no_grad()
def _logits(model: nn.Module, images: Tensor) -> Tensor:
    # eval mode does not depend on the batch, and small batches stay in the CPU caches (2-4x faster)
    return torch.cat([model(batch) for batch in images.split(8)])


def _bee_not_ant(logits: Tensor) -> Tensor:
    """The ant-vs-bee decision read off the ImageNet logits (True = bee)."""
    return logits[:, BEE] > logits[:, ANT]


@pytest.fixture(scope="module")
def shipped() -> tuple[nn.Module, dict]:
    wf = load_weights_file(WEIGHTS)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(wf.state_dict)
    return model.eval(), wf.meta


@pytest.fixture(scope="module")
def val(shipped: tuple[nn.Module, dict]) -> tuple[Tensor, Tensor, Tensor]:
    """Hymenoptera val images, their labels (True = bee) and the shipped model's eval-mode logits."""
    model, meta = shipped
    paths = sorted(HYMENOPTERA_VAL.glob("*/*.jpg"))
    images = _load(paths, meta)
    labels = torch.tensor([p.parent.name == "bees" for p in paths])
    return images, labels, _logits(model, images)


def _comparison_images(val: tuple[Tensor, Tensor, Tensor], n: int = 32) -> tuple[Tensor, Tensor]:
    """A val slice spanning both classes (sorted: ants first), with its shipped logits."""
    images, _, logits = val
    idx = torch.linspace(0, len(images) - 1, n).long()
    return images[idx], logits[idx]


def test_file_and_meta(shipped: tuple[nn.Module, dict]) -> None:
    _, meta = shipped
    assert WEIGHTS.stat().st_size <= 8 * 2**20
    assert (meta["mean"], meta["std"]) == ([0.5] * 3, [0.5] * 3)
    assert (meta["resize_size"], meta["crop_size"]) == (256, 224)
    assert len(meta["categories"]) == 1000 and meta["categories"][0].startswith("tench")
    assert meta["categories"][BEE] == "bee" and meta["categories"][ANT].startswith("ant,")
    assert "104342d2d3480b3e66203073dac24f4e2dbb4c41" in meta["source"] and "Apache-2.0" in meta["source"]
    assert meta["bn_reestimated_on"]


def test_reestimation_kept_eval_outputs(
    shipped: tuple[nn.Module, dict], val: tuple[Tensor, Tensor, Tensor]
) -> None:
    """Re-estimation may move BatchNorm statistics and bias but must keep each layer's eval-mode scale at 1.

    Putting the shipped layers back into the converter's identity-plus-bias form (same offset, scale 1)
    must then leave the eval-mode logits as they are, up to float16 storage. Whether that form equals
    the TF-Lite network is checked against a fresh conversion in the next test, where the file is at hand.
    """
    model, _ = shipped
    refolded = copy.deepcopy(model)
    for bn in (m for m in refolded.modules() if isinstance(m, nn.BatchNorm2d)):
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        torch.testing.assert_close(scale, torch.ones_like(scale), atol=2e-3, rtol=0)
        set_identity_batchnorm(bn, bn.bias - scale * bn.running_mean)
    images, shipped_logits = _comparison_images(val)
    refolded_logits = _logits(refolded, images)
    assert torch.equal(refolded_logits.argmax(1), shipped_logits.argmax(1))
    torch.testing.assert_close(refolded_logits, shipped_logits, atol=0.15, rtol=0)


@pytest.mark.skipif(not (SHARED_DIR / TFLITE_NAME).is_file(), reason="TF-Lite source file not available")
def test_fresh_conversion_matches_shipped(val: tuple[Tensor, Tensor, Tensor]) -> None:
    """The shipped weights compute what the plain (BatchNorm-folded) conversion computes, in eval mode."""
    images, shipped_logits = _comparison_images(val)
    fresh_logits = _logits(convert_tflite_mobilenet_v2(SHARED_DIR / TFLITE_NAME), images)
    assert torch.equal(fresh_logits.argmax(1), shipped_logits.argmax(1))
    # float16 storage of weights and of the re-estimated BatchNorm; logits span about +-20
    torch.testing.assert_close(fresh_logits, shipped_logits, atol=0.15, rtol=0)


def test_train_mode_agrees_with_eval(
    shipped: tuple[nn.Module, dict], val: tuple[Tensor, Tensor, Tensor]
) -> None:
    """With train-mode BatchNorm on shuffled batches of 32, the ant-vs-bee call mostly stays the same.

    Folded as-is, about half of the calls flip (chance level). A copy runs in train mode so the shipped
    model's running statistics stay untouched; its ImageNet head stays in eval mode, because its dropout
    is not what is under test (fine-tuning replaces the head).
    """
    model, _ = shipped
    images, _, eval_logits = val
    before = copy.deepcopy(model.state_dict())
    # channels-last halves the CPU time of these 32-image batches
    probe = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
    probe.classifier.eval()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train_logits = torch.empty_like(eval_logits)
    with torch.no_grad():
        for idx in order.split(32):
            train_logits[idx] = probe(images[idx].contiguous(memory_format=torch.channels_last))
    agreement = (_bee_not_ant(train_logits) == _bee_not_ant(eval_logits)).float().mean().item()
    assert agreement >= 0.90, f"train/eval ant-vs-bee agreement {agreement:.1%}"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# grace_hopper: with the standard Resize 256 + CenterCrop 224 the crop cuts away most of the uniform and
# leaves the cap, so 'mortarboard' wins (0.44) and 'military uniform' ranks 9th; squashing the whole frame
# to 224 px (as Coral's reference classifier feeds the TF-Lite model) gives 'military uniform' top-1 with a
# clear margin (0.34 vs 0.21). The other three are top-1 with the standard preprocessing (p >= 0.78).
@pytest.mark.parametrize(
    ("name", "expected", "whole_frame"),
    [
        ("cat.jpg", "Egyptian cat", False),
        ("grace_hopper.jpg", "military uniform", True),
        ("parrot.jpg", "macaw", False),
        ("hot_dog.jpg", "hotdog, hot dog, red hot", False),
    ],
)
def test_sample_top1(shipped: tuple[nn.Module, dict], name: str, expected: str, whole_frame: bool) -> None:
    model, meta = shipped
    logits = _logits(model, _load([SAMPLES / name], meta, whole_frame))
    assert meta["categories"][logits.argmax(1).item()] == expected


def test_ant_bee_accuracy_from_imagenet_logits(val: tuple[Tensor, Tensor, Tensor]) -> None:
    _, labels, logits = val
    accuracy = (_bee_not_ant(logits) == labels).float().mean().item()
    assert accuracy >= 0.90, f"ant-vs-bee accuracy {accuracy:.1%}"


def test_reestimate_batchnorm_keeps_eval_and_fixes_train_mode() -> None:
    """On any conv + BatchNorm net with off statistics: eval outputs stay, train mode comes to match them."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
    ).eval()
    for bn in (model[1], model[4]):  # statistics that do not describe the data, like a folded BatchNorm's
        bn.weight.data.uniform_(0.5, 2.0)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    data = torch.randn(64, 3, 12, 12) * 3 + 1
    with torch.no_grad():
        eval_before = model(data)
        train_before = copy.deepcopy(model).train()(data)
    reestimate_batchnorm(model, data.split(16))
    assert not model.training
    fresh = torch.randn(64, 3, 12, 12) * 3 + 1  # same distribution, images not used for calibration
    with torch.no_grad():
        eval_after = model(data)
        fresh_eval = model(fresh)
        fresh_train = copy.deepcopy(model).train()(fresh)
    torch.testing.assert_close(eval_after, eval_before, atol=1e-4, rtol=1e-4)
    gap_before = (train_before - eval_before).abs().mean() / eval_before.abs().mean()
    gap_after = (fresh_train - fresh_eval).abs().mean() / fresh_eval.abs().mean()
    assert gap_before > 0.3 and gap_after < 0.05, (gap_before, gap_after)
