"""One inference pass of a frozen body over a data set, in the fastest numerics that keep accuracy.

Two engines (`cache.backend`, see `features.backend`): torch, in the numerics of `EXTRACTIONS`, and
onnxruntime, fp32 (`features.onnx_body`). torch's `auto` numerics pick per device type: bf16 autocast
with channels_last on CPUs with native bf16 (AVX512-BF16 or AMX), fp32 with channels_last on other
CPUs, fp16 autocast with channels_last on CUDA GPUs. `make bench` measures the settings side by side
and checks that a head trained on each one's features keeps its accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from transfer_cases.utils.errors import ConfigError

TORCH, ONNXRUNTIME = "torch", "onnxruntime"


@dataclass(frozen=True)
class Extraction:
    """Numerics of a feature-extraction pass: autocast dtype (None: fp32) and memory format, on the
    `backend` engine; `fallback` is the torch setting to use when that engine cannot run the body."""

    name: str
    autocast: torch.dtype | None = None
    channels_last: bool = False
    backend: str = TORCH
    fallback: Extraction | None = None


EXTRACTIONS = {
    e.name: e
    for e in (
        Extraction("fp32"),
        Extraction("channels_last", None, True),
        Extraction("bf16", torch.bfloat16),
        Extraction("bf16_channels_last", torch.bfloat16, True),
        Extraction("fp16_channels_last", torch.float16, True),
    )
}


def _cpu_has_native_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_extraction(
    name: str, device: torch.device, key: str = "cache.extraction", backend: str = TORCH, strict: bool = False
) -> Extraction:
    """The extraction setting `name` (or the one `auto` picks for `device`); `key` names the setting.

    On the onnxruntime `backend`, the fp32 settings (`auto`, `fp32`, `channels_last`) run on
    onnxruntime in fp32, with the torch setting as fallback; a reduced-precision setting asks for
    torch's autocast, so it stays on torch, or is refused when the backend was asked for (`strict`)."""
    torch_name = name
    if name == "auto":
        if device.type == "cuda":
            torch_name = "fp16_channels_last"
        elif device.type == "cpu":
            torch_name = "bf16_channels_last" if _cpu_has_native_bf16() else "channels_last"
        else:
            torch_name = "fp32"
    if torch_name not in EXTRACTIONS:
        raise ConfigError(f"{key}={name} is not one of: auto, {', '.join(EXTRACTIONS)}")
    numerics = EXTRACTIONS[torch_name]
    if backend != ONNXRUNTIME:
        return numerics
    if name != "auto" and numerics.autocast is not None:
        if strict:
            raise ConfigError(
                f"{key}={name} is torch's {numerics.autocast} autocast, but cache.backend=onnxruntime runs "
                f"fp32; set {key}=auto (or fp32), or cache.backend=torch"
            )
        return numerics
    # The fallback keeps torch fp32 arithmetic where the setting asked for it (`channels_last` for the
    # val and test splits), and torch's `auto` choice where `auto` was asked.
    return Extraction("onnxruntime_fp32", backend=ONNXRUNTIME, fallback=numerics)


def extract(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`(features, labels)` of every batch, concatenated: `extract_batches` (same arguments) in one piece."""
    feats, labels = zip(*extract_batches(*args, **kwargs), strict=True)
    return torch.cat(feats), torch.cat(labels)


def extract_batches(
    body: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    extraction: Extraction,
    desc: str = "features",
    total: int | None = None,
    models_dir: str | Path | None = None,
    fingerprint: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(features, labels)` of each batch through `body` (in eval mode), float32 on the CPU, as they come:
    a caller can store each one before the next is computed (memory grows with the batch, not the split).

    On torch, the body is moved to `device` (and channels_last) for the pass and put back afterwards.
    On onnxruntime, the body exported to `models_dir` (keyed by its `fingerprint`) runs instead;
    `onnx_body.BackendUnavailable` at the first batch says it cannot.
    """
    if extraction.backend == ONNXRUNTIME:
        from transfer_cases.features.onnx_body import OnnxBody

        yield from _run(OnnxBody(body, models_dir, device, fingerprint), batches, desc, total)
        return
    param = next(body.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    was_training = body.training
    fmt = torch.channels_last if extraction.channels_last else torch.contiguous_format
    body.eval().to(device, memory_format=fmt)

    def run(x: torch.Tensor) -> torch.Tensor:
        # From pinned memory (the loader pins on CUDA) the copy overlaps the previous batch's work.
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=extraction.autocast, enabled=bool(extraction.autocast)):
            return body(x)

    try:
        yield from _run(run, batches, desc, total)
    finally:
        body.to(home, memory_format=torch.contiguous_format).train(was_training)


@torch.no_grad()  # not inference_mode: the features become inputs of a trained head
def _run(
    run: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    desc: str,
    total: int | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False, disable=None) as bar:
        for x, y in batches:
            yield run(x).float().cpu(), torch.as_tensor(y)
            bar.update(len(x))
