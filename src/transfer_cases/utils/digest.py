"""Content digests of tensors: what `FreezeGuard` compares and what feature-cache keys are made of."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, shapes, dtypes and the exact bytes of the tensors (in the given order)."""
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().cpu().reshape(-1).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
