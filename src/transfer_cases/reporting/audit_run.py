"""The data audit of a composed config: the pretrained full body's features of every split (through
the feature cache: one pass, none with a warm cache), then `audit`'s findings, duplicates confirmed
at pixel level, written to audit.json (thumbnails inlined) and audit.html, and one log line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from transfer_cases.features import CachedFeatureDataModule, FeatureStore
from transfer_cases.features.datamodule import ExtractionSettings
from transfer_cases.reporting.audit import (
    class_counts,
    imbalance,
    label_issues,
    near_duplicate_candidates,
    out_of_fold_probabilities,
)
from transfer_cases.reporting.html import thumbnail_uri
from transfer_cases.utils.atomic import atomic_write_text
from transfer_cases.utils.config import instantiate_clean
from transfer_cases.utils.errors import TransferCasesError
from transfer_cases.utils.schema import AUDIT_SETTINGS

log = logging.getLogger(__name__)
AUDIT_JSON, AUDIT_HTML = "audit.json", "audit.html"
PIXEL_SIZE = 32  # both images of a pair, grey, at this size: resizing and re-encoding wash out


class Audit:
    """The `audit` config group: what counts as a duplicate or a likely label error.

    Args:
        duplicate_threshold: cosine similarity of full-body features from which a pair of nearest
            neighbours is a candidate (low on purpose: a resized copy's features differ more than its
            pixels do; the pixel check decides).
        neighbours: nearest neighbours of each image (in the other split, or in train) considered.
        pixel_tolerance: mean absolute grey-level difference (0-1, both at 32x32) at or below which
            a candidate can be the same picture (exact, resized or re-encoded) ...
        min_correlation: ... and the correlation of those grey levels from which it is: two
            different objects on the same plain background (aircraft on a blue sky) differ little
            on average, yet their pixels do not correlate.
        folds: cross-validation folds of the probe that gives out-of-fold probabilities.
        max_pairs: candidates checked at pixel level, most similar first.
        max_listed: label suspects and pairs listed (with thumbnails) in audit.json.
        imbalance_warning: largest/smallest train class count above which the log warns.
        seed: seeds the folds.
    """

    def __init__(
        self,
        duplicate_threshold: float = 0.8,
        neighbours: int = 3,
        pixel_tolerance: float = 0.04,
        min_correlation: float = 0.8,
        folds: int = 5,
        max_pairs: int = 5000,
        max_listed: int = 50,
        imbalance_warning: float = 3.0,
        seed: int = 0,
    ) -> None:
        for name, rule in AUDIT_SETTINGS.items():
            rule(locals()[name], f"audit.{name}")
        self.min_correlation = float(min_correlation)
        self.duplicate_threshold = float(duplicate_threshold)
        self.neighbours = int(neighbours)
        self.pixel_tolerance = float(pixel_tolerance)
        self.folds, self.max_pairs, self.max_listed = int(folds), int(max_pairs), int(max_listed)
        self.imbalance_warning = float(imbalance_warning)
        self.seed = int(seed)

    def run(
        self, splits: dict[str, Any], features: dict[str, np.ndarray], classes: list[str]
    ) -> dict[str, Any]:
        """Findings for image datasets `splits` (SubsetDataset per split name) and their features."""
        start = time.perf_counter()
        counts = class_counts({k: d.labels for k, d in splits.items()}, classes)
        candidates = near_duplicate_candidates(
            features, self.duplicate_threshold, neighbours=self.neighbours, max_pairs=self.max_pairs
        )
        confirmed, unconfirmed = [], []
        small: dict[tuple[str, int], np.ndarray] = {}  # each image decoded once, however many pairs

        def grey(split: str, index: int) -> np.ndarray:
            if (split, index) not in small:
                small[split, index] = grey_small(splits[split], index)
            return small[split, index]

        for c in candidates:
            diff, corr = pixel_match(grey(c.split_a, c.index_a), grey(c.split_b, c.index_b))
            pair = {
                **_item("a", splits[c.split_a], c.split_a, c.index_a, classes),
                **_item("b", splits[c.split_b], c.split_b, c.index_b, classes),
            }
            pair.update(
                similarity=round(c.similarity, 4), pixel_difference=round(diff, 4), correlation=round(corr, 4)
            )
            same = diff <= self.pixel_tolerance and corr >= self.min_correlation
            (confirmed if same else unconfirmed).append(pair)
        names = list(features)
        x = np.concatenate([features[k] for k in names])
        y = np.concatenate([np.asarray(splits[k].labels) for k in names])
        where = [(k, i) for k in names for i in range(len(features[k]))]
        probs = out_of_fold_probabilities(x, y, folds=self.folds, seed=self.seed)
        issues = label_issues(probs, y)
        flagged = [i for i in issues if i.flagged]
        suspects = []
        for issue in issues[: self.max_listed]:
            split, index = where[issue.index]
            suspects.append(
                {
                    **_item("", splits[split], split, index, classes),
                    "given": classes[issue.given],
                    "suggested": classes[issue.suggested],
                    "p_given": round(issue.p_given, 4),
                    "p_suggested": round(issue.p_suggested, 4),
                    "margin": round(issue.margin, 4),
                    "flagged": issue.flagged,
                }
            )
        ratio = imbalance(counts.get("train", {}))
        across = [p for p in confirmed if p["split_a"] != p["split_b"]]
        within = [p for p in confirmed if p["split_a"] == p["split_b"]]
        warnings = []
        if across:
            warnings.append(
                f"audit: {len(across)} duplicate pairs across splits: val/test scores include images "
                "seen in training (leakage)"
            )
        if within:
            warnings.append(f"audit: {len(within)} duplicate pairs within train")
        if flagged:
            warnings.append(
                f"audit: {len(flagged)} likely label errors (confident learning, out-of-fold probe "
                "probabilities)"
            )
        if ratio > self.imbalance_warning:
            warnings.append(f"audit: train classes imbalanced {ratio:.1f}x (largest/smallest)")
        self._add_thumbnails(splits, [*confirmed[: self.max_listed], *unconfirmed[:10], *suspects])
        return {
            "images": {k: len(d) for k, d in splits.items()},
            "classes": classes,
            "counts": counts,
            "imbalance": ratio,
            "settings": {
                k: getattr(self, k)
                for k in (
                    "duplicate_threshold",
                    "neighbours",
                    "pixel_tolerance",
                    "min_correlation",
                    "folds",
                    "max_pairs",
                )
            },
            "duplicates": {
                "across_splits": len(across),
                "within_train": len(within),
                "candidates": len(candidates),
                "pairs": confirmed[: self.max_listed],
                "unconfirmed": unconfirmed[:10],
            },
            "label_issues": {
                "flagged": len(flagged),
                "probe_accuracy": float((probs.argmax(1) == y).mean()),
                "suspects": suspects,
            },
            "warnings": warnings,
            "audit_s": round(time.perf_counter() - start, 2),
        }

    @staticmethod
    def _add_thumbnails(splits: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            for side in ("a", "b", ""):
                split, index = (
                    entry.get(f"split{'_' + side if side else ''}"),
                    entry.get(f"index{'_' + side if side else ''}"),
                )
                if split is not None and index is not None:
                    image = _load(splits[split], index)
                    entry[f"thumb{'_' + side if side else ''}"] = thumbnail_uri(image, size=96)


def _item(side: str, dataset: Any, split: str, index: int, classes: list[str]) -> dict[str, Any]:
    suffix = f"_{side}" if side else ""
    source_index = int(dataset.indices[index])
    paths = getattr(dataset.source, "paths", None)
    return {
        f"split{suffix}": split,
        f"index{suffix}": int(index),
        f"file{suffix}": str(paths[source_index]) if paths is not None else f"#{source_index}",
        **({f"label{suffix}": classes[int(dataset.source.labels[source_index])]} if side else {}),
    }


def _load(dataset: Any, index: int) -> Image.Image:
    return dataset.source.load(int(dataset.indices[index]))


def grey_small(dataset: Any, index: int) -> np.ndarray:
    """The image in grey levels (0-1) at 32x32: what a pair's pixel check compares (mean absolute
    difference), blind to resizing and re-encoding but not to another picture."""
    image = _load(dataset, index).convert("L").resize((PIXEL_SIZE, PIXEL_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32) / 255


def pixel_match(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean absolute difference, correlation) of two grey images; two flat images correlate fully."""
    diff = float(np.abs(a - b).mean())
    sa, sb = float(a.std()), float(b.std())
    if sa < 1e-3 or sb < 1e-3:
        return diff, 1.0 if sa < 1e-3 and sb < 1e-3 else 0.0
    return diff, float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


