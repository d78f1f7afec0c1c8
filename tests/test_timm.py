"""timm backbones: stages from feature_info against timm's own outputs, the four cases, weights files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from tests.conftest import CASES, case_config
from tests.test_configs import run_cli
from transfer_cases.backbones.weights_file import save_weights_file
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.config import instantiate_clean
from transfer_cases.utils.errors import ConfigError, WeightsError

timm = pytest.importorskip("timm")
from transfer_cases.backbones.timm_zoo import TimmBackbone, staged_body  # noqa: E402

# A ResNet, two of the EfficientNet/MobileNet family (one with layers after its last stage, one with
# a conv head after pooling) and a ConvNeXt (LayerNorm in its head): all small, all offline.
MODELS = ["resnet10t", "efficientnet_b0", "mobilenetv3_small_050", "convnext_atto"]
STEP_MODELS = ["resnet10t", "mobilenetv3_small_050", "convnext_atto"]
SIZE = 64


def timm_cfg(name: str, weights: str | None) -> dict:
    return {"_target_": "transfer_cases.backbones.TimmBackbone", "name": name, "weights": weights}


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model's random-init timm state dict (classifier included), as timm would ship it."""
    folder = tmp_path_factory.mktemp("timm")
    files = {}
    for name in STEP_MODELS:
        torch.manual_seed(1)
        files[name] = folder / f"{name}.pth"
        torch.save(timm.create_model(name).state_dict(), files[name])
    return files


