"""transfer-report on a fake sweep folder (ok, failed and crashed jobs) and on a real 2-job sweep."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import write_image_folder
from transfer_cases.commands.report import CSV_FIELDS, DPI, collect_runs, main, write_report

CONFIG_ERROR = "ConfigError: case.keep=9 | the body has 3 stages\nchoose case.keep between -2 and 3"


def write_job(
    sweep: Path,
    name: str,
    case: str,
    summary: dict[str, Any] | None,
    history: Sequence[tuple[int, float, float]] = (),
    overrides: tuple[str, ...] = (),
    optimized_metric: str = "val/acc",
) -> Path:
    """A job folder as `transfer-train -m` leaves it; `summary=None` is a job that crashed hard."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    config = {
        "optimized_metric": optimized_metric,
        "case": {"name": case, "init": "pretrained", "keep": None},
        "backbone": {"_target_": "transfer_cases.backbones.TorchvisionBackbone", "arch": "resnet18"},
        "data": {"root": "${asset:hymenoptera}"},  # left unresolved by the report
    }
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"case={case}", *overrides]), job / ".hydra" / "overrides.yaml")
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if history:
        # The CSV logger's layout: one row per logging event, blanks elsewhere.
        fields = ["epoch", "step", "train/loss_epoch", "val/acc", "val/f1", "val/loss"]
        lines = [",".join(fields), ",0,,,,"]
        for epoch, acc, f1 in history:
            lines += [f"{epoch},{epoch * 4 + 3},0.7,,,", f"{epoch},{epoch * 4 + 3},,{acc},{f1},0.5"]
        (job / "csv").mkdir()
        (job / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    return job


def ok_summary(case: str, acc: float, f1: float, best: float | None, time_s: float, trainable: int) -> dict:
    return {
        "status": "ok",
        "error": None,
        "case": case,
        "init": "pretrained",
        "backbone": "resnet18",
        "metrics": {"val/acc": acc, "val/f1": f1, "val/loss": 0.4},
        "best_checkpoint": "epoch01.ckpt" if best is not None else "",
        "best_score": best,
        "train_time_s": time_s,
        "epochs": 3,
        "params": {"trainable": trainable, "frozen": 1000},
    }


def fake_sweep(root: Path) -> Path:
    """Jobs 0, 1, 2 and 10 (so number order differs from name order), plus folders that are not jobs."""
    sweep = root / "sweep"
    history = [(0, 0.7, 0.6), (1, 0.9, 0.88), (2, 0.85, 0.8)]
    write_job(
        sweep,
        "0_small_similar",
        "small_similar",
        ok_summary("small_similar", 0.85, 0.8, 0.9, 12.5, 66),
        history,
    )
    # The checkpoint monitored val/loss: its best score (0.3) is no accuracy, so the final val/acc is used.
    write_job(
        sweep,
        "1_small_different",
        "small_different",
        ok_summary("small_different", 0.6, 0.55, 0.3, 75.0, 1234567),
        [(0, 0.5, 0.4), (1, 0.6, 0.55)],
        optimized_metric="val/loss",
    )
    failed = {"status": "failed", "error": CONFIG_ERROR, "case": "large_similar", "init": "pretrained"}
    write_job(sweep, "2_large_similar", "large_similar", failed)
    write_job(sweep, "10_large_different", "large_different", None, [(0, 0.4, 0.3)])
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "notes").mkdir()
    return sweep


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """The fake sweep's rows and report files, written once for the module (plotting is the slow part)."""
    root = tmp_path_factory.mktemp("report")
    rows = collect_runs(fake_sweep(root))
    return rows, write_report(rows, root / "out")


def test_rows_are_jobs_in_number_order_with_their_status(report: tuple) -> None:
    rows, _ = report
    assert [r["num"] for r in rows] == [0, 1, 2, 10]  # not "10" before "2", and no "notes"
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert [r["case"] for r in rows] == [
        "small_similar",
        "small_different",
        "large_similar",
        "large_different",
    ]


