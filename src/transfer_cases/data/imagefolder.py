"""Images in class folders: `root/{train,val,test}/<class>/*` or simply `root/<class>/*`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer_cases.data._log import RankZeroLogger
from transfer_cases.data.datamodule import ClassificationDataModule
from transfer_cases.data.sources import FileSource
from transfer_cases.data.splits import Splits, build_splits
from transfer_cases.utils.errors import DataError

log = RankZeroLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_NAMES = ("train", "val", "test")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _visible(path: Path, base: Path) -> bool:
    # Skips .ipynb_checkpoints, .DS_Store, ._* resource forks and the like.
    return not any(part.startswith(".") for part in path.relative_to(base).parts)


def scan_class_folders(folder: Path) -> dict[str, list[Path]]:
    """`{class: sorted image paths}` for `folder/<class>/**`; an empty class folder is an error
    (it would be a class the model can never learn). Other visible files are skipped and counted."""
    listing = {}
    skipped: list[Path] = []
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and _visible(d, folder)):
        files = [p for p in class_dir.rglob("*") if _visible(p, class_dir) and p.is_file()]
        images = sorted(p for p in files if is_image_file(p))
        skipped += sorted(p for p in files if not is_image_file(p))
        if not images:
            raise DataError(
                f"class folder {class_dir} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images to it or remove the folder"
            )
        listing[class_dir.name] = images
    if skipped:
        example = skipped[0].relative_to(folder).as_posix()
        log.info("skipped %d non-image file(s) under %s (e.g. %s)", len(skipped), folder, example)
    return listing


def find_split_folders(root: Path) -> dict[str, Path]:
    """`{split: folder}`: train/val/test subfolders when there is a train/, else root itself as train."""
    if not root.exists():
        raise DataError(
            f"data folder not found: {root}; set data.root=/path/to/images "
            "(a folder with train/<class>/ and val/<class>/, or one subfolder per class)"
        )
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder; set data.root to a folder of class subfolders")
    splits = {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}
    if not splits:
        return {"train": root}
    if "train" not in splits:
        found = ", ".join(f"{name}/" for name in splits)
        raise DataError(f"{root} has {found} but no train/ folder; add {root}/train/<class>/ images")
    others = sorted(
        d.name for d in root.iterdir() if d.is_dir() and _visible(d, root) and d.name not in splits
    )
    if others:
        log.warning("ignoring %s in %s: only train/, val/ and test/ are read", ", ".join(others), root)
    return splits


def folder_splits(folders: dict[str, Path]) -> tuple[list[str], Splits]:
    """Classes (from train) and one `FileSource` per split folder, labels consistent across splits."""
    listings = {split: scan_class_folders(folder) for split, folder in folders.items()}
    return build_splits(listings, {split: str(folder) for split, folder in folders.items()}, FileSource)


class ImageFolderDataModule(ClassificationDataModule):
    """Your own images, one subfolder per class.

    With `root/train/` (and optionally `root/val/`, `root/test/`) the splits are taken as they are;
    otherwise `root/<class>/` is the train set. A val/ folder is used whenever there is one; without
    it, `val_fraction` (default 0.2) of train is held out, stratified and seeded. Class folders are
    scanned in `__init__` (cheap: no image is opened) so that `classes` is known before the model is built.
    """

    default_val_fraction = 0.2

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.classes, self._splits = folder_splits(find_split_folders(self.root))
        if self._splits.val is not None:
            unused = (
                "" if self.val_fraction is None else f"; data.val_fraction={self.val_fraction} is not used"
            )
            log.info("using %s as the val split%s", self.root / "val", unused)

    def _load_splits(self) -> Splits:
        return self._splits

    def no_test_split_message(self) -> str:
        return f"there is no test split in {self.root}; add {self.root}/test/<class>/ images to test"
