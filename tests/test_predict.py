"""transfer-predict loses nothing: the output is checked before any work, bad images become error rows
(all named in one run), rows are written batch by batch."""

from __future__ import annotations

import csv
import errno
from pathlib import Path

import pytest

from tests.conftest import TINY, case_config
from tests.helpers.lightning import save_checkpoint
from transfer_cases.commands import predict as predict_module
from transfer_cases.commands.predict import main
from transfer_cases.training.module import TransferModule


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = TransferModule(
        backbone=TINY, case=case_config("small_similar"), num_classes=2, class_names=["a", "b"]
    )
    return save_checkpoint(module, tmp_path_factory.mktemp("predict") / "model.ckpt")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one message of a run that must stop with exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    return err


def test_missing_output_folder_is_created(ckpt: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder" / "predictions.csv"
    main([str(ckpt), str(image_folder / "val"), "--out", str(out)])
    rows = read_rows(out)
    assert len(rows) == 6 and all(r["class"] in ("a", "b") and r["error"] == "" for r in rows)


def test_read_only_output_is_one_message_before_any_work(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def read_only(*_: object, **__: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("transfer_cases.utils.folders.tempfile.NamedTemporaryFile", read_only)
    # The checkpoint does not even exist: the output is checked first.
    err = fails([str(tmp_path / "none.ckpt"), str(image_folder), "--out", str(tmp_path / "p.csv")], capsys)
    assert f"error: cannot write to --out folder={tmp_path}: read-only file system" in err


def test_output_that_is_a_folder(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails([str(tmp_path / "none.ckpt"), str(image_folder), "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} is a folder; give a file name, e.g. --out {tmp_path / 'predictions.csv'}" in err


@pytest.mark.parametrize("size", ["0", "-3"])
def test_batch_size_below_one(
    ckpt: Path, image_folder: Path, capsys: pytest.CaptureFixture[str], size: str
) -> None:
    err = fails([str(ckpt), str(image_folder), "--batch-size", size], capsys)
    assert f"error: --batch-size must be a whole number >= 1, got {size}; e.g. --batch-size 32" in err


def test_unreadable_images_get_error_rows_and_are_all_named(
    ckpt: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = image_folder / "val"
    (folder / "a" / "0_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "b" / "zz_empty.png").write_bytes(b"")
    out = tmp_path / "p.csv"
    main([str(ckpt), str(folder), "--out", str(out), "--batch-size", "3"])
    rows = read_rows(out)
    assert len(rows) == 8
    bad = {Path(r["file"]).name: r for r in rows if r["error"]}
    assert sorted(bad) == ["0_broken.jpg", "zz_empty.png"]
    assert all(
        r["class"] == "" and r["probability"] == "" and "cannot read image" in r["error"]
        for r in bad.values()
    )
    assert all(r["class"] in ("a", "b") for r in rows if not r["error"])
    err = capsys.readouterr().err
    assert "warning: 2 of 8 images could not be read" in err
    assert "0_broken.jpg" in err and "zz_empty.png" in err


def test_an_interruption_keeps_the_finished_batches(
    ckpt: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = []
    real_open = predict_module.open_image

    def open_then_interrupt(path: Path, name: str) -> object:
        opened.append(path)
        if len(opened) == 5:
            raise KeyboardInterrupt
        return real_open(path, name)

    monkeypatch.setattr(predict_module, "open_image", open_then_interrupt)
    out = tmp_path / "p.csv"
    with pytest.raises(KeyboardInterrupt):
        main([str(ckpt), str(image_folder / "val"), "--out", str(out), "--batch-size", "2"])
    assert [r["file"] for r in read_rows(out)] == [str(p) for p in opened[:4]]  # two whole batches


def test_onnxruntime_backend_predicts_what_torch_does(
    ckpt: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    rows = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.csv"
        main(
            [
                str(ckpt),
                str(image_folder),
                "--out",
                str(out),
                "--backend",
                backend,
                "--cache-dir",
                str(tmp_path),
            ]
        )
        rows[backend] = read_rows(out)
    assert [r["file"] for r in rows["torch"]] == [r["file"] for r in rows["onnxruntime"]]
    assert [r["class"] for r in rows["torch"]] == [r["class"] for r in rows["onnxruntime"]]
    for a, b in zip(rows["torch"], rows["onnxruntime"], strict=True):
        assert abs(float(a["probability"]) - float(b["probability"])) <= 1e-4
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1  # the exported body, kept for next time


def test_a_body_onnxruntime_cannot_run_is_predicted_on_torch(
    ckpt: Path,
    image_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("onnxruntime")
    from transfer_cases.features import onnx_body

    monkeypatch.setattr(onnx_body, "export_body", lambda body, example: b"not an onnx model")
    monkeypatch.setattr(onnx_body, "_SESSIONS", type(onnx_body._SESSIONS)())
    expected = predict_module.predict(ckpt, image_folder / "val", backend="torch")
    got = predict_module.predict(ckpt, image_folder / "val", backend="onnxruntime", cache_dir=tmp_path)
    assert got == expected
    assert caplog.text.count("running the body on torch") == 1


def test_unknown_backend(ckpt: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = fails([str(ckpt), str(image_folder), "--backend", "tensorrt"], capsys)
    assert "--backend: invalid choice: 'tensorrt'" in err
