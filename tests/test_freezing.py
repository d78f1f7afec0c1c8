"""Frozen means frozen: plain-PyTorch tests of every case on the tiny CNN and the real MobileNetV2."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from tests.conftest import CASES, MOBILENET, TINY, case_config
from transfer_cases.training.module import TransferModule

BACKBONES = {"tiny": (TINY, 32), "mobilenet_v2": (MOBILENET, 64)}


def make(backbone: str, case: str, num_classes: int = 3) -> tuple[TransferModule, int]:
    cfg, size = BACKBONES[backbone]
    return TransferModule(backbone=cfg, case=case_config(case), num_classes=num_classes), size


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buf.clone()
        for name, buf in module.named_buffers()
        if "running_" in name or "num_batches" in name
    }


def expected_frozen_stages(case: str, depth: int) -> int:
    return {"small_similar": depth, "small_different": depth, "large_similar": 0, "large_different": 0}[case]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("case", CASES)
def test_exactly_intended_parameters_require_grad(backbone: str, case: str) -> None:
    module, _ = make(backbone, case)
    body = module.backbone
    n_frozen = expected_frozen_stages(case, body.depth)
    assert body.num_frozen == n_frozen
    for i, stage in enumerate(body.stages):
        flags = {p.requires_grad for p in stage.parameters()}
        assert flags == {i >= n_frozen}, f"stage {i}"
    assert all(p.requires_grad for p in module.head.parameters())
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("case", CASES)
def test_optimizer_steps_change_only_trainable_state(backbone: str, case: str) -> None:
    module, size = make(backbone, case)
    module.train()
    frozen_stages = module.backbone.stages[: module.backbone.num_frozen]
    frozen_params = {n: p.clone() for n, p in frozen_stages.named_parameters()}
    frozen_bn = bn_buffers(frozen_stages)
    trainable_before = {n: p.clone() for n, p in module.named_parameters() if p.requires_grad}
    trainable_bn = bn_buffers(module.backbone.stages[module.backbone.num_frozen :])
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        optimizer.zero_grad()
        module.loss(module(x), y).backward()
        optimizer.step()
    for name, value in frozen_params.items():
        assert torch.equal(dict(frozen_stages.named_parameters())[name], value), name
    for name, value in bn_buffers(frozen_stages).items():
        assert torch.equal(frozen_bn[name], value), f"frozen BN buffer {name} moved"
    current = dict(module.named_parameters())
    assert all(not torch.equal(current[n], v) for n, v in trainable_before.items() if n.startswith("head"))
    changed_body = [
        n for n, v in trainable_before.items() if n.startswith("backbone") and not torch.equal(current[n], v)
    ]
    assert bool(changed_body) == (module.backbone.num_frozen < module.backbone.depth)
    if trainable_bn:  # trainable stages in train mode do update their BatchNorm statistics
        after = bn_buffers(module.backbone.stages[module.backbone.num_frozen :])
        assert any(not torch.equal(after[n], v) for n, v in trainable_bn.items())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_frozen_stages_stay_in_eval_mode_through_train_calls(backbone: str) -> None:
    module, _ = make(backbone, "small_different")
    for _ in range(2):
        module.train()
        assert all(not m.training for stage in module.backbone.stages for m in stage.modules())
        assert module.head.training
        module.eval()
        module.train(True)
    assert all(not m.training for m in module.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def reference_modes(module: TransferModule) -> dict[str, bool]:
    """What `.train()` must give, by the slow obvious route: everything in train mode, then each
    frozen part (and, with bn_mode eval, every BatchNorm layer of the body) back in eval mode."""
    ref = copy.deepcopy(module)
    nn.Module.train(ref, True)
    body = ref.backbone
    for stage in body.stages[: body.num_frozen]:
        stage.eval()
    if body.fully_frozen:
        body.pool.eval()
        body.neck.eval()
    if body.bn_eval:
        for m in body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return {name: m.training for name, m in ref.named_modules()}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("freeze", ["all", 2, 1, "none"])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_train_sets_every_module_as_the_obvious_route_does(
    backbone: str, freeze: object, bn_mode: str
) -> None:
    cfg, _ = BACKBONES[backbone]
    case = {**case_config("large_similar"), "freeze": freeze, "bn_mode": bn_mode, "body_lr_scale": 0.1}
    module = TransferModule(backbone=cfg, case=case, num_classes=3)
    expected = reference_modes(module)
    for _ in range(2):  # from any mode, any number of times
        module.eval()
        assert not any(m.training for m in module.modules())
        module.train()
        assert {name: m.training for name, m in module.named_modules()} == expected
    # Modes set behind `train()`'s back (as Lightning's mode restore does), frozen modules included,
    # on every module or only on the innermost ones (a part itself may look in eval mode):
    for setting in ("all", "innermost", "none"):
        for m in module.modules():
            m.training = setting == "all" or (setting == "innermost" and not any(m.children()))
        module.train()
        assert {name: m.training for name, m in module.named_modules()} == expected
        for m in module.modules():
            m.training = True
        module.eval()
        assert not any(m.training for m in module.modules())


def test_train_follows_a_change_of_freezing() -> None:
    """The frozen parts' module lists are kept between calls: a new freezing must not use stale ones."""
    cfg, _ = BACKBONES["mobilenet_v2"]
    case = {**case_config("large_similar"), "freeze": 3, "body_lr_scale": 0.1}
    module = TransferModule(backbone=cfg, case=case, num_classes=3)
    body = module.backbone
    for frozen in (1, 4, body.depth, 0, 2):
        body.freeze(frozen)
        module.eval()
        module.train()
        assert {name: m.training for name, m in module.named_modules()} == reference_modes(module)


