"""Content digests: of tensors (what `FreezeGuard` compares) and of plain values (what the feature
cache's data fingerprints are made of)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, shapes, dtypes and the exact bytes of the tensors (in the given order)."""
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().cpu().reshape(-1).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def value_digest(*parts: Any) -> str:
    """A sha256 hex digest of strings, numbers, paths, arrays and (nested) sequences of them."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, np.ndarray):
            h.update(f"array {x.dtype.str} {x.shape}|".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, list | tuple):
            h.update(b"[")
            for y in x:
                feed(y)
            h.update(b"]")
        else:
            h.update(repr(str(x) if isinstance(x, Path) else x).encode())
            h.update(b"|")

    for part in parts:
        feed(part)
    return h.hexdigest()


# How `file_stamp` identifies a file's content: "mtime" (path, size, modification time: one `stat`)
# or "content" (path, size, SHA-256 of every byte: a file swapped with its mtime restored, as
# `cp -p`, `rsync -a` and `tar` do, is seen). Set for a block with `stamping`.
