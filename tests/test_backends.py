"""The engine of frozen-body passes (`cache.backend`): onnxruntime's features equal torch fp32's within
1e-4, the backend is part of the cache key, the exported body is kept and reused, and every way
onnxruntime can fail (not installed, a body that does not export, a model it cannot run or that
computes something else) falls back to torch with one warning or is one clear error."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

import transfer_cases.features.cached as cache_module
from tests.conftest import TINY
from tests.test_features import cached, hits, weights_file
from transfer_cases.advise.advisor import AllStages
from transfer_cases.data import ImageFolderDataModule
from transfer_cases.features import FeatureCache, FeatureStore, cached_features, onnx_body
from transfer_cases.features.backend import AUTO_MIN_PIXELS, choose_backend
from transfer_cases.features.extract import EXTRACTIONS, resolve_extraction
from transfer_cases.utils.config import instantiate_clean
from transfer_cases.utils.errors import ConfigError

pytest.importorskip("onnxruntime")
CPU = torch.device("cpu")
TOL = 1e-4  # fp32 on two runtimes: rounding only


@pytest.fixture(autouse=True)
def _fresh_process() -> None:
    """Each test exports and loads its own body and logs its own fallback (both once per process)."""
    onnx_body._SESSIONS.clear()
    cache_module._warned.clear()


@pytest.fixture
def setup(tmp_path: Path, image_folder: Path) -> tuple[Path, Path, Path]:
    return tmp_path, image_folder, weights_file(tmp_path / "w.pt")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_onnxruntime_features_match_torch_fp32_and_have_their_own_key(
    setup: tuple[Path, Path, Path],
) -> None:
    root, images, weights = setup
    _, on_torch = cached(root, images, weights, backend="torch")
    _, on_ort = cached(root, images, weights, backend="onnxruntime")
    assert on_ort.report["backend"] == "onnxruntime"
    assert on_ort.report["extraction"] == on_ort.report["eval_extraction"] == "onnxruntime_fp32"
    assert hits(on_ort) == {"train": False, "val": False}  # not torch's files: the key names the backend
    for split in ("train_dataset", "val_dataset"):
        a, b = getattr(on_torch, split).tensors, getattr(on_ort, split).tensors
        assert torch.equal(a[1], b[1]) and max_diff(a[0], b[0]) <= TOL
        assert a[0].abs().max() > 0.01  # features of some size, not zeros matching zeros
    paths = {f["path"] for d in (on_torch, on_ort) for f in d.report["files"].values()}
    assert len(paths) == 4
    assert len(list((root / "cache" / "onnx").glob("*.onnx"))) == 1  # one body, exported once


def test_the_exported_body_is_reused_by_later_runs(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, images, weights = setup
    cached(root, images, weights, backend="onnxruntime")
    onnx_body._SESSIONS.clear()  # a new process: only the file remains

    def no_export(*_: Any) -> bytes:
        raise AssertionError("the body was exported again")

    monkeypatch.setattr(onnx_body, "export_body", no_export)
    # Another view of the data: features not cached, so the body runs, from the kept model.
    _, again = cached(root, images, weights, backend="onnxruntime", train_views=1)
    assert hits(again) == {"train view 1/1": False, "val": True}
    assert again.report["extraction"] == "onnxruntime_fp32"


def test_a_body_with_other_weights_is_exported_again_and_runs_its_own_weights(
    setup: tuple[Path, Path, Path],
) -> None:
    """The exported model is keyed by the body's weights: a body of the same architecture with other
    weights (a resume restores other weights into the same layers) never runs the first export."""
    root, images, weights = setup
    _, first = cached(root, images, weights, backend="onnxruntime")
    other = weights_file(root / "w_other.pt", seed=1)
    _, on_torch = cached(root, images, other, backend="torch")
    _, on_ort = cached(root, images, other, backend="onnxruntime")
    assert len(list((root / "cache" / "onnx").glob("*.onnx"))) == 2
    a, b, c = (
        first.train_dataset.tensors[0],
        on_torch.train_dataset.tensors[0],
        on_ort.train_dataset.tensors[0],
    )
    assert max_diff(b, c) <= TOL and max_diff(a, c) > 100 * TOL  # the other weights' features


def test_a_body_that_does_not_export_falls_back_to_torch_with_one_warning(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root, images, weights = setup
    calls = []

    def unsupported(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs.get("dynamo"))
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with caplog.at_level(logging.WARNING):
        _, dm = cached(root, images, weights, backend="onnxruntime", eval_extraction="channels_last")
    assert calls == [False, True]  # both exporters tried, once for the whole run
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "aten::fancy" in warnings[0] and "torch" in warnings[0]
    # Each split fell back to its own torch numerics, under their own key.
    assert dm.report["extraction"] == "fp32" and dm.report["eval_extraction"] == "channels_last"
    _, on_torch = cached(root, images, weights, backend="torch", eval_extraction="channels_last")
    assert hits(on_torch) == {"train": True, "val": True}
    # The failure is remembered beside the features: the next run does not try again.
    (failed,) = (root / "cache" / "onnx").glob("*.failed")
    assert "aten::fancy" in failed.read_text()
    onnx_body._SESSIONS.clear()
    cached(root, images, weights, backend="onnxruntime", train_views=1)
    assert calls == [False, True]


class _WrongSession:
    """A session that computes something else than the body."""

    def run(self, names: list[str], feeds: dict[str, Any]) -> list[Any]:
        x = next(iter(feeds.values()))
        return [x.reshape(len(x), -1)[:, :32] * 0 + 1]


def test_an_export_that_computes_other_features_is_not_used(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root, images, weights = setup
    monkeypatch.setattr(onnx_body, "make_session", lambda model, device: _WrongSession())
    with caplog.at_level(logging.WARNING):
        _, dm = cached(root, images, weights, backend="onnxruntime")
    assert "differ from torch's" in caplog.text
    assert dm.report["extraction"] == "fp32"
    assert not list((root / "cache" / "onnx").glob("*.onnx"))


def test_a_model_onnxruntime_cannot_load_falls_back(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root, images, weights = setup
    monkeypatch.setattr(onnx_body, "export_body", lambda body, example: b"not an onnx model")
    with caplog.at_level(logging.WARNING):
        _, dm = cached(root, images, weights, backend="onnxruntime")
    assert "onnxruntime cannot load the exported body" in caplog.text
    assert dm.report["extraction"] == "fp32"


def test_auto_chooses_per_device_package_and_work() -> None:
    big = AUTO_MIN_PIXELS // (224 * 224)
    assert choose_backend("auto", CPU, big, 224)[0] == "onnxruntime"
    backend, why = choose_backend("auto", CPU, big - 1, 224)
    assert backend == "torch" and "too little work" in why
    assert choose_backend("auto", torch.device("cuda"), 10 * big, 224)[0] == "torch"
    assert choose_backend("torch", CPU, 10 * big, 224) == ("torch", "cache.backend=torch")
    assert choose_backend("onnxruntime", CPU, 1, 8)[0] == "onnxruntime"


def test_a_missing_onnxruntime_is_a_fallback_for_auto_and_an_error_when_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(onnx_body, "missing_runtime", lambda: "onnxruntime")
    backend, why = choose_backend("auto", CPU, 10**6, 224)
    assert backend == "torch" and "'onnxruntime' is not installed" in why and ".[export]" in why
    with pytest.raises(
        ConfigError, match=r"cache.backend=onnxruntime needs the package 'onnxruntime'.*\[export\]"
    ):
        FeatureCache(backend="onnxruntime")


def test_settings_that_contradict_the_backend_are_refused_before_any_work() -> None:
    with pytest.raises(
        ConfigError, match=r"cache.backend='tensorrt' is not one of: auto, torch, onnxruntime"
    ):
        FeatureCache(backend="tensorrt")
    with pytest.raises(ConfigError, match=r"cache.extraction=bf16 is torch's .* cache.backend=torch"):
        FeatureCache(backend="onnxruntime", extraction="bf16")
    # Under auto, an explicit reduced precision stays on torch; the fp32 settings move to onnxruntime.
    assert resolve_extraction("bf16", CPU, backend="onnxruntime") == EXTRACTIONS["bf16"]
    ort = resolve_extraction("channels_last", CPU, backend="onnxruntime")
    assert ort.name == "onnxruntime_fp32" and ort.fallback == EXTRACTIONS["channels_last"]


def test_the_advisors_every_stage_pass_matches_torch(tmp_path: Path, image_folder: Path) -> None:
    body = instantiate_clean(TINY).build(pretrained=False)
    body.freeze(body.depth)
    data = ImageFolderDataModule(image_folder, batch_size=4, image_size=32)
    data.preprocess = body.preprocess
    data.setup("fit")
    store = FeatureStore(tmp_path / "cache")
    out = {}
    for name in ("channels_last", "onnxruntime"):
        numerics = resolve_extraction(
            "channels_last", CPU, backend=name if name == "onnxruntime" else "torch"
        )
        fs, hit, _ = cached_features(
            store, AllStages(body), data.train_dataset, device=CPU, numerics=numerics
        )
        assert not hit and fs.extraction == numerics.name
        out[name] = fs.features
    assert out["onnxruntime"].shape == (len(data.train_dataset), sum(body.widths))
    assert max_diff(out["onnxruntime"], out["channels_last"]) <= TOL


@pytest.mark.slow
def test_on_the_embedded_data_onnxruntime_keeps_the_features_and_the_heads_accuracy(
    compose_train: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """The embedded MobileNetV2 at its own 224 px over the embedded images, a head trained on each
    backend's features: features within 1e-4 of torch fp32, val accuracy within 0.5 points."""
    from transfer_cases.commands.train import train

    runs = {}
    for backend in ("torch", "onnxruntime"):
        cfg = compose_train(
            "data=hymenoptera",
            "backbone=mobilenet_v2",
            "case=small_similar",
            f"cache.backend={backend}",
            "cache.extraction=fp32",
            "cache.eval_extraction=fp32",
            "trainer.max_epochs=3",
            "data.num_workers=0",
            "callbacks.progress_bar.refresh_rate=0",
            "callbacks.model_summary=null",
            f"paths.output_dir={tmp_path / backend}",
        )
        runs[backend] = train(cfg)
    assert runs["onnxruntime"]["feature_cache"]["extraction"] == "onnxruntime_fp32"
    for split in ("train", "val"):
        a, b = (
            {
                n: torch.from_numpy(np.load(f"{runs[k]['feature_cache']['files'][split]['path']}/{n}.npy"))
                for n in ("features", "labels")
            }
            for k in ("torch", "onnxruntime")
        )
        assert torch.equal(a["labels"], b["labels"])
        assert max_diff(a["features"], b["features"]) <= TOL, split
    accuracy = {k: r["metrics"]["val/acc"] for k, r in runs.items()}
    assert abs(accuracy["onnxruntime"] - accuracy["torch"]) <= 0.005, accuracy
    assert accuracy["torch"] > 0.75
