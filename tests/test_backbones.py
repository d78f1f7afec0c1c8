"""Declared stages: every supported torchvision backbone against its table and its own classifier input."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchvision import models

from tests.conftest import TINY, case_config
from transfer_cases.backbones import TorchvisionBackbone
from transfer_cases.backbones.check import check_stages
from transfer_cases.backbones.staged import StagedBody
from transfer_cases.backbones.tables import markdown
from transfer_cases.backbones.torchvision_zoo import SUPPORTED, TABLE_OF, staged_body
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.errors import ConfigError, WeightsError

BACKBONES_DOC = Path(__file__).resolve().parents[1] / "docs" / "backbones.md"
# One or two per table (but EfficientNetV2-M/L), cheap to construct; the rest (up to 150M parameters)
# run with `make test-all`.
FAST = {
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "convnext_tiny",
    "densenet121",
}
ARCHS = [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in SUPPORTED]
SIZE = 64


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_backbone_matches_its_table_and_its_classifier_input(arch: str) -> None:
    table = TABLE_OF[arch]
    model = models.get_model(arch, weights=None).eval()
    body = staged_body(model, arch).eval()
    widths = list(table.widths[arch])
    assert (body.depth, body.widths, body.strides) == (len(table.stages), widths, list(table.strides))
    assert body.feature_info == [
        {"num_chs": w, "reduction": s, "module": f"stages.{i}"}
        for i, (w, s) in enumerate(zip(widths, table.strides, strict=True))
    ]
    x = torch.randn(2, 3, SIZE, SIZE)
    shapes, h = [], x
    with torch.no_grad():
        for stage in body.stages:
            h = stage(h)
            shapes.append(tuple(h.shape))
    assert shapes == [(2, w, SIZE // s, SIZE // s) for w, s in zip(widths, table.strides, strict=True)]

    # The full body is the architecture up to its final Linear: pooling, DenseNet's ReLU, the neck.
    seen = []
    model.get_submodule(table.classifier).register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
    with torch.no_grad():
        model(x)
        features = body.stage_features(x)
        out = body(x)
    torch.testing.assert_close(out, seen[0], rtol=1e-5, atol=1e-5)
    assert body.out_features == (table.neck_width or widths[-1]) == out.shape[1]
    assert torch.equal(features[-1], out)
    assert [tuple(f.shape) for f in features] == [(2, w) for w in widths[:-1]] + [(2, body.out_features)]
    assert any(k.startswith("neck.") for k in body.state_dict()) == bool(
        [p for n in table.neck for p in model.get_submodule(n).parameters()]
    )

    # Every cut: k stages, pooled by global average, the neck gone.
    for k in range(1, body.depth):
        cut = body.cut(k)
        assert (cut.depth, cut.out_features) == (k, widths[k - 1])
        assert not any(key.startswith("neck.") for key in cut.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(cut(x), features[k - 1])
    assert body.cut(body.depth) is body and body.cut(None) is body


@pytest.mark.parametrize("arch", ["swin_t", "vit_b_16", "vgg16", "regnet_y_400mf", "maxvit_t"])
def test_unsupported_torchvision_arch_is_refused_by_name(arch: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{arch}' is a torchvision model whose stages are not declared"):
        TorchvisionBackbone(arch, weights=None)


def test_unknown_arch_lists_the_supported_ones_and_timm() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone arch 'resnet19'.*densenet121.*backbone=timm"):
        TorchvisionBackbone("resnet19")


def _conv(c_in: int, c_out: int) -> nn.Module:
    return nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)


class _ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def test_check_refuses_wrong_declarations_and_channels_last_maps() -> None:
    check_stages(StagedBody([_conv(3, 4), _conv(4, 8)], [4, 8], [2, 4], name="ok"))
    with pytest.raises(ConfigError, match=r"wide: stage 1 \(declared width 6, stride 4\) returns shape"):
        check_stages(StagedBody([_conv(3, 4), _conv(4, 8)], [4, 6], [2, 4], name="wide"))
    with pytest.raises(ConfigError, match=r"stage 1 \(declared width 8, stride 8\) returns shape"):
        check_stages(StagedBody([_conv(3, 4), _conv(4, 8)], [4, 8], [2, 8], name="strided"))
    swin_like = StagedBody([_conv(3, 4), nn.Sequential(_conv(4, 8), _ToChannelsLast())], [4, 8], [2, 4])
    with pytest.raises(ConfigError, match=r"stage 1 .* returns channels-last \(B, H, W, C\) maps"):
        check_stages(swin_like)


def test_stage_features_keep_the_frozen_prefix_out_of_autograd() -> None:
    module = TransferModule(backbone=TINY, case={**case_config("large_similar"), "freeze": 1}, num_classes=2)
    body = module.backbone
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    features = body.stage_features(x)
    assert [f.requires_grad for f in features] == [False, True, True]
    assert [tuple(f.shape) for f in features] == [(2, w) for w in body.widths]
    torch.testing.assert_close(
        features[1], F.adaptive_avg_pool2d(body.stages[1](body.stages[0](x)), 1).flatten(1)
    )
    assert torch.equal(features[-1], body(x))


def test_mobilenet_v3_neck_is_frozen_with_the_full_body_and_trained_otherwise(tmp_path: Path) -> None:
    weights = tmp_path / "mnv3.pth"
    torch.save(models.mobilenet_v3_small().state_dict(), weights)
    backbone = {"_target_": "transfer_cases.backbones.TorchvisionBackbone", "arch": "mobilenet_v3_small"}
    backbone["weights"] = str(weights)
    frozen = TransferModule(backbone=backbone, case=case_config("small_similar"), num_classes=2)
    assert frozen.head[-1].in_features == 1024
    neck = frozen.backbone.neck
    assert isinstance(neck[0], nn.Linear) and not any(p.requires_grad for p in neck.parameters())
    assert {"neck.0.weight", "neck.0.bias"} <= frozen.backbone.frozen_state().keys()
    frozen.train()
    assert not neck.training
    trained = TransferModule(backbone=backbone, case=case_config("large_similar"), num_classes=2)
    assert all(p.requires_grad for p in trained.backbone.neck.parameters())
    assert torch.equal(trained.backbone.neck[0].weight, neck[0].weight)  # the pretrained 576→1024 layer


def test_a_cut_checkpoint_cannot_initialise_a_fuller_body(tmp_path: Path) -> None:
    cut = TransferModule(backbone=TINY, case=case_config("small_different"), num_classes=3)
    trainer = L.Trainer(logger=False, max_epochs=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(cut)
    trainer.save_checkpoint(tmp_path / "cut.ckpt")
    from_cut = {**TINY, "weights": str(tmp_path / "cut.ckpt")}
    for case in ("small_similar", "large_similar"):
        with pytest.raises(WeightsError) as err:
            TransferModule(backbone=from_cut, case=case_config(case), num_classes=2)
        message = str(err.value)
        assert "cut.ckpt holds a body cut to 2 of 3 stages, but this case keeps 3" in message
        assert "case.keep=2" in message and "full body" in message
    same_cut = TransferModule(backbone=from_cut, case=case_config("small_different"), num_classes=2)
    assert same_cut.backbone.depth == 2
    held = same_cut.backbone.state_dict()
    assert all(torch.equal(held[k], v) for k, v in cut.backbone.state_dict().items())
    shorter = TransferModule(
        backbone=from_cut, case={**case_config("small_different"), "keep": 1}, num_classes=2
    )
    assert shorter.backbone.depth == 1


def test_the_neck_is_expected_from_a_full_body_checkpoint_only(tmp_path: Path) -> None:
    body = TorchvisionBackbone("mobilenet_v3_small", weights=None).build(pretrained=False)
    mnv3 = {"_target_": "transfer_cases.backbones.TorchvisionBackbone", "arch": "mobilenet_v3_small"}
    # A checkpoint of a cut body has no neck, and initialises the same cut.
    cut = {f"backbone.{k}": v for k, v in body.cut(-1).state_dict().items()}
    torch.save({"state_dict": cut}, tmp_path / "cut.ckpt")
    module = TransferModule(
        backbone={**mnv3, "weights": str(tmp_path / "cut.ckpt")},
        case=case_config("small_different"),
        num_classes=2,
    )
    assert all(torch.equal(module.backbone.state_dict()[k[9:]], v) for k, v in cut.items())
    # One from before the neck was kept (all stages, no `neck.*`) would leave the neck random.
    old = {f"backbone.{k}": v for k, v in body.state_dict().items() if not k.startswith("neck.")}
    torch.save({"state_dict": old}, tmp_path / "old.ckpt")
    with pytest.raises(
        WeightsError, match=r"old\.ckpt does not fit mobilenet_v3_small: .*missing \['neck\.0"
    ):
        TorchvisionBackbone("mobilenet_v3_small", weights=str(tmp_path / "old.ckpt")).build()


def test_docs_tables_are_the_declared_ones() -> None:
    assert markdown() in BACKBONES_DOC.read_text(), "run: python -m transfer_cases.backbones.tables"
