"""Rebuild the embedded hymenoptera copy from the full set: `python -m transfer_cases.tools.embed_data SRC`.

Shorter side 224 px, JPEG quality 80: the whole set stays under 8 MB while the default
resize/crop of the embedded weights (256/224) still sees the full field of view.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from transfer_cases.utils.paths import asset_path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp"}


def embed(src: Path, dst: Path, side: int = 224, quality: int = 80) -> int:
    """Copy every image under `src` to `dst` as an RGB JPEG with its shorter side at most `side`."""
    count = 0
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        out = dst / path.relative_to(src).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = side / min(img.size)
            if scale < 1:
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
            img.save(out, quality=quality, optimize=True)
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", type=Path, help="hymenoptera_data folder with train/ and val/")
    parser.add_argument("--dst", type=Path, default=asset_path("hymenoptera"))
    args = parser.parse_args()
    print(f"wrote {embed(args.src, args.dst)} images to {args.dst}")


if __name__ == "__main__":
    main()
