"""The advisor end to end: the data's counts, pooled features at every stage of the pretrained body
and of a random control (one pass each, cached), scores per stage, and the decision.

Cost: the images of at most `max_per_class` training images per class, decoded once; inference
passes of the pretrained body and of the control over them (and of the control over a few hundred
of them for its BatchNorm statistics), then seconds of scoring; with a warm cache, only the scoring.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from transfer_cases.advise.control import calibrated_control
from transfer_cases.advise.decide import Advice, Rules, best_stage, decide
from transfer_cases.advise.decoded import decoded_once
from transfer_cases.advise.scores import score_stages
from transfer_cases.backbones.staged import StagedBody
from transfer_cases.data.splits import Stream, rng
from transfer_cases.features.backend import choose_backend
from transfer_cases.features.cached import cached_features
from transfer_cases.features.extract import EXTRACTIONS, resolve_extraction
from transfer_cases.features.store import FeatureStore
from transfer_cases.utils.config import instantiate_clean, to_dict
from transfer_cases.utils.schema import ADVISOR_SETTINGS

log = logging.getLogger(__name__)


class AllStages(nn.Module):
    """The pooled features after every stage, concatenated (one pass), for caching as one matrix."""

    def __init__(self, body: StagedBody) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.body.stage_features(x), dim=1)


@dataclass(frozen=True)
class Advisor(Rules):
    """The `advisor` config group: which case, cut and freezing fit the data, without training.

    The decision's thresholds are the fields of `Rules` (see `decide`), settable from the config
    (`advisor.tie_sems=2`); beside them:

    Args:
        max_per_class: training images per class the advisor extracts (a seeded subset; all if fewer).
        folds: cross-validation folds of the linear probe.
        probe_scaling: how the probe scales each stage's features: `shared` (one scale: the
            features as the head sees them) or `feature` (each standardised; before issue 23's
            derived tasks, see docs/advisor.md).
        seed: drives the subset and the control's initialisation.
    """

    max_per_class: int = 100
    folds: int = 5
    probe_scaling: str = "shared"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, rule in ADVISOR_SETTINGS.items():
            rule(getattr(self, name), f"advisor.{name}")

    def advise(
        self,
        images: Any,
        backbone: dict[str, Any],
        store: FeatureStore,
        *,
        extraction: str = "auto",
        device: torch.device | None = None,
        backend: str = "auto",
    ) -> tuple[Advice, dict[str, float]]:
        """`(advice, timings)` for an image data module and a backbone config (`_target_` dict); the
        bodies run on `backend` (`cache.backend`, see `features.backend`)."""
        device = device or torch.device("cpu")
        start = time.perf_counter()
        pretrained = instantiate_clean(backbone).build(pretrained=True)
        control_seed = int(rng(self.seed, Stream.RANDOM_CONTROL).integers(2**31))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(control_seed)
            control = instantiate_clean(backbone).build(pretrained=False)
        images.preprocess = pretrained.preprocess
        images.setup("fit")
        train = images.train_dataset
        labels = np.asarray(train.labels)
        counts = {name: int((labels == i).sum()) for i, name in enumerate(images.classes)}
        subset = self._subset(train, images.predict_transform())
        chosen, why = choose_backend(backend, device, len(subset), images.preprocess.crop_size)
        subset, workers = decoded_once(subset, images.preprocess.crop_size, images.num_workers)
        log.info("advisor: every-stage passes on %s (%s)", chosen, why)
        numerics = resolve_extraction(extraction, device, backend=chosen, strict=backend != "auto")
        # fp16 has no range for a random network's activations; bf16 and fp32 do.
        control_numerics = EXTRACTIONS["channels_last"] if numerics.autocast == torch.float16 else numerics
        # The control's BatchNorm statistics come from a torch pass in training mode.
        calibration = control_numerics.fallback or control_numerics
        timings = {"setup_s": time.perf_counter() - start}
        # The control is the body training from scratch would start from, with BatchNorm statistics
        # estimated on the user's images as the pretrained ones were on theirs: with its initial
        # statistics (mean 0, variance 1) its deep activations vanish and its probe means nothing.
        t = time.perf_counter()
        seen, hit = calibrated_control(
            control, subset, store, device=device, numerics=calibration, num_workers=workers
        )
        timings["control_batchnorm_s"] = time.perf_counter() - t
        timings["control_batchnorm_cache_hit"] = float(hit)
        control_note = (
            f"random init (torch seed {control_seed}, from advisor seed {self.seed}), BatchNorm "
            f"statistics estimated on {seen} training images (eval transform)"
        )

        feats = {}
        for name, body, num in (("pretrained", pretrained, numerics), ("random", control, control_numerics)):
            t = time.perf_counter()
            body.freeze(body.depth)  # eval mode and no gradients for good
            fs, hit, _ = cached_features(
                store,
                AllStages(body),
                subset,
                device=device,
                numerics=num,
                num_workers=workers,
                label=f"advisor: every stage of the {name} body",
            )
            feats[name] = np.split(fs.features.float().numpy(), np.cumsum(body.widths)[:-1], axis=1)
            y = fs.labels.numpy()
            timings[f"extract_{name}_s"] = time.perf_counter() - t
            timings[f"extract_{name}_cache_hit"] = float(hit)
        t = time.perf_counter()
        stages = score_stages(
            feats["pretrained"],
            feats["random"],
            y,
            strides=pretrained.strides,
            folds=self.folds,
            seed=self.seed,
            curve_at=lambda rows: best_stage(rows, self.rules)[3].stage,  # the curve decide reads
            probe_scaling=self.probe_scaling,
        )
        advice = decide(counts, stages, len(images.classes), self.rules)
        advice = replace(advice, control=control_note)
        timings["score_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - start
        timings["images"] = float(len(subset))
        return advice, timings

    def _subset(self, train: Any, transform: Any) -> Any:
        """At most `max_per_class` training images per class, through the eval transform."""
        labels = np.asarray(train.labels)
        generator = rng(self.seed, Stream.ADVISOR_SUBSET)
        keep = np.sort(
            np.concatenate(
                [
                    generator.permutation(np.flatnonzero(labels == c))[: self.max_per_class]
                    for c in np.unique(labels)
                ]
            )
        )
        subset = copy.copy(train)
        subset.indices = np.asarray(train.indices)[keep]
        subset.transform = transform
        return subset


def advise_from_config(cfg: Any, device: torch.device | None = None) -> tuple[Advice, dict[str, float]]:
    """The advice for a composed `train.yaml`/`advise.yaml` config: its data, backbone, cache folder
    and extraction setting; on `device`, else on the GPU when the trainer would use one."""
    advisor: Advisor = instantiate_clean(cfg.advisor)
    images = instantiate_clean(cfg.data)
    cache = cfg.get("cache") or {}
    store = FeatureStore(cache.get("dir") or f"{cfg.paths.cache_dir}/features")
    if device is None:
        accelerator = str(cfg.trainer.get("accelerator", "cpu"))
        cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
    return advisor.advise(
        images,
        to_dict(cfg.backbone),
        store,
        extraction=cache.get("extraction", "auto"),
        device=device,
        backend=cache.get("backend", "auto"),
    )