def test_accuracy_is_the_kept_checkpoints_and_f1_is_from_the_same_epoch(report: tuple) -> None:
    first, second, *_ = report[0]
    assert first["val_acc"] == 0.9  # best_score, not the last epoch's 0.85
    assert first["val_f1"] == 0.88  # epoch 1, the best one, not the last epoch's 0.8
    assert first["curve"] == [(0, 0.7), (1, 0.9), (2, 0.85)]
    assert (first["train_time_s"], first["trainable_params"], first["epochs"]) == (12.5, 66, 3)
    assert (second["val_acc"], second["val_f1"]) == (0.6, 0.55)  # best_score was a loss


def test_failed_and_crashed_jobs_keep_their_error_and_config(report: tuple) -> None:
    failed, crashed = report[0][2:]
    assert failed["error"] == CONFIG_ERROR
    assert failed["val_acc"] is None
    assert "no summary.json" in crashed["error"]
    # Without a summary, case, init and backbone come from the job's .hydra/config.yaml.
    assert (crashed["case"], crashed["init"], crashed["backbone"]) == (
        "large_different",
        "pretrained",
        "resnet18",
    )
    assert crashed["val_acc"] is None
    assert crashed["curve"] == [(0, 0.4)]  # as far as it got, for the learning curves


def test_markdown_has_a_row_per_job_and_names_failed_jobs(report: tuple) -> None:
    text = report[1]["markdown"].read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith(
        "| job | case | backbone | init | val acc | F1 | train time | trainable params"
    )
    assert table[1] == "| 0 | small_similar | resnet18 | pretrained | 0.900 | 0.880 | 12.5 s | 66 | 3 | ok |"
    assert "| 1m 15s | 1,234,567 |" in table[2]
    assert "failed: ConfigError: case.keep=9 \\| the body has 3 stages |" in table[3]  # first line, escaped
    assert "failed: no summary.json" in table[4]
    assert "Best val acc: **0.900**: small_similar, job 0." in text
    failed_section = text.split("## Failed jobs", 1)[1]
    assert "`2_large_similar`" in failed_section
    assert "choose case.keep between -2 and 3" in failed_section  # the full message, all lines
    assert "`10_large_different`" in failed_section
    assert "`0_small_similar`" not in failed_section


def test_csv_is_one_machine_readable_row_per_job(report: tuple) -> None:
    with open(report[1]["csv"], newline="") as f:
        reader = csv.DictReader(f)
        lines = list(reader)
    assert tuple(reader.fieldnames) == CSV_FIELDS
    assert [line["job"] for line in lines] == [
        "0_small_similar",
        "1_small_different",
        "2_large_similar",
        "10_large_different",
    ]
    assert float(lines[0]["val_acc"]) == 0.9
    assert lines[1]["trainable_params"] == "1234567"
    assert lines[2]["status"] == "failed"
    assert lines[2]["error"] == CONFIG_ERROR
    assert lines[2]["val_acc"] == ""


