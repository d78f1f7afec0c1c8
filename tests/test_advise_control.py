"""The advisor's random control: random weights with BatchNorm statistics estimated on the user's
images, so that its features (and the "unrelated" verdict that rests on them) mean something."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from transfer_cases.advise.advisor import advise_from_config
from transfer_cases.advise.control import estimate_batchnorm_statistics


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
