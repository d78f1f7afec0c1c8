"""transfer-eval and transfer-predict on a real checkpoint; the default job end to end (slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import write_image_folder
from tests.test_configs import TINY_OVERRIDES, run_cli
from transfer_cases import config_dir
from transfer_cases.commands.evaluate import evaluate
from transfer_cases.commands.predict import predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained from the command line on three colour classes; returns (checkpoint, data)."""
    tmp = tmp_path_factory.mktemp("trained")
    data = write_image_folder(tmp / "images", classes=("red", "green", "blue"), per_class=12)
    run = run_cli(
        "transfer-train",
        *TINY_OVERRIDES,
        "case=large_different",
        "case.init=scratch",
        f"data.root={data}",
        "trainer.max_epochs=10",
        "data.batch_size=8",
        "callbacks.progress_bar.refresh_rate=0",
        f"hydra.run.dir={tmp / 'run'}",
        cwd=tmp,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "best checkpoint:" in run.stdout
    (ckpt,) = (tmp / "run" / "checkpoints").glob("epoch*.ckpt")
    assert (tmp / "run" / "csv" / "metrics.csv").is_file()
    return ckpt, data


def test_eval_writes_metrics_and_confusion_matrix(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = trained
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={ckpt}",
                f"data.root={data}",
                "data.num_workers=0",
                f"paths.output_dir={tmp_path}",
            ],
        )
    result = evaluate(cfg)
    rows = {r["class"]: r for r in result["rows"]}
    assert [r["support"] for r in result["rows"][:3]] == [6, 6, 6]  # val: 6 images per class
    assert rows["accuracy"]["f1"] > 0.9  # colours are easy; a broken pipeline scores ~1/3
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    with open(tmp_path / "metrics.csv") as f:
        assert [r["class"] for r in csv.DictReader(f)] == [
            "blue",
            "green",
            "red",
            "macro avg",
            "accuracy",
        ]  # sorted folder names


def test_predict_writes_one_row_per_image_with_class_names(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, data = trained
    out = tmp_path / "predictions.csv"
    run = run_cli("transfer-predict", str(ckpt), str(data / "val"), "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18
    correct = sum(Path(r["file"]).parent.name == r["class"] for r in rows)
    assert correct >= 16
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)
    assert predict(ckpt, data / "val" / "red" / "0.png")[0]["class"] == "red"


def test_predict_on_missing_checkpoint_is_a_clean_error(tmp_path: Path) -> None:
    run = run_cli("transfer-predict", str(tmp_path / "none.ckpt"), str(tmp_path), cwd=tmp_path)
    assert run.returncode == 2 and "checkpoint not found" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_default_job_reaches_90_percent(tmp_path: Path) -> None:
    run = run_cli(
        "transfer-train", "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "csv" / "metrics.csv") as f:
        accs = [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]
    assert len(accs) == 50 and accs[-1] >= 0.90  # small_similar's 50 head epochs, on cached features
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["feature_cache"]["files"]) == {"train", "val"}


def test_the_commands_skip_the_interpreters_last_collection_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gc.freeze` runs at exit, registered once however many commands a process runs: the final
    collection then has nothing to walk (the speed-up is measured by make bench's default job)."""
    import atexit
    import gc

    from transfer_cases.commands import cli

    registered: list[object] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(cli, "_final_collection_skipped", False)
    cli.skip_final_collection()
    cli.skip_final_collection()
    assert registered == [gc.freeze]
