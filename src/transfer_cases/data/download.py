"""`data.download=true` (torchvision's convention): fetch a public data set's official files.

Each file is downloaded into a staging folder next to the target, its MD5 checked against the one
torchvision publishes, archives extracted there, and only then moved into place: an interrupted or
corrupted download never leaves a half-written data set that a later run would read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from torchvision.datasets.utils import check_integrity, download_url, extract_archive

from transfer_cases.utils.errors import DataError


class Resource(NamedTuple):
    """One official file: where it comes from (mirrors tried in order), its name and MD5."""

    urls: tuple[str, ...]
    filename: str
    md5: str


def fetch(resources: Sequence[Resource], folder: Path, *, name: str, extract: bool = False) -> None:
    """Download `resources` into `folder` atomically (all verified files, or nothing new there);
    with `extract`, the archives' contents are moved there instead of the archives."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.download-", dir=folder.parent))
    except OSError as e:
        raise DataError(
            f"cannot create {folder} to download {name} into ({(e.strerror or str(e)).lower()}); "
            "set paths.data_dir to a folder you can write"
        ) from None
    try:
        for resource in resources:
            _download(resource, staging, name)
        items = [staging / r.filename for r in resources]
        if extract:
            out = staging / "extracted"
            for archive in items:
                extract_archive(str(archive), str(out))
            items = sorted(out.iterdir())
        folder.mkdir(parents=True, exist_ok=True)
        for item in items:
            os.replace(item, folder / item.name)
    except OSError as e:
        raise DataError(
            f"cannot write {name} into {folder} ({(e.strerror or str(e)).lower()}); "
            "set paths.data_dir to a folder you can write with free space"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(resource: Resource, staging: Path, name: str) -> None:
    path = staging / resource.filename
    errors = []
    for url in resource.urls:
        try:
            download_url(url, str(staging), resource.filename)
        except Exception as e:  # urllib, http and socket errors differ by cause and Python version
            errors.append(f"{url}: {e}")
            path.unlink(missing_ok=True)
            continue
        if check_integrity(str(path), resource.md5):
            return
        path.unlink(missing_ok=True)
        raise DataError(
            f"{url} was downloaded but its MD5 is not {resource.md5} (a cut or altered file); nothing "
            f"was kept: try again, or fetch {resource.filename} yourself and set data.root"
        )
    raise DataError(
        f"cannot download {name} ({'; '.join(errors)}); check the network or fetch "
        f"{resource.filename} yourself and set data.root"
    )
