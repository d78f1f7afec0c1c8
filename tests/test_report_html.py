"""report.html of a run and of a sweep: self-contained, the right numbers, cheap; tables at 80 columns."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from tests.test_report import fake_sweep, ok_summary, write_job
from transfer_cases.commands.report import main, print_rows
from transfer_cases.data.sources import FileSource, SubsetDataset
from transfer_cases.reporting.predictions import PREDICTIONS_FILE, ValPredictions, read_predictions
from transfer_cases.reporting.run_report import per_class_scores, run_html, write_run_report
from transfer_cases.reporting.sweep import collect_runs
from transfer_cases.reporting.table import layout

EXTERNAL = re.compile(r"""(src|href)=["'](?!data:|#)([^"']+)""")


def no_external_resources(html: str, allowed: tuple[str, ...] = ()) -> bool:
    """Nothing the page would fetch: every src/href is a data URI (or an allowed relative link)."""
    return all(target in allowed for _, target in EXTERNAL.findall(html))


class TinyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.head(batch[0])


class TinyData(L.LightningDataModule):
    """Three classes of coloured squares; images are files (their thumbnails go to the report)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
        paths, labels = [], []
        for i in range(9):
            path = root / f"{i}.png"
            Image.new("RGB", (20, 20), colours[i % 3]).save(path)
            paths.append(path)
            labels.append(i % 3)
        self.classes = ["red", "green", "blue"]
        self.val_dataset = SubsetDataset(FileSource(paths, labels), np.arange(9), transform=None)
        x = torch.from_numpy(
            np.stack([np.asarray(Image.open(p), dtype=np.float32).mean(axis=(0, 1)) / 200 for p in paths])
        )
        self.tensors = (x, torch.tensor(labels))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(list(zip(*self.tensors, strict=True)), batch_size=4)


def test_val_predictions_are_recorded_from_trainer_validate_only(tmp_path: Path) -> None:
    """The best checkpoint's re-validation (`trainer.validate`) is recorded, with the head's own
    outputs and thumbnails of the most confidently wrong images; the run folder alone rebuilds it."""
    torch.manual_seed(0)
    model, data = TinyModel(), TinyData(tmp_path)
    callback = ValPredictions(tmp_path, top_wrong=4)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(model, datamodule=data, verbose=False)
    p = read_predictions(tmp_path)
    assert p is not None
    expected = model.head(data.tensors[0]).softmax(dim=1).detach().numpy()
    np.testing.assert_allclose(p["probs"], expected, rtol=1e-5)
    assert p["labels"].tolist() == data.tensors[1].tolist()
    assert list(p["classes"]) == data.classes
    wrong = np.flatnonzero(expected.argmax(1) != p["labels"])
    assert len(p["wrong"]) == min(4, len(wrong)) > 0
    confidence = expected[p["wrong"], expected[p["wrong"]].argmax(1)]
    assert list(confidence) == sorted(confidence, reverse=True)
    assert all(t.startswith("data:image/jpeg;base64,") for t in p["thumbs"])
    assert all(n.endswith(".png") for n in p["names"])
    assert not callback._logits or callback._hook is None  # the hook is removed after the pass


def write_run(run: Path, probs: np.ndarray, labels: np.ndarray) -> Path:
    run.mkdir(parents=True)
    summary = {
        **ok_summary("small_similar", 0.5, 0.4, 0.5, 3.2, 99),
        "warnings": ["predictions collapsed onto one class"],
        "advice": {
            "case": "small_similar",
            "size": "small",
            "similarity": "similar",
            "best_stage": 3,
            "depth": 3,
        },
        "phases": {"fit": {"epochs": 3, "train_time_s": 3.2}},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss_epoch,train/acc,val/acc,val/loss\n0,1,0.9,0.5,,\n0,1,,,0.4,0.8\n1,3,0.7,0.6,,\n1,3,,,0.5,0.7\n"
    )
    thumb = "data:image/jpeg;base64," + "A" * 8
    np.savez(
        run / PREDICTIONS_FILE,
        probs=probs.astype(np.float32),
        labels=labels,
        classes=np.asarray(["ant", "bee"]),
        wrong=np.asarray([1]),
        thumbs=np.asarray([thumb]),
        names=np.asarray(["bee_17.jpg"]),
    )
    return run


def test_run_report_holds_every_section_from_the_run_folder_alone(tmp_path: Path) -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 1])
    run = write_run(tmp_path / "run", probs, labels)
    start = time.perf_counter()
    path = write_run_report(run, strict=True)
    assert time.perf_counter() - start < 1.0
    html = path.read_text()
    assert no_external_resources(html)
    for heading in (
        "What was trained",
        "Learning curves",
        "Confusion matrix",
        "Per class",
        "Most confidently wrong",
    ):
        assert heading in html
    assert "predictions collapsed onto one class" in html  # the run's warnings, on top
    assert "Advisor&#x27;s evidence" in html and "small_similar" in html
    assert html.count("<svg") == 2 and "<polyline" in html
    assert "bee_17.jpg" in html and "true: bee" in html
    matrix, scores = per_class_scores(probs, labels, 2)
    assert matrix.tolist() == [[1, 0], [2, 1]]  # rows: true class
    assert scores[1]["recall"] == pytest.approx(1 / 3) and scores[0]["precision"] == pytest.approx(1 / 3)
    assert ">0.333<" in html


def test_run_report_of_a_failed_run_without_predictions_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "failed", "error": "DataError: no images"}))
    html = run_html(run)
    assert "the run failed: DataError: no images" in html
    assert "No val_predictions.npz" in html and "No csv/metrics.csv" in html
    main([str(run)])  # transfer-report on a run folder rebuilds its report.html
    assert (run / "report.html").read_text() == html


def test_sweep_html_is_sortable_self_contained_and_links_job_reports(tmp_path: Path) -> None:
    sweep = fake_sweep(tmp_path)
    (sweep / "0_small_similar" / "report.html").write_text("<html></html>")
    main([str(sweep)])
    html = (sweep / "report.html").read_text()
    assert no_external_resources(html, allowed=("0_small_similar/report.html",))
    assert 'class="sortable"' in html and "addEventListener" in html
    assert html.count("data:image/png;base64,") == 2
    assert html.count('<tr class="failed">') == 2
    assert "choose case.keep between -2 and 3" in html  # the failed job's whole error


def test_terminal_table_fits_80_columns_without_cutting_an_identifier(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Long backbone names and overrides: constant columns go to a header line, abbreviations get a
    legend, and what still does not fit is listed whole under the table."""
    sweep = tmp_path / "sweep"
    archs = ["mobilenet_v3_large", "convnext_tiny"]
    for num, arch in enumerate(archs):
        summary = {**ok_summary("small_similar", 0.8, 0.7, 0.8, 65.0, 1234567), "backbone": arch}
        overrides = (f"backbone={arch}", f"model.optimizer.lr=0.00{num + 1}", "data.samples_per_class=20")
        write_job(sweep, f"{num}_x", "small_similar", summary, overrides=overrides)
    print_rows(collect_runs(sweep))
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    assert "case: small_similar" in out  # the same in every row
    for arch in archs:
        assert arch in out
    assert "model.optimizer.lr=0.001" in out and "model.optimizer.lr=0.002" in out
    assert not any(line.startswith(("small_s", "imilar")) for line in lines)


def test_layout_abbreviates_with_a_legend_and_keeps_numbers_right_aligned() -> None:
    table = layout(
        ["job", "trainable params", "name"],
        [["0", "1,234", "a"], ["10", "5", "b" * 50]],
        width=40,
        numeric=["job", "trainable params"],
        abbreviations={"trainable params": "params"},
        key="job",
    )
    assert table.header.split() == ["job", "params"]  # the wide name column moved under the table
    assert "(params = trainable params)" in table.foot
    assert f"10: name: {'b' * 50}" in table.foot
    assert table.lines[0].endswith("1,234") and table.lines[1].endswith("    5")
    assert all(len(line) <= 40 for line in [table.header, *table.lines])
