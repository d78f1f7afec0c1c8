"""A frozen body run by onnxruntime: exported to ONNX once per body, kept beside the features.

Why: a frozen body is an inference-only network, and onnxruntime's CPU kernels (convolutions fused
with their BatchNorm and activation, its own blocked layouts) run such a network faster than torch's
eager layer-by-layer calls, in fp32, so the features keep torch fp32's values up to rounding.

The exported model is keyed by the body's fingerprint (structure, weights and buffers), the input
shape and the versions of torch and onnxruntime, so a body is exported once per machine and every
later pass, over any data set, starts at once. A fresh export is checked against torch fp32 on the
first images before it is used. An export that fails, a model onnxruntime cannot load or run, or one
whose output differs, is remembered beside it (`<key>.failed`, holding the reason), so later runs
fall back to torch at once instead of trying again; delete the file to retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from transfer_cases.utils.atomic import atomic_write
from transfer_cases.utils.errors import OutputError

log = logging.getLogger(__name__)

MODEL_VERSION = 1  # bumped when the meaning of an exported model changes
OPSET = 17  # what the TorchScript-based exporter writes natively; onnxruntime >= 1.14 runs it
INPUT, OUTPUT = "image", "features"
CHECK_IMAGES = 2  # images compared with torch fp32 after a fresh export
TOLERANCE = 1e-4  # max abs difference from torch fp32, relative to the features' scale (>= 1)
INSTALL_HINT = 'pip install -e ".[export]"'
_SESSIONS: OrderedDict[str, Any] = OrderedDict()  # a few sessions reused by the splits of one run
_MAX_SESSIONS = 2


class BackendUnavailable(RuntimeError):
    """onnxruntime cannot run this body; the message says why, in one line."""


def missing_runtime() -> str | None:
    """The name of the first package the onnxruntime backend needs that is not installed, else None
    (looked up without importing it: a command that does not extract pays nothing)."""
    from importlib.util import find_spec

    return next((name for name in ("onnxruntime",) if find_spec(name) is None), None)


def model_key(fingerprint: str, shape: tuple[int, ...]) -> str:
    """What an exported model depends on: the body, the image shape, the exporter and the runtime."""
    import onnxruntime

    parts = {
        "version": MODEL_VERSION,
        "body": fingerprint,
        "shape": list(shape),
        "opset": OPSET,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def export_body(body: nn.Module, example: torch.Tensor) -> bytes:
    """`body` (in eval mode) as an ONNX model with a dynamic batch dimension.

    The TorchScript-based exporter first: it exports a body in about a second, where the torch.export
    one takes many times longer; the torch.export one when the first fails or is gone."""
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
                if not dynamo:
                    buffer = io.BytesIO()
                    torch.onnx.export(
                        body,
                        (example,),
                        buffer,
                        input_names=[INPUT],
                        output_names=[OUTPUT],
                        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                        opset_version=OPSET,
                        dynamo=False,
                    )
                    return buffer.getvalue()
                program = torch.onnx.export(
                    body,
                    (example,),
                    input_names=[INPUT],
                    output_names=[OUTPUT],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    opset_version=max(OPSET, 18),
                    dynamo=True,
                    verbose=False,
                )
                return program.model_proto.SerializeToString()
        except Exception as e:  # any exporter error means "this body does not export"
            errors.append(f"{type(e).__name__}: {_first_line(e)}")
    raise BackendUnavailable(f"the body does not export to ONNX ({'; '.join(errors)})")


def make_session(model: bytes | str, device: torch.device) -> Any:
    """An onnxruntime session with the options that suit one pass over many batches: torch's
    thread count (so `OMP_NUM_THREADS` and DDP's per-rank threads hold), one op at a time (the ops of
    a convolutional body form one chain), every graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as e:  # an operator onnxruntime cannot run, a model it cannot read
        raise BackendUnavailable(f"onnxruntime cannot load the exported body ({_first_line(e)})") from None


