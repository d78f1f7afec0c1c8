"""Where the package's embedded assets and configs live, wherever it is installed."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ASSETS_DIR = PACKAGE_DIR / "assets"


def asset_path(name: str = "") -> Path:
    """Path of an embedded asset (`hymenoptera`, `mobilenet_v2_imagenet.pt`, ...)."""
    return ASSETS_DIR / name


def config_dir() -> Path:
    """The `configs/` folder: inside the wheel when installed, at the repository root in a checkout."""
    for candidate in (PACKAGE_DIR / "configs", PACKAGE_DIR.parents[1] / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"configs/ not found next to {PACKAGE_DIR}; reinstall the package (pip install -e .) "
        "or pass --config-dir to point at your own configs"
    )
