"""The advisor's random control: random weights with BatchNorm statistics estimated on the user's
images, so that its features (and the "unrelated" verdict that rests on them) mean something."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from transfer_cases.advise import control
from transfer_cases.advise.advisor import advise_from_config
from transfer_cases.advise.control import estimate_batchnorm_statistics
from transfer_cases.advise.decoded import DecodedOnce, decoded_once
from transfer_cases.features.cached import cached_features
from transfer_cases.features.extract import EXTRACTIONS
from transfer_cases.features.store import FeatureStore


def conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm2d(4))


def test_batchnorm_statistics_are_the_average_batch_statistics_and_nothing_else_changes() -> None:
    model = conv_bn().eval()
    first, last = model[1], model[4]
    last.momentum = 0.3
    params = {k: v.clone() for k, v in model.named_parameters()}
    batches = [torch.randn(8, 3, 6, 6) * 3 + 2 for _ in range(2)]

    assert estimate_batchnorm_statistics(model, batches) == 2

    conv_out = [model[0](x).detach() for x in batches]
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv_out])
    variances = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in conv_out])
    torch.testing.assert_close(first.running_mean, means.mean(0))  # a cumulative average, not a
    torch.testing.assert_close(first.running_var, variances.mean(0))  # momentum-weighted one
    assert int(first.num_batches_tracked) == 2
    # The layer after: the statistics of what it saw, normalised by the batches' own statistics
    # (train mode), and dropout stayed off (the ReLU output, unscaled).
    seen = [
        torch.relu(nn.functional.batch_norm(c, None, None, first.weight, first.bias, True)) for c in conv_out
    ]
    torch.testing.assert_close(last.running_mean, torch.stack([s.mean(dim=(0, 2, 3)) for s in seen]).mean(0))
    # No parameter moved; modes and momenta are as they were.
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert not any(m.training for m in model.modules())
    assert (first.momentum, last.momentum) == (0.1, 0.3)


def test_an_estimate_stopped_by_an_error_restores_modes_and_momenta() -> None:
    model = conv_bn().eval()

    def batches():
        yield torch.randn(4, 3, 6, 6)
        raise RuntimeError("unreadable image")

    with pytest.raises(RuntimeError, match="unreadable image"):
        estimate_batchnorm_statistics(model, batches())
    assert not any(m.training for m in model.modules()) and model[1].momentum == 0.1


def test_the_control_of_the_embedded_mobilenet_has_features_at_its_last_stage(
    compose_train: Callable[..., DictConfig],
) -> None:
    cfg = compose_train(
        "data=hymenoptera", "backbone=mobilenet_v2", "advisor.max_per_class=10", config_name="advise"
    )
    advice, timings = advise_from_config(cfg)
    last = advice.stages[-1]
    # With its initial BatchNorm statistics, the random MobileNetV2's last stage was ~1e-8 whatever
    # the image: the probe guessed one class in every fold (balanced folds of 2 + 2 images: 0.500 ±
    # 0.000). Now it sees the images.
    assert last.probe_random_std > 0  # its folds disagree: the features differ from image to image
    assert advice.control.startswith("random init (torch seed ")
    assert advice.control.endswith("BatchNorm statistics estimated on 20 training images (eval transform)")
    assert timings["control_batchnorm_cache_hit"] == 0.0
    again, timings = advise_from_config(cfg)  # the statistics and the control's features are cached
    assert timings["control_batchnorm_cache_hit"] == 1.0 and timings["extract_random_cache_hit"] == 1.0
    assert again.stages == advice.stages


def test_the_control_is_calibrated_on_evenly_spaced_images_of_every_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "CALIBRATION_IMAGES", 4)
    labels = [0] * 6 + [1] * 6  # listed class by class, as an image folder lists them
    data = Listed(labels)
    seen, hit = control.calibrated_control(
        conv_bn(), data, FeatureStore(tmp_path), device=torch.device("cpu"), numerics=EXTRACTIONS["fp32"]
    )
    assert (seen, hit) == (4, False)
    assert data.read == [0, 4, 7, 11]  # spread over the list: both classes, not the first four
    # Fewer images than the bound: all of them.
    monkeypatch.setattr(control, "CALIBRATION_IMAGES", 100)
    data = Listed(labels)
    assert control.calibrated_control(
        conv_bn(),
        data,
        FeatureStore(tmp_path / "all"),
        device=torch.device("cpu"),
        numerics=EXTRACTIONS["fp32"],
    ) == (12, False)
    assert data.read == list(range(12))


def test_the_advisors_images_are_decoded_once_for_its_passes_and_never_on_a_warm_cache(
    tmp_path: Path,
) -> None:
    data = Listed([0, 1] * 5)
    once = DecodedOnce(data, num_workers=0)
    assert (once.fingerprint(), once.transform, len(once)) == (data.fingerprint(), data.transform, 10)
    store = FeatureStore(tmp_path)
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    numerics = EXTRACTIONS["fp32"]
    streamed, hit, _ = cached_features(store, body, data, device=torch.device("cpu"), numerics=numerics)
    assert not hit and data.read == list(range(10))
    # A warm cache: the same key, and nothing decoded.
    data.read.clear()
    cached, hit, _ = cached_features(store, body, once, device=torch.device("cpu"), numerics=numerics)
    assert hit and data.read == [] and torch.equal(cached.features, streamed.features)
    # Cold: each image read once however many passes read the decoded set.
    cold, hit, _ = cached_features(
        FeatureStore(tmp_path / "cold"), body, once, device=torch.device("cpu"), numerics=numerics
    )
    assert once[3][0].shape == (3, 6, 6) and data.read == list(range(10))
    assert not hit and torch.equal(cold.features, streamed.features)
    # Too large for memory: the dataset itself, streamed by the loader's workers.
    assert decoded_once(data, crop_size=100_000, num_workers=2) == (data, 2)
    assert isinstance(decoded_once(data, crop_size=6, num_workers=2)[0], DecodedOnce)


class Listed(torch.utils.data.Dataset):
    """Seeded random 3x6x6 images with `labels`, recording which items were read."""

    transform = "eval transform"

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels
        self.images = torch.randn(len(labels), 3, 6, 6, generator=torch.Generator().manual_seed(0))
        self.read: list[int] = []

    def fingerprint(self) -> str:
        return f"listed {self.labels}"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.read.append(int(i))
        return self.images[i], self.labels[i]
