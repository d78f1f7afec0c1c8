"""torchvision architectures as staged bodies: each family's stages, declared in one table.

A stage lists the torchvision modules it runs (dotted paths in the model, in forward order) and
ends where the resolution next halves, so its output stride is that of timm's `feature_info`.
A stage of one module is that module; a longer one is an `nn.Sequential` of them, so the state
dict reads `stages.<i>.<j>...`. `neck` lists the classifier layers before the final Linear that
belong to the pretrained body (kept with the full body only); `classifier` is that final Linear.
`python -m transfer_cases.backbones.tables` prints these tables as docs/backbones.md shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torchvision import models
from torchvision.models.convnext import LayerNorm2d

from transfer_cases.backbones.builder import BackboneBuilder
from transfer_cases.backbones.staged import StagedBody
from transfer_cases.backbones.weights import load_torchvision_weights
from transfer_cases.training.preprocess import Preprocess
from transfer_cases.utils.errors import ConfigError


@dataclass(frozen=True)
class StageTable:
    family: str
    stages: tuple[tuple[str, ...], ...]
    widths: dict[str, tuple[int, ...]]  # arch -> output channels of each stage
    classifier: str
    strides: tuple[int, ...] = (2, 4, 8, 16, 32)
    neck: tuple[str, ...] = ()
    neck_width: int | None = None  # output width of the neck, when it changes the last stage's
    note: str = field(default="", compare=False)


def _f(first: int, last: int | None = None) -> tuple[str, ...]:
    """`features.<first>` .. `features.<last>`."""
    return tuple(f"features.{i}" for i in range(first, (first if last is None else last) + 1))


# torchvision's DenseNet.forward applies a functional ReLU after `features`; the body needs it as a module.
FUNCTIONAL = {"F.relu": lambda: nn.ReLU(inplace=True)}

_RESNET_WIDE = (64, 256, 512, 1024, 2048)
_EFFICIENTNET_STAGES = (_f(0, 1), _f(2), _f(3), _f(4, 5), _f(6, 8))
_MBV2 = {"mobilenet_v2": (16, 24, 32, 96, 1280)}
_MBV3L = {"mobilenet_v3_large": (16, 24, 40, 112, 960)}
_MBV3S = {"mobilenet_v3_small": (16, 16, 24, 48, 576)}
# MobileNetV3's classifier: the pretrained neck (Linear, Hardswish) before the final Linear.
_MBV3_HEAD = ("classifier.3", (2, 4, 8, 16, 32), ("classifier.0", "classifier.1"))
_EFFV2S = {"efficientnet_v2_s": (24, 48, 64, 160, 1280)}
_EFFV2ML = {"efficientnet_v2_m": (24, 48, 80, 176, 1280), "efficientnet_v2_l": (32, 64, 96, 224, 1280)}

TABLES: tuple[StageTable, ...] = (
    StageTable(
        family="ResNet",
        stages=(("conv1", "bn1", "relu"), ("maxpool", "layer1"), ("layer2",), ("layer3",), ("layer4",)),
        widths={
            "resnet18": (64, 64, 128, 256, 512),
            "resnet34": (64, 64, 128, 256, 512),
            "resnet50": _RESNET_WIDE,
            "resnet101": _RESNET_WIDE,
            "resnet152": _RESNET_WIDE,
            "resnext50_32x4d": _RESNET_WIDE,
            "resnext101_32x8d": _RESNET_WIDE,
            "resnext101_64x4d": _RESNET_WIDE,
            "wide_resnet50_2": _RESNET_WIDE,
            "wide_resnet101_2": _RESNET_WIDE,
        },
        classifier="fc",
    ),
    # One line per family where the table is short: the family, its stages, widths and classifier.
    StageTable("MobileNetV2", (_f(0, 1), _f(2, 3), _f(4, 6), _f(7, 13), _f(14, 18)), _MBV2, "classifier.1"),
    StageTable(
        "MobileNetV3-Large", (_f(0, 1), _f(2, 3), _f(4, 6), _f(7, 12), _f(13, 16)), _MBV3L, *_MBV3_HEAD, 1280
    ),
    StageTable("MobileNetV3-Small", (_f(0), _f(1), _f(2, 3), _f(4, 8), _f(9, 12)), _MBV3S, *_MBV3_HEAD, 1024),
    StageTable(
        family="EfficientNet",
        stages=_EFFICIENTNET_STAGES,
        widths={
            "efficientnet_b0": (16, 24, 40, 112, 1280),
            "efficientnet_b1": (16, 24, 40, 112, 1280),
            "efficientnet_b2": (16, 24, 48, 120, 1408),
            "efficientnet_b3": (24, 32, 48, 136, 1536),
            "efficientnet_b4": (24, 32, 56, 160, 1792),
            "efficientnet_b5": (24, 40, 64, 176, 2048),
            "efficientnet_b6": (32, 40, 72, 200, 2304),
            "efficientnet_b7": (32, 48, 80, 224, 2560),
        },
        classifier="classifier.1",
    ),
    StageTable("EfficientNetV2-S", (_f(0, 1), _f(2), _f(3), _f(4, 5), _f(6, 7)), _EFFV2S, "classifier.1"),
    StageTable("EfficientNetV2-M/L", _EFFICIENTNET_STAGES, _EFFV2ML, "classifier.1"),
    StageTable(
        family="ConvNeXt",
        stages=(_f(0, 1), _f(2, 3), _f(4, 5), _f(6, 7)),
        strides=(4, 8, 16, 32),
        widths={
            "convnext_tiny": (96, 192, 384, 768),
            "convnext_small": (96, 192, 384, 768),
            "convnext_base": (128, 256, 512, 1024),
            "convnext_large": (192, 384, 768, 1536),
        },
        classifier="classifier.2",
        neck=("classifier.0",),
    ),
    StageTable(
        family="DenseNet",
        stages=(
            ("features.conv0", "features.norm0", "features.relu0"),
            ("features.pool0", "features.denseblock1"),
            ("features.transition1", "features.denseblock2"),
            ("features.transition2", "features.denseblock3"),
            ("features.transition3", "features.denseblock4", "features.norm5", "F.relu"),
        ),
        widths={
            "densenet121": (64, 256, 512, 1024, 1024),
            "densenet161": (96, 384, 768, 2112, 2208),
            "densenet169": (64, 256, 512, 1280, 1664),
            "densenet201": (64, 256, 512, 1792, 1920),
        },
        classifier="classifier",
        note="`F.relu` is the ReLU that `DenseNet.forward` applies after `features`.",
    ),
)

TABLE_OF: dict[str, StageTable] = {arch: t for t in TABLES for arch in t.widths}
SUPPORTED = sorted(TABLE_OF)


def table_of(arch: str) -> StageTable:
    """The stage table of `arch`; `ConfigError` naming the supported archs for any other."""
    if arch in TABLE_OF:
        return TABLE_OF[arch]
    known = arch in models.list_models(module=models)
    raise ConfigError(
        (
            f"backbone arch '{arch}' is a torchvision model whose stages are not declared here"
            if known
            else f"unknown backbone arch '{arch}'"
        )
        + f". Supported: {', '.join(SUPPORTED)}. "
        "For other architectures use a timm model: backbone=timm backbone.name=<model>"
    )


def staged_body(model: nn.Module, arch: str, preprocess: Preprocess | None = None) -> StagedBody:
    """The staged body of a torchvision `model` of `arch`, sharing its modules, checked once."""
    table = table_of(arch)
    stages = [_chain(model, names) for names in table.stages]
    neck = _chain(model, table.neck) if table.neck else None
    body = StagedBody(
        stages,
        table.widths[arch],
        table.strides,
        neck=_on_vectors(neck) if neck is not None else None,
        full_features=table.neck_width,
        preprocess=preprocess,
        name=arch,
    )
    return body


def _chain(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    parts = [FUNCTIONAL[n]() if n in FUNCTIONAL else model.get_submodule(n) for n in names]
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _on_vectors(neck: nn.Module) -> nn.Module:
    """The neck runs on pooled (B, C) vectors: ConvNeXt's LayerNorm2d becomes the same LayerNorm."""
    if not isinstance(neck, LayerNorm2d):
        return neck
    norm = nn.LayerNorm(neck.normalized_shape, eps=neck.eps)
    norm.weight, norm.bias = neck.weight, neck.bias  # shared: keys stay `neck.weight`, `neck.bias`
    return norm


@dataclass
class TorchvisionBackbone(BackboneBuilder):
    """A torchvision classifier turned into a staged body.

    Args:
        arch: torchvision model name (`resnet18`, `mobilenet_v2`, ...; see `SUPPORTED`).
        weights: torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`), a local file path, or None.
    """

    arch: str
    weights: str | None = "DEFAULT"

    def __post_init__(self) -> None:
        table_of(self.arch)

    def create(self, named_weights: bool) -> tuple[nn.Module, Preprocess, tuple[str, ...]]:
        model = models.get_model(self.arch, weights=None)
        preprocess = (
            load_torchvision_weights(model, self.arch, str(self.weights)) if named_weights else Preprocess()
        )
        return model, preprocess, (table_of(self.arch).classifier + ".",)

    def stage(self, model: nn.Module, preprocess: Preprocess) -> StagedBody:
        return staged_body(model, self.arch, preprocess)
