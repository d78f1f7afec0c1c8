"""Which engine runs a frozen body's pass (`cache.backend`): torch, or onnxruntime, or `auto`.

`auto` takes onnxruntime on a CPU (fp32, the fastest pass `make bench` measured there, with features
within rounding of torch fp32), and torch's own numerics on a GPU (fp16 channels_last, unless the bench
shows something faster). It stays on torch, saying why in one log line, when onnxruntime is not
installed or when a run's passes are too little work to repay the body's one-time export
(`AUTO_MIN_PIXELS`: small data sets, small images). A body that cannot be exported or run falls back
to torch at its first batch (`cached.cached_features`).
"""

from __future__ import annotations

import torch

from transfer_cases.features.extract import ONNXRUNTIME, TORCH
from transfer_cases.utils.errors import ConfigError

BACKENDS = ("auto", TORCH, ONNXRUNTIME)
# Below this much work (images x pixels) in a run's passes, exporting the body costs more than
# onnxruntime saves: 128 images at 224 px. The export is paid once per body and machine, but a pass
# that small takes seconds either way.
AUTO_MIN_PIXELS = 128 * 224 * 224
INSTALL_HINT = 'pip install -e ".[export]"'


def check_backend(name: object, key: str = "cache.backend") -> str:
    """`name` if it is a backend, else one line naming the setting and its values."""
    if name not in BACKENDS:
        raise ConfigError(f"{key}={name!r} is not one of: {', '.join(BACKENDS)}; e.g. {key}=auto")
    if name == ONNXRUNTIME:
        from transfer_cases.features.onnx_body import missing_runtime

        missing = missing_runtime()
        if missing:
            raise ConfigError(
                f"{key}=onnxruntime needs the package '{missing}', which is not installed; install the "
                f"extra: {INSTALL_HINT} (or set {key}=torch)"
            )
    return str(name)


def choose_backend(
    name: str, device: torch.device, images: int, size: int, key: str = "cache.backend"
) -> tuple[str, str]:
    """`(backend, why)`: the engine for passes over `images` images of `size` x `size` pixels on
    `device` under the setting `name`."""
    check_backend(name, key)
    if name != "auto":
        return name, f"{key}={name}"
    if device.type != "cpu":
        return TORCH, f"{key}=auto on {device.type}: torch's own numerics"
    from transfer_cases.features.onnx_body import missing_runtime

    missing = missing_runtime()
    if missing:
        return TORCH, f"{key}=auto: '{missing}' is not installed ({INSTALL_HINT} for the faster pass)"
    if images * size * size < AUTO_MIN_PIXELS:
        return TORCH, f"{key}=auto: {images} images of {size} px, too little work to repay exporting the body"
    return ONNXRUNTIME, f"{key}=auto on cpu, {images} images of {size} px"
