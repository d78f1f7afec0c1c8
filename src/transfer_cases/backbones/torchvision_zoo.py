"""torchvision architectures as staged bodies: the one place that knows each architecture's layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision import models

from transfer_cases.backbones.staged import StagedBody
from transfer_cases.backbones.weights import is_weights_path, load_torchvision_weights, load_weights_path
from transfer_cases.errors import ConfigError
from transfer_cases.preprocess import Preprocess


def _resnet_blocks(m: nn.Module) -> list[nn.Module]:
    return [nn.Sequential(m.conv1, m.bn1, m.relu), m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4]


def _features_blocks(m: nn.Module) -> list[nn.Module]:
    return list(m.features)


# arch -> (blocks in order, neck applied after pooling). Architectures with a `features` Sequential
# (MobileNets, EfficientNets, VGG, ...) need no entry: they fall back to `_features_blocks`.
_LAYOUTS: dict[
    str, tuple[Callable[[nn.Module], list[nn.Module]], Callable[[nn.Module], nn.Module] | None]
] = {
    **{a: (_resnet_blocks, None) for a in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{a: (_features_blocks, lambda m: m.classifier[0]) for a in ("convnext_tiny", "convnext_small")},
}

SUPPORTED = sorted(
    {
        *_LAYOUTS,
        "mobilenet_v2",
        "mobilenet_v3_large",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "efficientnet_b1",
    }
)


@dataclass
class TorchvisionBackbone:
    """A torchvision classifier turned into a staged body.

    Args:
        arch: torchvision model name (`resnet18`, `mobilenet_v2`, ...).
        weights: torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`), a local file path, or None.
    """

    arch: str
    weights: str | None = "DEFAULT"

    def __post_init__(self) -> None:
        if self.arch not in models.list_models(module=models):
            raise ConfigError(
                f"unknown backbone arch '{self.arch}'. Supported: {', '.join(SUPPORTED)} "
                "(other torchvision classifiers with a `features` module work too)"
            )

    def build(self, pretrained: bool = True) -> StagedBody:
        """Build the body, loading the weights when `pretrained` (else random initialisation)."""
        if pretrained and not self.weights:
            raise ConfigError(
                f"the case starts from pretrained weights but backbone.weights is null for {self.arch}; "
                "give a weights name or file, or train from scratch with case.init=scratch"
            )
        model = models.get_model(self.arch, weights=None)
        preprocess, body_state = Preprocess(), None
        if pretrained:
            if is_weights_path(str(self.weights)):
                preprocess, body_state = load_weights_path(model, self.arch, self.weights)
            else:
                preprocess = load_torchvision_weights(model, self.arch, str(self.weights))
        blocks_of, neck_of = _LAYOUTS.get(self.arch, (_features_blocks, None))
        if blocks_of is _features_blocks and not hasattr(model, "features"):
            raise ConfigError(
                f"backbone arch '{self.arch}' has no stage layout; supported: {', '.join(SUPPORTED)}"
            )
        body = StagedBody.from_blocks(
            blocks_of(model), neck=neck_of(model) if neck_of else None, preprocess=preprocess, name=self.arch
        )
        if body_state is not None:
            body.load_body_state(body_state, str(self.weights))
        return body