@pytest.mark.parametrize("name", MODELS)
def test_timm_body_matches_feature_info_and_pre_logits(name: str) -> None:
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        maps = model.forward_intermediates(x, intermediates_only=True)
    info = model.feature_info
    model.reset_classifier(0)
    body = staged_body(model, f"timm/{name}").eval()
    assert body.widths == [f["num_chs"] for f in info] and body.strides == [f["reduction"] for f in info]
    assert [tuple(m.shape) for m in maps] == [
        (2, w, SIZE // s, SIZE // s) for w, s in zip(body.widths, body.strides, strict=True)
    ]
    with torch.no_grad():
        features = body.stage_features(x)
        out = body(x)
    torch.testing.assert_close(out, pre_logits, rtol=1e-5, atol=1e-5)
    assert body.out_features == out.shape[1] == pre_logits.shape[1]
    assert torch.equal(features[-1], out)
    for i, m in enumerate(maps[:-1]):
        torch.testing.assert_close(features[i], m.mean((2, 3)), rtol=1e-5, atol=1e-5)
    for k in range(1, body.depth):
        cut = body.cut(k)
        assert (cut.depth, cut.out_features) == (k, body.widths[k - 1])
        assert not any(key.startswith("pool.") for key in cut.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(cut(x), features[k - 1])
    # The body holds every parameter timm's pre-logits path uses, and nothing else.
    assert {id(p) for p in body.parameters()} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", STEP_MODELS)
@pytest.mark.parametrize("root_training", [True, False], ids=["root-train", "root-eval"])
def test_drop_rate_follows_the_body_train_and_eval(name: str, root_training: bool) -> None:
    """timm's forward_head reads the root model's `training` flag: it must follow the body's, whatever
    mode the root model was left in."""
    torch.manual_seed(0)
    model = timm.create_model(name, drop_rate=0.5)
    model.reset_classifier(0)
    body = staged_body(model, f"timm/{name}")
    model.train(root_training)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        body.eval()
        first, second = body(x), body(x)
        state = {k: v.clone() for k, v in body.state_dict().items()}
        body.train()
        dropped = [body(x) for _ in range(2)]
        body.load_state_dict(state)  # train mode moved the BatchNorm statistics
        body.eval()
        again = body(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # Train mode: the same values before dropout (batch statistics), but other elements zeroed each call.
    kept = (dropped[0] != 0) & (dropped[1] != 0)
    torch.testing.assert_close(dropped[0][kept], dropped[1][kept])
    assert ((dropped[0] == 0) != (dropped[1] == 0)).float().mean() > 0.1
    assert model.training == root_training  # the root model's own flag is left as it was


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers() if "running_" in n or "num_batches" in n}


@pytest.mark.parametrize("name", STEP_MODELS)
@pytest.mark.parametrize("case", CASES)
def test_each_case_trains_a_step_with_the_frozen_part_frozen(
    weights_files: dict[str, Path], name: str, case: str
) -> None:
    module = TransferModule(
        backbone=timm_cfg(name, str(weights_files[name])), case=case_config(case), num_classes=3
    )
    body = module.backbone
    expected_depth = body.full_depth - 1 if case == "small_different" else body.full_depth
    expected_frozen = body.depth if case.startswith("small") else 0
    assert (body.depth, body.num_frozen) == (expected_depth, expected_frozen)
    frozen = body.frozen_state()
    frozen_before = {k: v.clone() for k, v in frozen.items()}
    assert all(not v.requires_grad for v in frozen.values() if v.is_floating_point())
    head_before = module.head[-1].weight.clone()
    module.train()
    assert all(not m.training for s in body.stages[: body.num_frozen] for m in s.modules())
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    trainable_bn = bn_buffers(body.stages[body.num_frozen :])
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    module.loss(module(x), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert all(torch.equal(v, frozen_before[k]) for k, v in body.frozen_state().items())
    assert not torch.equal(module.head[-1].weight, head_before)
    assert all(p.grad is None for p in body.parameters() if not p.requires_grad)
    if trainable_bn:
        after = bn_buffers(body.stages[body.num_frozen :])
        assert any(not torch.equal(after[k], v) for k, v in trainable_bn.items())


def _reference_body_state(name: str, path: Path) -> dict[str, torch.Tensor]:
    model = timm.create_model(name)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.reset_classifier(0)
    return staged_body(model, f"timm/{name}").state_dict()


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "weights_file"])
def test_file_weights_round_trip(tmp_path: Path, weights_files: dict[str, Path], fmt: str) -> None:
    name = "convnext_atto"
    state = torch.load(weights_files[name], weights_only=True)
    path = tmp_path / f"model.{fmt if fmt != 'weights_file' else 'pt'}"
    if fmt == "pth":
        torch.save(state, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        meta = {"mean": [0.5] * 3, "std": [0.25] * 3, "resize_size": 40, "crop_size": 32}
        save_weights_file(path, state, arch=f"timm/{name}", meta=meta, half=False)
    body = TimmBackbone(name, weights=str(path)).build()
    expected = _reference_body_state(name, weights_files[name])
    loaded = body.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    if fmt == "weights_file":
        assert (body.preprocess.crop_size, body.preprocess.std) == (32, (0.25,) * 3)
    else:  # timm's eval transform for convnext_atto: 224 crop, crop_pct 0.875 → resize 256
        cfg = timm.data.resolve_model_data_config(timm.create_model(name))
        assert body.preprocess.crop_size == cfg["input_size"][-1]
        assert body.preprocess.resize_size == int(cfg["input_size"][-1] / cfg["crop_pct"])
        assert body.preprocess.mean == tuple(cfg["mean"])


def test_a_checkpoint_of_a_timm_run_initialises_a_task_with_other_classes(
    tmp_path: Path, weights_files: dict[str, Path]
) -> None:
    backbone = timm_cfg("resnet10t", str(weights_files["resnet10t"]))
    three = TransferModule(backbone=backbone, case=case_config("large_similar"), num_classes=3)
    trainer = L.Trainer(logger=False, max_epochs=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(three)
    trainer.save_checkpoint(tmp_path / "three.ckpt")
    loaded = TransferModule.load_from_checkpoint(tmp_path / "three.ckpt", weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    three.eval(), loaded.eval()
    assert torch.equal(loaded(x), three(x))
    two = TransferModule(
        backbone=timm_cfg("resnet10t", str(tmp_path / "three.ckpt")),
        case=case_config("small_similar"),
        num_classes=2,
    )
    same = two.backbone.state_dict()
    assert all(torch.equal(same[k], v) for k, v in three.backbone.state_dict().items())
    with pytest.raises(WeightsError, match=r"three\.ckpt does not fit timm/convnext_atto"):
        TransferModule(
            backbone=timm_cfg("convnext_atto", str(tmp_path / "three.ckpt")),
            case=case_config("small_similar"),
            num_classes=2,
        )


def test_offline_pretrained_names_the_model_and_the_local_file_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(*_: object, **__: object) -> None:
        calls.append(1)
        raise LocalEntryNotFoundError("cannot reach the Hugging Face hub")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)  # where build_model_with_cfg looks
    with pytest.raises(WeightsError) as err:
        TimmBackbone("resnet10t").build()
    message = str(err.value)
    assert calls == [1]
    assert "timm's pretrained weights for 'resnet10t'" in message
    assert "backbone.weights=/path/to/resnet10t.safetensors" in message


def test_random_init_and_scratch_need_no_weights() -> None:
    module = TransferModule(
        backbone=timm_cfg("resnet10t", "pretrained"),
        case={**case_config("large_different"), "init": "scratch"},
        num_classes=2,
    )  # init=scratch: `pretrained` is not downloaded
    assert all(p.requires_grad for p in module.parameters())
    with pytest.raises(ConfigError, match=r"backbone.weights is null for timm/resnet10t"):
        TimmBackbone("resnet10t", weights=None).build()
    with pytest.raises(ConfigError, match=r"backbone.weights=imagenet for timm/resnet10t: give pretrained"):
        TimmBackbone("resnet10t", weights="imagenet").build()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("vit_tiny_patch16_224", "is not supported as a staged body"),
        ("resnet19x", "unknown timm model 'resnet19x'"),
    ],
    ids=["vit_tiny_patch16_224", "resnet19x"],
)
def test_unsupported_or_unknown_timm_models_are_refused_by_name(name: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=rf"{reason}"):
        TimmBackbone(name, weights=None).build(pretrained=False)


class _NotAChain(nn.Module):
    """timm-shaped, but `forward_features` computes between or after its modules."""

    def __init__(self, scale_between: bool) -> None:
        super().__init__()
        self.scale_between = scale_between
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.feature_info = [
            {"num_chs": 8, "reduction": 2, "module": "stem"},
            {"num_chs": 16, "reduction": 4, "module": "stage"},
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_between:
            return self.stage(self.stem(x) * 2)
        return self.stage(self.stem(x)) * 2

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean((2, 3))


@pytest.mark.parametrize(
    ("scale_between", "reason"),
    [(True, "stage 1 does not reproduce timm's feature map"), (False, "the full body does not reproduce")],
    ids=["computes_between_stages", "computes_after_the_last"],
)
def test_a_model_that_is_not_a_chain_of_its_modules_is_refused(scale_between: bool, reason: str) -> None:
    with pytest.raises(ConfigError, match=rf"timm model 'fake' is not supported as a staged body: {reason}"):
        staged_body(_NotAChain(scale_between), "timm/fake")


def test_without_timm_the_backbone_asks_for_the_extra(
    monkeypatch: pytest.MonkeyPatch, compose_train: Callable[..., DictConfig]
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    cfg = compose_train("backbone=timm", "backbone.name=resnet10t")
    with pytest.raises(ConfigError, match=r'backbone=timm needs the timm extra: pip install -e "\.\[timm\]"'):
        instantiate_clean(cfg.backbone)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_ddp_cpu_two_processes_on_a_timm_model(tmp_path: Path, image_folder: Path) -> None:
    weights = tmp_path / "resnet10t.pt"
    meta = {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_size": 32, "crop_size": 32}
    save_weights_file(weights, timm.create_model("resnet10t").state_dict(), arch="timm/resnet10t", meta=meta)
    guard_dir = tmp_path / "guard"
    run = run_cli(
        "transfer-train",
        "trainer=ddp_cpu",
        "case=small_different",
        "backbone=timm",
        "backbone.name=resnet10t",
        f"backbone.weights={weights}",
        f"data.root={image_folder}",
        "data.num_workers=0",
        "data.batch_size=2",
        "trainer.max_epochs=2",
        "callbacks.progress_bar.refresh_rate=0",
        f"+callbacks.freeze_guard.report_dir={guard_dir}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "find_unused_parameters=True" not in run.stderr and "did not receive grad" not in run.stderr
    reports = [json.loads(p.read_text()) for p in sorted(guard_dir.glob("freeze_guard_rank*.json"))]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["start"] == r["end"] for r in reports) and reports[0]["start"] == reports[1]["start"]
    assert all(r["find_unused_parameters"] is False for r in reports)
