"""timm models as staged bodies: stages from timm's `feature_info`, checked against timm itself.

The model's children (a top-level `nn.Sequential` opened where a `feature_info` module lies in
it) are grouped, in the order `forward_features` runs them, into stages that end at each
`feature_info` module. What runs after the last stage in `forward_features` (EfficientNet's `conv_head`,
ConvNeXt's `norm_pre`) and `forward_head(x, pre_logits=True)` form the full body's pooling. At
build, one small input checks that every stage reproduces timm's own feature map and the full body
timm's pre-logits features; a model for which that fails is refused by name, never half-supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import torch
from torch import nn

from transfer_cases.backbones.builder import BackboneBuilder
from transfer_cases.backbones.check import CHECK_SIZE, check_stages, eval_no_grad
from transfer_cases.backbones.staged import StagedBody
from transfer_cases.training.preprocess import Preprocess
from transfer_cases.utils.errors import ConfigError, WeightsError

PRETRAINED = "pretrained"


def import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError('backbone=timm needs the timm extra: pip install -e ".[timm]"') from None
    return timm


class TimmPreLogits(nn.Module):
    """The full body's pooling: the rest of `forward_features`, then `forward_head(pre_logits=True)`.

    `head` registers the model's head modules here (their parameters are the body's); the model's
    own `forward_head` is kept as a plain callable so it runs them the way timm does. That method
    reads the root model's own `training` flag (ResNet's and EfficientNet's `drop_rate` dropout), and
    the root is no submodule here (its parameters are the stages'), so each call lends it this
    module's flag: `.train()`/`.eval()` on the body switch that dropout too.
    """

    def __init__(
        self, tail: list[nn.Module], head: dict[str, nn.Module], forward_head: Callable[..., torch.Tensor]
    ) -> None:
        super().__init__()
        self.tail = nn.Sequential(*tail)
        self.head = nn.ModuleDict(head)
        self.forward_head = forward_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tail(x)
        owner = getattr(self.forward_head, "__self__", None)
        if not isinstance(owner, nn.Module):
            return self.forward_head(x, pre_logits=True)
        before, owner.training = owner.training, self.training
        try:
            return self.forward_head(x, pre_logits=True)
        finally:
            owner.training = before


@dataclass
class TimmBackbone(BackboneBuilder):
    """A timm model turned into a staged body (`backbone=timm backbone.name=<model>`).

    Args:
        name: timm model name, optionally with a pretrained tag (`resnet18`, `convnext_atto.d2_in1k`).
        weights: `pretrained` (timm's weights by name, downloaded and cached by the Hugging Face hub),
            a local file (timm `.pth`/`.safetensors`, a weights file or checkpoint of this project),
            or None for random initialisation.
    """

    name: str = "resnet18"
    weights: str | None = PRETRAINED
    weights_example: ClassVar[str | None] = f"backbone.weights={PRETRAINED} or a local file"
    checks_own_stages: ClassVar[bool] = True  # staged_body names the model in a failed check

    def __post_init__(self) -> None:
        timm = import_timm()
        if not timm.is_model(self.name):
            raise ConfigError(
                f"unknown timm model '{self.name}'; list the names with "
                f"python -c \"import timm; print(timm.list_models('{self.name[:4]}*'))\""
            )

    @property
    def arch(self) -> str:
        return f"timm/{self.name}"

    def create(self, named_weights: bool) -> tuple[nn.Module, Preprocess, tuple[str, ...]]:
        if named_weights and self.weights != PRETRAINED:
            raise ConfigError(
                f"backbone.weights={self.weights} for {self.arch}: give {PRETRAINED} (timm's weights), "
                "a path to a local file, or null"
            )
        model = self._create(named_weights)
        classifier = model.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        model.reset_classifier(0)  # the case puts its own head on; this keeps only pre-logits layers
        return model, timm_preprocess(model), tuple(c + "." for c in classifier)

    def stage(self, model: nn.Module, preprocess: Preprocess) -> StagedBody:
        return staged_body(model, self.arch, preprocess)

    def _create(self, from_hub: bool) -> nn.Module:
        timm = import_timm()
        try:
            return timm.create_model(self.name, pretrained=from_hub)
        except OSError as e:  # the hub's offline and not-found errors are OSErrors
            raise WeightsError(
                f"could not download timm's pretrained weights for '{self.name}' "
                f"({e.__class__.__name__}: {_first_line(e)}).\n"
                "This machine seems to be offline. Either run once on a connected machine "
                f"python -c \"import timm; timm.create_model('{self.name}', pretrained=True)\" and copy "
                "its Hugging Face cache (~/.cache/huggingface) here, or give a local file: "
                f"backbone.weights=/path/to/{self.name}.safetensors (a timm .pth/.safetensors state dict, "
                "or a weights file or checkpoint of this project)"
            ) from None


def timm_preprocess(model: nn.Module) -> Preprocess:
    """Resize, crop and normalisation from the model's `pretrained_cfg`, as timm's eval transform."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    crop = int(cfg["input_size"][-1])
    return Preprocess(
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        resize_size=math.floor(crop / cfg.get("crop_pct", 1.0)),
        crop_size=crop,
    )


def staged_body(model: nn.Module, arch: str, preprocess: Preprocess | None = None) -> StagedBody:
    """The staged body of a timm `model` (its classifier already reset), sharing its modules."""
    try:
        body, reference = _stage(model, arch, preprocess)
        check_stages(body)
    except ConfigError as e:
        raise _refuse(arch, str(e)) from None
    except Exception as e:  # an unusual model fails here loudly, by name, not later and silently
        raise _refuse(arch, f"{e.__class__.__name__}: {_first_line(e)}") from None
    _check_reproduces(body, *reference)
    return body


def _stage(
    model: nn.Module, arch: str, preprocess: Preprocess | None
) -> tuple[StagedBody, tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]:
    info = list(model.feature_info)
    ends = [f["module"] for f in info]
    children = _flat_children(model, ends)
    top = dict(model.named_children())
    x = torch.randn(1, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    order: list[str] = []
    maps: dict[str, torch.Tensor] = {}
    ran_head: list[str] = []

    def record(name: str, into: list[str]) -> Callable[..., None]:
        def hook(_: nn.Module, __: Any, out: Any) -> None:
            into.append(name)
            if isinstance(out, torch.Tensor):
                maps[name] = out.clone()

        return hook

    handles = [m.register_forward_hook(record(n, order)) for n, m in children.items()]
    with eval_no_grad(model):
        try:
            features = model.forward_features(x)
            for h in handles:
                h.remove()
            handles = [m.register_forward_hook(record(n, ran_head)) for n, m in top.items()]
            pre_logits = model.forward_head(features, pre_logits=True)
        finally:
            for h in handles:
                h.remove()
    if len(set(order)) != len(order):
        raise ConfigError("forward_features runs a module more than once")
    if list(model.named_parameters(recurse=False)) or list(model.named_buffers(recurse=False)):
        raise ConfigError("the model has parameters outside its modules")
    if not all(e in order for e in ends) or [order.index(e) for e in ends] != sorted(
        order.index(e) for e in ends
    ):
        raise ConfigError(f"its feature_info modules {ends} are not modules forward_features runs in order")
    bounds = [0] + [order.index(e) + 1 for e in ends]
    stages = [_chain([children[n] for n in order[a:b]]) for a, b in pairwise(bounds)]
    pool = TimmPreLogits(
        [children[n] for n in order[bounds[-1] :]], {n: top[n] for n in ran_head}, model.forward_head
    )
    body = StagedBody(
        stages,
        [f["num_chs"] for f in info],
        [f["reduction"] for f in info],
        pool=pool,
        full_features=int(pre_logits.shape[-1]),
        preprocess=preprocess,
        name=arch,
    )
    return body, (x, [maps[e] for e in ends], pre_logits)


def _check_reproduces(
    body: StagedBody, x: torch.Tensor, stage_maps: list[torch.Tensor], pre_logits: torch.Tensor
) -> None:
    """Each stage's map and the full body's output must be timm's own (same modules, same order)."""
    with eval_no_grad(body):
        h = x
        for i, (stage, expected) in enumerate(zip(body.stages, stage_maps, strict=True)):
            h = stage(h)
            if not _close(h, expected):
                raise _refuse(body.name, f"stage {i} does not reproduce timm's feature map")
        if not _close(body.neck(body.pool(h)).flatten(1), pre_logits):
            raise _refuse(body.name, "the full body does not reproduce forward_head(..., pre_logits=True)")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _refuse(arch: str, reason: str) -> ConfigError:
    return ConfigError(
        f"timm model '{arch.removeprefix('timm/')}' is not supported as a staged body: {reason.rstrip('.')}. "
        "Its stages come from timm's feature_info and must run as a chain of its modules with "
        "(B, C, H, W) outputs, as ResNet, EfficientNet, MobileNet, ConvNeXt, RegNet and DenseNet "
        "models do; choose another model"
    )


def _flat_children(model: nn.Module, ends: list[str]) -> dict[str, nn.Module]:
    """Top-level children, a `nn.Sequential` opened where a feature_info module lies inside it."""
    flat = {}
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and any(e.startswith(f"{name}.") for e in ends):
            flat.update({f"{name}.{n}": c for n, c in child.named_children()})
        else:
            flat[name] = child
    return flat


def _chain(parts: list[nn.Module]) -> nn.Module:
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]