class OnnxBody:
    """`body` as onnxruntime runs it: called with an image batch, returns the fp32 features on the CPU.

    The session is made at the first batch (its shape keys the exported model); it raises
    `BackendUnavailable` there when the body cannot run on onnxruntime. Later batches never do.

    Args:
        body: the frozen body (or any module mapping an image batch to one tensor), in eval mode.
        models_dir: where exported models are kept (None: exported in memory, not kept).
        device: a CUDA device uses onnxruntime's CUDA provider when it is installed, else the CPU.
        fingerprint: the body's fingerprint, when the caller has it (`cached.body_fingerprint`).
    """

    def __init__(
        self,
        body: nn.Module,
        models_dir: str | Path | None,
        device: torch.device | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.body = body
        self.models_dir = None if models_dir is None else Path(models_dir).expanduser()
        self.device = device or torch.device("cpu")
        self.fingerprint = fingerprint
        self.session: Any = None
        self.path: Path | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.session is None:
            self.session = self._session(x)
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: images})[0])

    def _session(self, x: torch.Tensor) -> Any:
        if self.fingerprint is None:
            from transfer_cases.features.cached import body_fingerprint

            self.fingerprint = body_fingerprint(self.body)
        key = model_key(self.fingerprint, tuple(x.shape[1:]))
        memo = f"{key}:{self.device.type}"
        cached = _SESSIONS.get(memo)
        if cached is not None:
            _SESSIONS.move_to_end(memo)
            return cached
        if self.models_dir is None:
            session = self._fresh(x, None)
        else:
            try:
                self.models_dir.mkdir(parents=True, exist_ok=True)
                lock = FileLock(str(self.models_dir / f".{key}.lock"))
                lock.acquire()
            except OSError:  # a read-only cache folder: export in memory, keep nothing
                session = self._fresh(x, None)
            else:
                try:
                    session = self._stored(x, key)
                finally:
                    lock.release()
        _SESSIONS[memo] = session
        while len(_SESSIONS) > _MAX_SESSIONS:
            _SESSIONS.popitem(last=False)
        return session

    def _stored(self, x: torch.Tensor, key: str) -> Any:
        """The exported model of `key` (exported now if absent), or the remembered reason it cannot run."""
        assert self.models_dir is not None
        path, failed = self.models_dir / f"{key}.onnx", self.models_dir / f"{key}.failed"
        if failed.is_file():
            reason = failed.read_text(encoding="utf-8", errors="replace").strip()
            raise BackendUnavailable(f"{reason} (remembered in {failed}; delete it to try again)")
        if path.is_file():
            self.path = path
            return make_session(str(path), self.device)
        try:
            return self._fresh(x, path)
        except BackendUnavailable as e:
            with contextlib.suppress(OSError):  # not remembered: the next run tries again
                failed.write_text(f"{e}\n", encoding="utf-8")
            raise

    def _fresh(self, x: torch.Tensor, path: Path | None) -> Any:
        """Export, load and check against torch fp32 on the first images; store when `path` is given."""
        was_training = self.body.training
        self.body.eval()
        try:
            sample = x[:CHECK_IMAGES].to(next(self.body.parameters(), x).device, torch.float32)
            sample = sample.contiguous()
            model = export_body(self.body, sample if len(sample) > 1 else sample.repeat(2, 1, 1, 1))
            session = make_session(model, self.device)
            with torch.no_grad():
                expected = self.body(sample).float().cpu()
        finally:
            self.body.train(was_training)
        try:
            got = torch.from_numpy(session.run([OUTPUT], {INPUT: sample.cpu().numpy()})[0])
        except Exception as e:
            raise BackendUnavailable(f"onnxruntime cannot run the exported body ({_first_line(e)})") from None
        scale = max(1.0, float(expected.abs().max()))
        diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
        if not diff <= TOLERANCE * scale:
            raise BackendUnavailable(
                f"the exported body's features differ from torch's by {diff:.3g} (more than "
                f"{TOLERANCE:g} x {scale:.3g})"
            )
        if path is not None:
            try:
                atomic_write(path, lambda f: f.write(model), what="exported body", setting="cache.dir")
                self.path = path
            except OutputError as e:
                log.warning("%s; running the exported body from memory", e)
        return session


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