PARTIAL = {"name": "partial", "init": "pretrained", "keep": None, "freeze": 2, "body_lr_scale": 0.1}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("case", ["small_similar", "partial"])
def test_backward_never_enters_the_frozen_prefix(backbone: str, case: str) -> None:
    cfg, size = BACKBONES[backbone]
    case_cfg = PARTIAL if case == "partial" else case_config(case)
    module = TransferModule(backbone=cfg, case=case_cfg, num_classes=3)
    body = module.backbone
    entered: list[int] = []
    for i, stage in enumerate(body.stages[: body.num_frozen]):
        stage.register_full_backward_hook(lambda *_, i=i: entered.append(i))
    module.train()
    # An input that requires grad: were the frozen prefix not run under no_grad, backward would go
    # through it to reach the input (when trainable stages follow it), frozen parameters or not.
    x = torch.randn(2, 3, size, size, requires_grad=True)
    module.loss(module(x), torch.tensor([0, 1])).backward()
    assert entered == [] and x.grad is None
    assert all(p.grad is None for p in body.stages[: body.num_frozen].parameters())
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_small_different_cuts_the_body_and_sizes_the_head(backbone: str) -> None:
    full, size = make(backbone, "small_similar")
    cut, _ = make(backbone, "small_different")
    assert cut.backbone.depth == full.backbone.depth - 1  # keep: -1 in configs/case/small_different.yaml
    assert cut.backbone.out_features == full.backbone.widths[-2]
    assert cut.head[-1].in_features == cut.backbone.out_features
    features = cut.backbone(torch.randn(2, 3, size, size))
    assert features.shape == (2, cut.backbone.out_features)
    assert cut(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_scratch_init_differs_from_pretrained() -> None:
    pretrained, _ = make("mobilenet_v2", "large_different")
    scratch = TransferModule(
        backbone=MOBILENET, case={**case_config("large_different"), "init": "scratch"}, num_classes=3
    )
    p = dict(pretrained.backbone.named_parameters())
    s = dict(scratch.backbone.named_parameters())
    assert p.keys() == s.keys()
    assert all(not torch.equal(p[k], s[k]) for k in p if p[k].dim() > 1)
    assert all(q.requires_grad for q in scratch.parameters())


def test_param_groups_scale_the_body_learning_rate() -> None:
    module, _ = make("tiny", "large_similar")
    groups = {g["name"]: g for g in module.param_groups()}
    assert groups["body"]["lr"] == pytest.approx(
        groups["head"]["lr"] * case_config("large_similar")["body_lr_scale"]
    )
    frozen_only, _ = make("tiny", "small_similar")
    assert [g["name"] for g in frozen_only.param_groups()] == ["head"]


def test_a_fifth_case_in_yaml_terms_freezes_a_prefix_only() -> None:
    case = {"name": "gradual", "init": "pretrained", "keep": None, "freeze": 2, "body_lr_scale": 0.5}
    module = TransferModule(backbone=TINY, case=case, num_classes=2)
    assert [all(not p.requires_grad for p in s.parameters()) for s in module.backbone.stages] == [
        True,
        True,
        False,
    ]
    module.train()
    assert [s.training for s in module.backbone.stages] == [False, False, True]
    before = copy.deepcopy(module.backbone.stages[0].state_dict())
    out = module(torch.randn(4, 3, 32, 32))
    module.loss(out, torch.tensor([0, 1, 0, 1])).backward()
    assert module.backbone.stages[2][0].weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in module.backbone.stages[0].state_dict().items())


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("case", CASES)
def test_checkpoint_round_trip_restores_split_and_predictions(
    tmp_path: Path, backbone: str, case: str
) -> None:
    module, size = make(backbone, case)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module.train()
    module.loss(module(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()  # the checkpoint must hold trained weights, not re-derivable ones
    trainer = L.Trainer(logger=False, max_epochs=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = TransferModule.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    assert loaded.backbone.depth == module.backbone.depth
    assert loaded.backbone.num_frozen == module.backbone.num_frozen
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in module.parameters()]
    assert [g["name"] for g in loaded.param_groups()] == [g["name"] for g in module.param_groups()]
    x = torch.randn(2, 3, size, size)
    module.eval(), loaded.eval()
    assert torch.equal(module(x), loaded(x))