def split_features(
    cfg: Any, device: torch.device | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """Image datasets and full-body pretrained features of every split of `cfg.data`, through the
    feature cache (the same key as a head trained on the full body: a warm cache costs no pass)."""
    images = instantiate_clean(cfg.data)
    body = instantiate_clean(cfg.backbone).build(pretrained=True)
    body.freeze(body.depth)
    images.preprocess = body.preprocess
    cache = cfg.get("cache") or {}
    data = CachedFeatureDataModule(
        images,
        body,
        FeatureStore(cache.get("dir") or f"{cfg.paths.cache_dir}/features"),
        ExtractionSettings(
            extraction=cache.get("extraction", "auto"),
            batch_size=cache.get("batch_size", 64),
            eval_extraction=cache.get("eval_extraction", "channels_last"),
            stamp=cache.get("stamp", "mtime"),
            backend=cache.get("backend", "auto"),
        ),
    )
    data.setup("fit")
    splits = {"train": images.train_dataset, "val": images.val_dataset}
    features = {"train": data.train_dataset.tensors[0].numpy(), "val": data.val_dataset.tensors[0].numpy()}
    if images.test_dataset is not None:
        splits["test"], features["test"] = images.test_dataset, data.test_dataset.tensors[0].numpy()
    return splits, features, list(images.classes)


def summary_line(result: dict[str, Any]) -> str:
    d, li = result["duplicates"], result["label_issues"]
    images = sum(result["images"].values())
    return (
        f"audit: {images} images; duplicates: {d['across_splits']} pairs across splits, {d['within_train']} "
        f"within train; {li['flagged']} likely label errors; train imbalance {result['imbalance']:.1f}x"
    )


def audit_from_config(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    """Audit `cfg`'s data, write audit.json and audit.html into `out_dir`, log the summary line."""
    from transfer_cases.reporting.audit_html import audit_page

    start = time.perf_counter()
    auditor: Audit = instantiate_clean(cfg.audit) if cfg.get("audit") else Audit()
    splits, features, classes = split_features(cfg)
    result = auditor.run(splits, features, classes)
    result["total_s"] = round(time.perf_counter() - start, 2)
    out = Path(out_dir)
    atomic_write_text(out / AUDIT_JSON, json.dumps(result, indent=1) + "\n", what="audit")
    atomic_write_text(out / AUDIT_HTML, audit_page(result), what="audit report")
    log.info("%s; %s", summary_line(result), out / AUDIT_JSON)
    for line in result["warnings"]:
        log.warning(line)
    return result


def audit_if_configured(cfg: Any, out_dir: str | Path) -> dict[str, Any] | None:
    """The audit of `cfg`'s data when its config has the `audit` group (the advisor and `case=auto`
    call this after advising); a setting's error stops the command, anything else is one warning:
    an audit that cannot run must not cost the user the advice or the training run."""
    if not cfg.get("audit"):
        return None
    try:
        return audit_from_config(cfg, out_dir)
    except TransferCasesError:
        raise
    except Exception as e:
        log.warning("the data audit did not run: %s: %s", type(e).__name__, e)
        return None
