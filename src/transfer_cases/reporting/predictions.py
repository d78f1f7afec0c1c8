"""`val_predictions.npz`: what the best checkpoint predicts for every validation image, for the report.

The run's last validation is `measure_best` validating the best checkpoint again (`trainer.validate`).
This callback listens to that pass only, and reads the logits off the head as the module computes
them (a forward hook), so the report costs no extra pass over the data: the confusion matrix,
per-class scores and the most confidently wrong images all come from this one file. The thumbnails
of those images are stored in it too, so the report can be rebuilt from the run folder alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn

from transfer_cases.reporting.html import thumbnail_uri
from transfer_cases.utils.atomic import atomic_write

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "val_predictions.npz"


class ValPredictions(L.Callback):
    """Record the best checkpoint's validation probabilities (callbacks config `val_predictions`).

    Args:
        dirpath: the run folder (`${paths.output_dir}`).
        top_wrong: thumbnails kept of the most confidently wrong images.
    """

    def __init__(self, dirpath: str | Path, top_wrong: int = 16) -> None:
        self.dirpath = Path(dirpath)
        self.top_wrong = top_wrong
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._hook: Any = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn != TrainerFn.VALIDATING or trainer.world_size > 1 or trainer.sanity_checking:
            return  # the fit's epochs, and DDP (each rank sees a share of the split), are not recorded
        self._logits, self._labels = [], []
        self._hook = pl_module.head.register_forward_hook(
            lambda _module, _inputs, output: self._logits.append(output.detach().float().cpu())
        )

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._hook is not None:
            self._labels.append(batch[1].detach().cpu())

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        try:
            self._write(trainer)
        except Exception as e:  # the report is a convenience: it never fails a run
            log.warning("could not record the validation predictions for the report: %s", e)

    def _write(self, trainer: L.Trainer) -> None:
        if not self._logits:
            return
        probs = torch.cat(self._logits).softmax(dim=1).numpy().astype(np.float32)
        labels = torch.cat(self._labels).numpy().astype(np.int64)
        if len(probs) != len(labels):
            raise ValueError(f"{len(probs)} predictions for {len(labels)} labels")
        data = trainer.datamodule
        images = getattr(data, "images", data)  # a feature data module keeps its image data module
        dataset = images.val_dataset
        wrong = most_confidently_wrong(probs, labels, self.top_wrong)
        thumbs, names = [], []
        for i in wrong:
            index = int(dataset.indices[i])
            thumbs.append(thumbnail_uri(dataset.source.load(index)))
            paths = getattr(dataset.source, "paths", None)
            names.append(Path(paths[index]).name if paths is not None else f"#{index}")
        arrays = {
            "probs": probs,
            "labels": labels,
            "classes": np.asarray(list(images.classes), dtype=str),
            "wrong": np.asarray(wrong, dtype=np.int64),
            "thumbs": np.asarray(thumbs, dtype=str),
            "names": np.asarray(names, dtype=str),
        }
        atomic_write(self.dirpath / PREDICTIONS_FILE, lambda f: np.savez(f, **arrays), what="val predictions")


def most_confidently_wrong(probs: np.ndarray, labels: np.ndarray, k: int) -> list[int]:
    """Indices of the `k` misclassified samples whose predicted class has the highest probability."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = np.argsort(-probs[wrong, predicted[wrong]], kind="stable")
    return [int(i) for i in wrong[order][:k]]


def read_predictions(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The run's recorded validation predictions, or None when it has none."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
