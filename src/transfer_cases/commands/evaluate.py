"""`transfer-eval ckpt_path=... [split=val|test|train] [data=...]`: metrics table and confusion matrix.

The model, its class names and its preprocessing come from the checkpoint; the images from the
`data` group, so one checkpoint can be scored on another folder with the same classes.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import matplotlib.pyplot as plt
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from transfer_cases.commands.cli import friendly_errors, run_hydra
from transfer_cases.data import ClassificationDataModule, SubsetDataset
from transfer_cases.training.checkpoint import load_module
from transfer_cases.utils.atomic import atomic_text, atomic_write, atomic_write_text
from transfer_cases.utils.checks import check_eval_config
from transfer_cases.utils.config import instantiate_clean
from transfer_cases.utils.errors import ConfigError, DataError
from transfer_cases.utils.paths import config_dir

SPLITS = ("train", "val", "test")


def split_loader(datamodule: ClassificationDataModule, split: str) -> DataLoader:
    """The split's images through the eval transform (no augmentation, even for train)."""
    if split not in SPLITS:
        raise ConfigError(f"split={split} is not one of {', '.join(SPLITS)}")
    datamodule.setup()
    dataset = getattr(datamodule, f"{split}_dataset")
    if dataset is None:
        raise DataError(
            f"the data has no {split} split; choose split=val or give data.root a {split}/ folder"
        )
    dataset = SubsetDataset(dataset.source, dataset.indices, datamodule.predict_transform())
    return DataLoader(dataset, batch_size=datamodule.batch_size, num_workers=datamodule.num_workers)


def score(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    """Rows of a metrics table: one per class, then the overall accuracy and macro averages."""
    n = len(class_names)
    per_class = {
        "precision": multiclass_precision(probs, labels, n, average=None),
        "recall": multiclass_recall(probs, labels, n, average=None),
        "f1": multiclass_f1_score(probs, labels, n, average=None),
    }
    support = torch.bincount(labels, minlength=n)
    rows = [
        {"class": name, **{k: float(v[i]) for k, v in per_class.items()}, "support": int(support[i])}
        for i, name in enumerate(class_names)
    ]
    rows.append(
        {
            "class": "macro avg",
            "precision": float(multiclass_precision(probs, labels, n)),
            "recall": float(multiclass_recall(probs, labels, n)),
            "f1": float(multiclass_f1_score(probs, labels, n)),
            "support": int(support.sum()),
        }
    )
    rows.append({"class": "accuracy", "f1": float(multiclass_accuracy(probs, labels, n, average="micro"))})
    return rows


def write_reports(
    rows: list[dict[str, Any]], probs: torch.Tensor, labels: torch.Tensor, names: list[str], out: Path
) -> None:
    """Each file atomically (see transfer_cases.utils.atomic): whole or absent, class names of any bytes."""
    fields = ["class", "precision", "recall", "f1", "support"]
    with atomic_text(out / "metrics.csv", what="metrics CSV") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in fields) + " |" for r in rows]
    atomic_write_text(out / "metrics.md", "\n".join(lines) + "\n", what="metrics table")
    matrix = MulticlassConfusionMatrix(len(names))
    matrix.update(probs, labels)
    fig, _ = matrix.plot(labels=[_printable(n) for n in names])
    fig.set_size_inches(max(4, 0.6 * len(names) + 2), max(4, 0.6 * len(names) + 2))
    try:
        atomic_write(
            out / "confusion_matrix.png",
            lambda f: fig.savefig(f, dpi=120, format="png"),
            what="confusion matrix",
        )
    finally:
        plt.close(fig)


def _printable(name: str) -> str:
    """A class name for a figure: bytes that are not UTF-8 (surrogate escapes) as \\x.. escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the checkpoint on one split; writes metrics.{csv,md} and confusion_matrix.png."""
    check_eval_config(cfg)
    module = load_module(cfg.ckpt_path)
    datamodule: ClassificationDataModule = instantiate_clean(cfg.data)
    if list(datamodule.classes) != list(module.class_names):
        raise DataError(
            f"the checkpoint was trained on classes {module.class_names} but data.root has "
            f"{datamodule.classes}; point data.root at images of the same classes"
        )
    datamodule.preprocess = module.preprocess
    loader = split_loader(datamodule, cfg.split)
    trainer = instantiate_clean(cfg.trainer, logger=False, callbacks=[], enable_model_summary=False)
    probs = torch.cat(trainer.predict(module, dataloaders=loader))
    labels = torch.as_tensor(loader.dataset.labels)
    rows = score(probs, labels, module.class_names)
    out = Path(cfg.paths.output_dir)
    write_reports(rows, probs, labels, module.class_names, out)
    return {"rows": rows, "output_dir": str(out)}


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
@friendly_errors
def _main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed, verbose=False)
    result = evaluate(cfg)
    table = Table(title=f"{cfg.split} split of {cfg.data.root}")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in result["rows"]:
        table.add_row(*(_fmt(r.get(k, "")) for k in ("class", "precision", "recall", "f1", "support")))
    console = Console()
    console.print(table)
    console.print(f"metrics and confusion matrix in {result['output_dir']}")


def main() -> None:
    run_hydra(_main)


if __name__ == "__main__":
    main()
