"""Loading a trained model back, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from transfer_cases.errors import ConfigError
from transfer_cases.module import TransferModule


def load_module(path: str | Path) -> TransferModule:
    """A `TransferModule` from a checkpoint written by `transfer-train`, in eval mode on the CPU."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"checkpoint not found: {path}; pass the .ckpt written by transfer-train "
            "(its path is printed at the end of training, under <run>/checkpoints/)"
        )
    module = TransferModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return module.eval()