def red_pixels(path: Path) -> int:
    """Pixels of the colour that marks failed jobs (matplotlib's tab:red)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(pixels - [214, 39, 40]).sum(axis=2) < 40).sum())


def test_charts_are_written_and_mark_failed_jobs(report: tuple, tmp_path: Path) -> None:
    rows, paths = report
    for key in ("chart", "curves"):
        assert paths[key].stat().st_size > 10_000
    chart = Image.open(paths["chart"])
    assert chart.format == "PNG"
    assert chart.width == 11 * DPI
    assert red_pixels(paths["chart"]) > 200  # the hatched "failed" bars
    assert Image.open(paths["curves"]).size == (9 * DPI, 5 * DPI)
    # One job: no failure marks, and a shorter chart (its height follows the number of jobs).
    single = write_report(rows[:1], tmp_path)
    assert red_pixels(single["chart"]) == 0
    assert Image.open(single["chart"]).height < chart.height


def test_labels_name_what_varies_and_an_extra_column_shows_other_overrides(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for num, (arch, lr) in enumerate([("mobilenet_v2", "0.01"), ("resnet18", "0.001")]):
        summary = {**ok_summary("small_similar", 0.8, 0.7, 0.8, 5.0, 10), "backbone": arch}
        overrides = (f"backbone={arch}", f"model.optimizer.lr={lr}", "trainer.max_epochs=3")
        write_job(sweep, f"{num}_x", "small_similar", summary, overrides=overrides)
    rows = collect_runs(sweep)
    assert [r["label"] for r in rows] == [
        "small_similar · mobilenet_v2 · model.optimizer.lr=0.01",
        "small_similar · resnet18 · model.optimizer.lr=0.001",
    ]  # the same case and max_epochs everywhere: not repeated
    text = write_report(rows, tmp_path / "out")["markdown"].read_text()
    assert "| init | other overrides | val acc |" in text
    assert "| model.optimizer.lr=0.001 |" in text


def test_a_corrupt_job_config_is_a_failed_row_and_the_others_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    write_job(
        sweep, "0_a", "small_similar", ok_summary("small_similar", 0.8, 0.7, 0.8, 5.0, 10), [(0, 0.8, 0.7)]
    )
    broken = write_job(sweep, "1_b", "small_different", ok_summary("small_different", 0.7, 0.6, 0.7, 5.0, 10))
    (broken / ".hydra" / "config.yaml").write_text("case: {name: [unclosed\n  : : :\n")
    write_job(sweep, "2_c", "large_similar", ok_summary("large_similar", 0.9, 0.8, 0.9, 5.0, 10))
    main([str(sweep)])
    rows = collect_runs(sweep)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["error"].startswith("unreadable .hydra/config.yaml: ")
    assert rows[1]["case"] == "small_different"  # still known from its summary.json
    assert "failed: 1_b: unreadable .hydra/config.yaml" in capsys.readouterr().out


def test_learning_curve_of_a_resumed_run_reads_every_epoch_once(tmp_path: Path) -> None:
    """A resumed job's metrics.csv holds both sessions; an epoch logged twice counts once (the last)."""
    sweep = tmp_path / "sweep"
    job = write_job(sweep, "0_a", "small_similar", ok_summary("small_similar", 0.8, 0.7, None, 5.0, 10))
    (job / "csv").mkdir()
    (job / "csv" / "metrics.csv").write_text(
        "epoch,step,val/acc,val/f1\n0,2,0.5,0.4\n1,5,0.6,0.5\n1,5,0.65,0.55\n2,8,0.7,0.6\n3,11,0.8,0.7\n"
    )
    (row,) = collect_runs(sweep)
    assert row["curve"] == [(0, 0.5), (1, 0.65), (2, 0.7), (3, 0.8)]


def test_cli_prints_the_table_and_writes_into_the_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = fake_sweep(tmp_path)
    main([str(sweep)])  # returns normally (exit status 0) although two jobs failed
    out = capsys.readouterr().out
    assert "0.900" in out  # the table (its text columns may fold in a narrow terminal)
    assert "failed: 2_large_similar: ConfigError: case.keep=9" in out
    assert f"wrote {sweep / 'report.md'}" in out
    assert (sweep / "learning_curves.png").is_file()


def test_cli_latest_picks_the_newest_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    multiruns = tmp_path / "outputs" / "train" / "multiruns"
    old, new = multiruns / "2025-01-02_09-00-00_000001", multiruns / "2025-01-10_08-00-00_000001"
    for sweep in (new, old):  # created newest first: the name, not the creation order, decides
        write_job(
            sweep, "0_small_similar", "small_similar", ok_summary("small_similar", 0.8, 0.7, None, 1, 1)
        )
    main(["latest", "--out", "report"])
    assert "small_similar" in (tmp_path / "report" / "report.md").read_text()
    assert not (old / "report.md").exists()
    main(["latest"])
    assert (new / "report.md").is_file()
    assert not (old / "report.md").exists()


