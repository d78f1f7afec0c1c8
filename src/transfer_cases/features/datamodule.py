"""Serve a fully frozen body's pooled features instead of images, computed once per cache key.

When every kept stage is frozen, the body is a fixed function: its output for an image never changes,
so computing it every epoch is wasted work. `CachedFeatureDataModule` wraps the image data module,
extracts the features of each split once (or loads them from the cache) at `setup`, and its loaders
yield `FeatureBatch`es, which `TransferModule` sends straight to the head; the same module, Trainer,
callbacks and checkpoints are used, and a checkpoint trained this way is an ordinary one that
classifies raw images. Which data a phase trains on is decided in one place, `recipe.phase_data`,
once the body holds the weights it continues with.

Numerics: the training split is extracted in the fastest setting (`extraction`); val and test in
`eval_extraction` (`channels_last` by default: fp32 arithmetic in the NHWC layout, the faster fp32 pass on
CPUs), the numerics `transfer-eval`, `transfer-predict` and the export run up to float rounding, so the
logged val/acc and the best checkpoint's choice are those of the deployed model. The engine is
`backend` (`features.backend`): with onnxruntime, the fp32 settings run there in fp32, once per run
chosen for all splits and logged in one line.

Augmentation: with `train_views=0` the head trains on the un-augmented view of each training image
(one pass over the data, the cheapest). With `train_views=K`, K augmented views of each training
image are extracted (K passes over train) and epoch e trains on view e mod K; val and test always use
the un-augmented view. More views cost more extraction time and buy some of the regularisation of
on-line augmentation; with a frozen body and a linear head, the gain is usually small.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from transfer_cases.backbones.staged import StagedBody
from transfer_cases.data.sources import STAMPS
from transfer_cases.features.backend import check_backend, choose_backend
from transfer_cases.features.batch import FeatureBatch
from transfer_cases.features.cached import cached_features
from transfer_cases.features.extract import resolve_extraction
from transfer_cases.features.mapped import MappedRows, RowSampler
from transfer_cases.features.store import FeatureSet, FeatureStore
from transfer_cases.utils.errors import ConfigError, DataError
from transfer_cases.utils.validate import one_of, whole

log = logging.getLogger(__name__)
EVAL_ROWS = 4096  # feature rows per evaluation batch: 20 MB of 1280-d fp32 features


@dataclass(frozen=True)
class ExtractionSettings:
    """How the frozen body's passes run, checked when made (a bad name fails before any extraction).

    Args:
        train_views: 0 for the un-augmented view of each train image, K for K augmented views.
        extraction: numerics of the train split's pass (`auto`, `fp32`, `bf16`, ...; `features.extract`).
        batch_size: images per extraction batch (training batches keep the data module's batch size).
        eval_extraction: numerics of the val and test splits' pass (the deployed model's: fp32 arithmetic).
        stamp: how the cache key identifies image files (`data.sources.STAMPS`).
        backend: the engine of the passes: auto, torch or onnxruntime (`features.backend`).
    """

    train_views: int = 0
    extraction: str = "auto"
    batch_size: int = 64
    eval_extraction: str = "channels_last"
    stamp: str = "mtime"
    backend: str = "auto"

    def __post_init__(self) -> None:
        whole(0, example=0, why="augmented views per training image; 0: none")(
            self.train_views, "cache.train_views"
        )
        whole(1, example=64, why="images per extraction batch")(self.batch_size, "cache.batch_size")
        one_of(*STAMPS, example="mtime")(self.stamp, "cache.stamp")
        backend = check_backend(self.backend)
        strict = {"backend": backend, "strict": backend != "auto"}
        resolve_extraction(self.extraction, torch.device("cpu"), **strict)
        resolve_extraction(self.eval_extraction, torch.device("cpu"), "cache.eval_extraction", **strict)


class CachedFeatureDataModule(L.LightningDataModule):
    """The frozen body's features of an image data module's splits, as train/val/test loaders.

    Args:
        images: the image data module (already given the weights' preprocessing).
        body: the kept body; must be fully frozen.
        store: where feature files live.
        settings: how the passes run (views, numerics, batch size, stamp, backend).
    """

    def __init__(
        self, images: Any, body: StagedBody, store: FeatureStore, settings: ExtractionSettings | None = None
    ) -> None:
        super().__init__()
        if not body.fully_frozen:
            raise ConfigError("features can only be cached for a fully frozen body (case.freeze=all)")
        self.images = images
        self.body = body
        self.store = store
        self.settings = settings or ExtractionSettings()
        self.train_dataset: MappedRows | None = None
        self.val_dataset: MappedRows | None = None
        self.test_dataset: MappedRows | None = None
        self.report: dict[str, Any] = {}

    # The image data module's facts, unchanged.
    @property
    def classes(self) -> list[str]:
        return self.images.classes

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    @property
    def preprocess(self) -> Any:
        return self.images.preprocess

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.images.setup(stage)
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        test = self.images.test_dataset
        splits = [self.images.train_dataset, self.images.val_dataset, *([test] if test is not None else [])]
        images = len(splits[0]) * max(1, self.settings.train_views) + sum(len(d) for d in splits[1:])
        backend, why = choose_backend(self.settings.backend, device, images, self.images.preprocess.crop_size)
        strict = self.settings.backend != "auto"
        numerics = resolve_extraction(self.settings.extraction, device, backend=backend, strict=strict)
        eval_numerics = resolve_extraction(
            self.settings.eval_extraction, device, "cache.eval_extraction", backend=backend, strict=strict
        )
        log.info(
            "feature extraction on %s: train %s, val/test %s (%s)",
            backend,
            numerics.name,
            eval_numerics.name,
            why,
        )
        self.report = {
            "backend": backend,
            "backend_why": why,
            "extraction": numerics.name,
            "eval_extraction": eval_numerics.name,
            "dir": str(self.store.root),
            "files": {},
        }

        def features(split: str, dataset: Dataset, view: int | None) -> FeatureSet:
            label = split if view is None else f"{split} view {view + 1}/{self.settings.train_views}"
            fs, hit, path = cached_features(
                self.store,
                self.body,
                dataset,
                device=device,
                numerics=numerics if split == "train" else eval_numerics,
                batch_size=self.settings.batch_size,
                num_workers=self.images.num_workers,
                view=view,
                seed=self.images.seed,
                label=f"extracting {label} features",
                stamp=self.settings.stamp,
            )
            self.report["files"][label] = {
                "path": path and str(path),
                "hit": hit,
                "extraction": fs.extraction,
            }
            if fs.extraction != (numerics if split == "train" else eval_numerics).name:  # a fallback
                self.report["extraction" if split == "train" else "eval_extraction"] = fs.extraction
            return fs

        train = self.images.train_dataset
        if self.settings.train_views == 0:
            self.train_dataset = MappedRows([features("train", self._eval_copy(train), None)])
        else:
            views = [features("train", train, v) for v in range(self.settings.train_views)]
            self.train_dataset = MappedRows(views, stacked=True)
        self.val_dataset = MappedRows([features("val", self.images.val_dataset, None)])
        self.test_dataset = None if test is None else MappedRows([features("test", test, None)])

    def _eval_copy(self, dataset: Dataset) -> Dataset:
        """The same images through the eval transform (the un-augmented view)."""
        clean = copy.copy(dataset)
        clean.transform = self.images.predict_transform()
        return clean

    # -- loaders over the mapped rows (a gather per batch: no workers needed) ----------------------
    def train_dataloader(self) -> DataLoader:
        """Epoch e's seeded permutation, dealt out to the ranks (rank r of W takes positions r, r + W,
        ...): W ranks with batch b step through exactly the rows one process with batch W x b does."""
        self.setup()
        trainer = getattr(self, "trainer", None)
        ranks = {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer else {}
        assert self.train_dataset is not None
        sampler = RowSampler(
            self.train_dataset, **{"num_replicas": 1, "rank": 0, **ranks}, seed=self.images.seed
        )
        return self._loader(self.train_dataset, self.images.batch_size, sampler)

    def _loader(self, rows: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        # Batches leave pinned memory for a GPU, so Lightning's non-blocking copy overlaps the step.
        trainer = getattr(self, "trainer", None)
        pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=_as_batch, pin_memory=pin)

    # Evaluation batches do not change any metric (they are sums over the split), so val and test
    # come in batches of up to EVAL_ROWS feature rows: one step instead of dozens of ~ms steps.
    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_dataset is not None
        return self._loader(self.val_dataset, EVAL_ROWS)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        if self.test_dataset is None:
            raise DataError(self.images.no_test_split_message())
        return self._loader(self.test_dataset, EVAL_ROWS)


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> FeatureBatch:
    """`MappedRows` already returns whole batches: nothing to collate, only the type to say what it is."""
    return FeatureBatch(*batch)


class FeatureCache:
    """The `cache` config group: when the case freezes the whole kept body, train on cached features.

    Args:
        enabled: False trains on images every epoch (the body runs every step).
        dir: the folder of feature files (`paths.cache_dir`/features by default); safe to delete.
        train_views: augmented views per training image (0: the un-augmented view only).
        extraction: the training split's numerics: `auto` or a setting of `features.extract.EXTRACTIONS`.
        batch_size: images per extraction batch.
        eval_extraction: the val and test splits' numerics (fp32 arithmetic: what the deployed model runs).
        stamp: how the cache key identifies image files: mtime (path, size, modification time) or
            content (a hash of every byte: sees files swapped with their mtimes kept, reads them all).
        backend: the engine of the frozen body's passes: `auto` (onnxruntime on a CPU when installed
            and the run has enough images, else torch), `torch`, or `onnxruntime` (`features.backend`).
    """

    def __init__(
        self,
        enabled: bool = True,
        dir: str | Path = ".cache/features",
        train_views: int = 0,
        extraction: str = "auto",
        batch_size: int = 64,
        eval_extraction: str = "channels_last",
        stamp: str = "mtime",
        backend: str = "auto",
    ) -> None:
        # Unknown names, and settings that contradict each other, fail now, not after minutes of extraction.
        self.settings = ExtractionSettings(
            train_views, extraction, batch_size, eval_extraction, stamp, backend
        )
        self.enabled = enabled
        self.store = FeatureStore(dir)

    def applies_to(self, body: StagedBody) -> bool:
        return bool(self.enabled) and body.fully_frozen

    def wrap(self, images: Any, body: StagedBody) -> Any:
        """The data module to train on: cached features when they apply, else `images` itself."""
        if not self.applies_to(body):
            return images
        return CachedFeatureDataModule(images, body, self.store, self.settings)