@pytest.mark.parametrize(
    ("sweep", "message"),
    [("empty", "no runs in empty"), ("missing", "no such folder: missing"), ("latest", "no sweeps under")],
)
def test_cli_exits_2_with_one_line_when_there_are_no_runs(
    sweep: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(SystemExit) as exit_info:
        main([sweep])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}")
    assert len(err.splitlines()) == 1


@pytest.mark.slow
def test_real_sweep_with_a_failing_job(tmp_path: Path) -> None:
    """Two tiny-CNN jobs through `transfer-train -m`, the second with a cut the body cannot make."""
    data = write_image_folder(tmp_path / "images", per_class=4, size=32)
    sweep = tmp_path / "sweep"
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("transfer-train")),
            "-m",
            "case.keep=null,9",
            "backbone=tiny_cnn",
            "backbone.image_size=32",
            f"data.root={data}",
            "data.num_workers=0",
            "trainer.max_epochs=2",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]  # one failed job does not end the sweep
    rows = collect_runs(sweep)
    assert [(r["num"], r["status"]) for r in rows] == [(0, "ok"), (1, "failed")]
    assert rows[0]["case"] == "small_similar"
    assert 0 <= rows[0]["val_acc"] <= 1
    assert rows[0]["epochs"] == 2
    assert [epoch for epoch, _ in rows[0]["curve"]] == [0, 1]
    assert "keep" in rows[1]["error"]
    assert [r["label"] for r in rows] == ["small_similar · case.keep=null", "small_similar · case.keep=9"]
    main([str(sweep)])
    failed_section = (sweep / "report.md").read_text().split("## Failed jobs", 1)[1]
    assert "`1_small_similar`" in failed_section
    assert "`0_" not in failed_section


def test_upstream_noise_is_filtered_by_its_exact_message_only(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import warnings

    from lightning.pytorch.utilities import rank_zero_info

    from transfer_cases.reporting.terminal import (
        UPSTREAM_LOG_PREFIXES,
        UPSTREAM_WARNINGS,
        quiet_upstream_noise,
    )

    (message, category, _), tip = UPSTREAM_WARNINGS[0], UPSTREAM_LOG_PREFIXES[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_upstream_noise()
        warnings.warn(message, category, stacklevel=1)
        warnings.warn(message.replace("LeafSpec", "OtherSpec"), category, stacklevel=1)  # a new message shows
    assert [str(w.message) for w in caught] == [message.replace("LeafSpec", "OtherSpec")]
    with caplog.at_level(logging.INFO):
        rank_zero_info(tip + " to enable LitLogger, ...")
        rank_zero_info("GPU available: False")
    assert "Tip" not in caplog.text
    assert "GPU available: False" in caplog.text


class _Fit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_only_on_a_terminal_else_a_line_per_interval(
    terminal: bool, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from transfer_cases.reporting.terminal import TerminalProgressBar

    data = torch.utils.data.DataLoader(
        list(zip(torch.randn(6, 2), torch.zeros(6), strict=True)), batch_size=2
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[TerminalProgressBar(interval_s=0, terminal=terminal)],
    )
    with caplog.at_level(logging.INFO, logger="transfer_cases.reporting.terminal"):
        trainer.fit(_Fit(), train_dataloaders=data)
    out = capsys.readouterr().out  # Lightning's bars write to stdout
    lines = [r.getMessage() for r in caplog.records if r.name == "transfer_cases.reporting.terminal"]
    if terminal:
        assert "Epoch 1" in out and lines == []
    else:
        assert "Epoch" not in out and "it/s" not in out
        assert [line for line in lines if "done" in line] == [
            line
            for line in lines
            if line.startswith(("epoch 1/2 done train/loss=", "epoch 2/2 done train/loss="))
        ]
        assert sum("done" in line for line in lines) == 2
        assert sum(line.startswith("epoch 0, batch ") for line in lines) == 3  # interval 0: every batch
