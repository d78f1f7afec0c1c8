"""Issue 24, second part: misspelt keys, a checkpoint mode against its metric, a bound on the image
size, outputs of any file name, data a user does not have yet, and a cache key by content."""

from __future__ import annotations

import csv
import errno
import gzip
import hashlib
import io
import os
import pickle
import re
import shutil
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tests.conftest import TINY, case_config
from tests.helpers.cli import run_console_script
from tests.helpers.lightning import save_checkpoint
from tests.test_configs import cli_env
from tests.test_report import ok_summary, write_job
from tests.test_settings import one_line_error, train_cli
from transfer_cases.commands.evaluate import write_reports
from transfer_cases.commands.predict import main as predict_main
from transfer_cases.data import CIFAR10DataModule, MNISTDataModule, cifar10, download, mnist
from transfer_cases.data.sources import FileSource, SubsetDataset
from transfer_cases.features.cached import cached_features
from transfer_cases.features.extract import resolve_extraction
from transfer_cases.features.store import FeatureStore
from transfer_cases.training.module import TransferModule
from transfer_cases.utils import atomic
from transfer_cases.utils.checks import check_shared_settings
from transfer_cases.utils.errors import ConfigError, DataError
from transfer_cases.utils.paths import config_dir
from transfer_cases.utils.schema import check_known_keys

ROOT = config_dir().parent
TB = r"\d+\.\d TiB"

# --- bad inputs through transfer-train: one line, exit 2, before any work ---------------------------

BAD = {
    # Thresholds of the advisor's Rules that the config file does not list (added with +).
    "+advisor.tie_margin=nan": r"^error: advisor\.tie_margin=nan must be a number >= 0 and <= 1",
    "+advisor.related_sems=true": r"^error: advisor\.related_sems=True must be a number >= 0",
    "+trainer.max_epoch=3": r"^error: unknown setting trainer\.max_epoch; did you mean "
    r"trainer\.max_epochs\?$",
    "+data.batchsize=4": r"^error: unknown setting data\.batchsize; did you mean data\.batch_size\?$",
    "+model.foo=1": r"^error: unknown setting model\.foo: transfer_cases\.training\.module\.TransferModule "
    r"takes no 'foo'",
    "data.image_size=100000": rf"data\.image_size=100000 is larger than 4096: one batch of 32 images "
    rf"\(32 x 3 x 100000 x 100000 float32\) would need {TB} of memory for its input alone; "
    r"e\.g\. data\.image_size=224",
    "optimized_metric=val/loss callbacks.model_checkpoint.mode=max": r"callbacks\.model_checkpoint\.mode=max "
    r"keeps the epoch with the highest val/loss, the worst one; e\.g\. callbacks\.model_checkpoint\.mode=min",
    # A relative paths.data_dir is the project root's, not the current folder's (the test runs elsewhere).
    "data=mnist paths.data_dir=no_such_data": r"MNIST folder not found: "
    rf"{re.escape(str(ROOT))}/no_such_data/mnist; "
    r"it must hold train-images-idx3-ubyte\[\.gz\], train-labels-idx1-ubyte\[\.gz\], "
    r"t10k-images-idx3-ubyte\[\.gz\], t10k-labels-idx1-ubyte\[\.gz\]; the official files are at "
    r"https://ossci-datasets\.s3\.amazonaws\.com/mnist/ .*pass data\.download=true",
    "data=cifar10 paths.data_dir=no_such_data": r"CIFAR-10 data not found: "
    rf"{re.escape(str(ROOT))}/no_such_data/cifar10_jpg/cifar10_jpg\.zip; expected cifar10_jpg\.zip .*"
    r"cifar-10-batches-py/ \(data_batch_1\.\.5, test_batch, batches\.meta\) from "
    r"https://www\.cs\.toronto\.edu/~kriz/cifar-10-python\.tar\.gz: pass data\.download=true",
    "+data.download=true": r"unknown setting data\.download: transfer_cases\.data\.ImageFolderDataModule "
    r"takes no 'download'",
    "cache.stamp=size": r"cache\.stamp='size' is not one of: mtime, content",
    "+model.optimizer.betas=[2,3]": r"^error: model\.optimizer \(torch\.optim\.AdamW\) refuses its settings: "
    r"Invalid beta parameter at index 0: 2; fix the model\.optimizer setting it names",
    "advisor.small_max_per_class=-1": r"^error: advisor\.small_max_per_class=-1 is not a whole number >= 1 "
    r"\(median train images per class below which data is small\); e\.g\. advisor\.small_max_per_class=100$",
    "advisor.small_max_per_class=abc": r"^error: advisor\.small_max_per_class='abc' is not a whole number",
    "advisor.tie_sems=nan": r"^error: advisor\.tie_sems=nan must be a number >= 0",
    "callbacks.progress_bar.interval_s=abc": r"^error: callbacks\.progress_bar\.interval_s='abc' must be a "
    r"number",
    "callbacks.progress_bar.interval_s=nan": r"^error: callbacks\.progress_bar\.interval_s=nan must be a "
    r"number >= 0",
    "audit.min_correlation=nan": r"^error: audit\.min_correlation=nan must be a number >= -1 and <= 1",
    "audit.folds=1": r"^error: audit\.folds=1 is not a whole number >= 2 \(folds of the out-of-fold probe\)",
    # Hydra's own refusals of the command line: one line naming the fix, exit 2 (were Hydra's, exit 1).
    "data=imagefolder data.root=/tmp/my data": r"^error: 'data' is not a key=value override; if it is the "
    r"rest of a value with spaces, quote the whole override, e\.g\. 'data\.root=\"/data/my images\"'$",
    "data=imagefolder data.root=/tmp/café": r"^error: cannot read the override 'data\.root=/tmp/café'; quote",
    "case=auto case.keep=2": r"^error: case\.keep is not a setting of this case: with case=auto the advisor "
    r"picks the cut; .*e\.g\. case=small_different case\.keep=2$",
    "trainer.max_epoch=3": r"^error: unknown setting trainer\.max_epoch; did you mean trainer\.max_epochs\?$",
    "backbone.widths=[]": r"^error: backbone\.widths=\[\] is not a list of channel widths",
    "backbone.widths=[0,0,0]": r"^error: backbone\.widths=\[0, 0, 0\] is not a list of channel widths",
    "backbone.widths=abc": r"^error: backbone\.widths='abc' is not a list of channel widths",
    "data.random_crop_scale=abc": r"^error: data\.random_crop_scale='abc' is not a \(low, high\) pair",
    "data.random_crop_scale=0.5": r"^error: data\.random_crop_scale=0\.5 is not a \(low, high\) pair",
    "cache.dir=null": r"^error: cache\.dir=None is not a folder path; e\.g\. cache\.dir=",
    # A cache folder that exists but cannot be written (sysfs refuses new files, even to root).
    "cache.dir=/sys/kernel": r"cannot write to the feature cache folder /sys/kernel \(.*\); set "
    r"paths\.cache_dir \(or cache\.dir\) to a folder you can write",
}


def _sys_is_read_only() -> bool:
    try:
        (Path("/sys/kernel") / ".probe").touch()
    except OSError:
        return True
    return False


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(o, marks=pytest.mark.skipif(not _sys_is_read_only(), reason="needs sysfs"))
        if "/sys" in o
        else o
        for o in BAD
    ],
)
def test_bad_inputs_stop_with_one_line(tmp_path: Path, image_folder: Path, overrides: str) -> None:
    root = [] if "data=" in overrides and "download" not in overrides else [f"data.root={image_folder}"]
    run = train_cli(*root, "trainer.max_epochs=1", *overrides.split(), cwd=tmp_path)
    line = one_line_error(run)
    assert re.search(BAD[overrides], line), line
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- keys the target takes still work; misspelt ones are named ---------------------------------------


def test_added_keys_are_checked_against_their_target(compose_train: Callable[..., DictConfig]) -> None:
    for ok in (
        "+trainer.limit_train_batches=2",
        "+trainer.accumulate_grad_batches=2",
        "+callbacks.timer._target_=lightning.pytorch.callbacks.Timer",
        "+model.optimizer.betas=[0.9,0.99]",
        "+callbacks.model_checkpoint.every_n_epochs=2",
        "+logger.csv.flush_logs_every_n_steps=10",
    ):
        check_known_keys(compose_train(ok))
    with pytest.raises(
        ConfigError, match=r"^unknown setting model\.optimizer\.beta; did you mean model\.optimizer\.betas\?$"
    ):
        check_known_keys(compose_train("+model.optimizer.beta=[0.9,0.99]"))


# --- the best checkpoint's mode follows its metric ------------------------------------------------


def test_the_best_checkpoint_mode_follows_a_loss(compose_train: Callable[..., DictConfig]) -> None:
    """mode: max under val/loss kept the epoch of the highest loss as "best"."""
    cfg = compose_train("optimized_metric=val/loss")
    check_shared_settings(cfg)
    callback = instantiate(cfg.callbacks.model_checkpoint)
    assert (callback.monitor, callback.mode) == ("val/loss", "min")


# --- one writer: names that are not UTF-8 ---------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = TransferModule(
        backbone=TINY, case=case_config("small_similar"), num_classes=2, class_names=["a", "b"]
    )
    return save_checkpoint(module, tmp_path_factory.mktemp("predict") / "model.ckpt")


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
def test_predict_writes_every_row_of_a_folder_with_a_non_utf8_name(tmp_path: Path, ckpt: Path) -> None:
    """`caf\\xe9.png` (Latin-1) reaches Python surrogate-escaped; the CSV stopped at its row."""
    folder = tmp_path / "images"
    folder.mkdir()
    names = [b"a.png", b"caf\xe9.png", b"z.png"]
    for name in names:
        Image.new("RGB", (40, 40), (200, 30, 30)).save(os.fsdecode(os.fsencode(folder) + b"/" + name))
    out = tmp_path / "p.csv"
    exe = Path(sys.executable).with_name("transfer-predict")
    run = run_console_script(
        [str(exe), str(ckpt), str(folder), "--out", str(out)], cwd=tmp_path, env=cli_env(), timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert [os.fsencode(r["file"]).rsplit(b"/", 1)[1] for r in rows] == names  # the original bytes
    assert all(r["class"] in ("a", "b") and r["error"] == "" for r in rows)


def test_eval_reports_keep_a_non_utf8_class_name(tmp_path: Path) -> None:
    names = ["a", "caf\udce9"]  # a class folder named b"caf\xe9"
    probs, labels = torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1])
    write_reports([{"class": n, "f1": 1.0} for n in names], probs, labels, names, tmp_path)
    assert b"caf\xe9," in (tmp_path / "metrics.csv").read_bytes()
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp"))


# --- data.download: the official files, checked, atomically (offline: a fake downloader) ------------


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _fake_server(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> list[str]:
    """`download_url` writing `files[name]` (what a mirror would serve); returns the URLs asked for."""
    asked: list[str] = []

    def fake_download_url(url: str, root: str, filename: str) -> None:
        asked.append(url)
        Path(root, filename).write_bytes(files[filename])

    monkeypatch.setattr(download, "download_url", fake_download_url)
    return asked


def _mnist_files() -> dict[str, bytes]:
    train = np.repeat(np.arange(10), 3)
    return {
        "train-images-idx3-ubyte.gz": _idx(np.ones((30, 6, 6)) * train[:, None, None]),
        "train-labels-idx1-ubyte.gz": _idx(train),
        "t10k-images-idx3-ubyte.gz": _idx(np.zeros((4, 6, 6))),
        "t10k-labels-idx1-ubyte.gz": _idx(np.arange(4)),
    }


def _served(monkeypatch: pytest.MonkeyPatch, module: object, files: dict[str, bytes]) -> list[str]:
    """Serve `files` and give the module's resources their MD5s (the real ones are of the real files)."""
    asked = _fake_server(monkeypatch, files)
    if module is mnist:
        resources = [r._replace(md5=hashlib.md5(files[r.filename]).hexdigest()) for r in mnist.RESOURCES]
        monkeypatch.setattr(mnist, "RESOURCES", resources)
    else:
        resource = cifar10.RESOURCE._replace(md5=hashlib.md5(files[cifar10.RESOURCE.filename]).hexdigest())
        monkeypatch.setattr(cifar10, "RESOURCE", resource)
    return asked


def test_mnist_download_fetches_the_official_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _served(monkeypatch, mnist, _mnist_files())
    root = tmp_path / "data" / "mnist"
    with pytest.raises(DataError, match=r"pass data\.download=true"):
        MNISTDataModule(root)
    dm = MNISTDataModule(root, download=True, samples_per_class=2)
    assert asked == [f"https://ossci-datasets.s3.amazonaws.com/mnist/{r.filename}" for r in mnist.RESOURCES]
    assert sorted(p.name for p in root.iterdir()) == sorted(_mnist_files())
    assert list((tmp_path / "data").iterdir()) == [root]  # no staging folder left
    dm.setup()
    assert dm.classes == [str(d) for d in range(10)] and len(dm.test_dataset) == 4
    MNISTDataModule(root, download=True)  # present now: nothing fetched again
    assert len(asked) == 4


def test_a_download_with_the_wrong_checksum_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _served(monkeypatch, mnist, _mnist_files())
    files = {**_mnist_files(), "t10k-labels-idx1-ubyte.gz": b"<html>captive portal</html>"}
    _fake_server(monkeypatch, files)  # the MD5s stay those of the right files
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz was downloaded but its MD5 is not"):
        MNISTDataModule(tmp_path / "mnist", download=True)
    assert not (tmp_path / "mnist").exists() and not list(tmp_path.iterdir())  # nothing half-written


def _cifar_tarball() -> bytes:
    rng = np.random.default_rng(0)

    def batch(n: int) -> bytes:
        labels = [i % 10 for i in range(n)]
        return pickle.dumps({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": labels})

    members = {f"data_batch_{i}": batch(10) for i in range(1, 6)}
    members["test_batch"] = batch(10)
    members["batches.meta"] = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_cifar10_download_reads_the_official_python_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _served(monkeypatch, cifar10, {cifar10.RESOURCE.filename: _cifar_tarball()})
    root = tmp_path / "cifar10_jpg" / "cifar10_jpg.zip"  # the preset's root: its folder gets the data
    dm = CIFAR10DataModule(root, download=True, image_size=8, preprocess={"mean": [0] * 3, "std": [1] * 3})
    assert asked == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert sorted(p.name for p in root.parent.iterdir()) == ["cifar-10-batches-py"]
    dm.setup()
    assert dm.classes == [f"c{i}" for i in range(10)]
    assert (len(dm.train_dataset) + len(dm.val_dataset), len(dm.test_dataset)) == (50, 10)
    assert dm.test_dataset[0][0].shape == (3, 8, 8)
    assert CIFAR10DataModule(root).classes == dm.classes  # found again without download


# --- cache.stamp=content: a file swapped with its mtime restored is seen -----------------------------


@pytest.mark.parametrize(("stamp", "rebuilt"), [("content", True), ("mtime", False)])
def test_content_stamp_sees_a_swapped_file(tmp_path: Path, stamp: str, rebuilt: bool) -> None:
    """`cp -p` / `rsync -a` keep size and mtime: only the content stamp tells the files apart; the
    mtime stamp (the default, one stat per file) is documented to reuse the features."""
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths.append(tmp_path / f"{i}.bmp")  # BMP: same size for any pixels
        Image.new("RGB", (8, 8), colour).save(paths[-1])
    dataset = SubsetDataset(
        FileSource(paths, [0, 1]), np.arange(2), lambda im: torch.tensor(np.asarray(im)).float().mean((0, 1))
    )
    body, store, fp32 = (
        torch.nn.Identity(),
        FeatureStore(tmp_path / "cache"),
        resolve_extraction("fp32", torch.device("cpu")),
    )

    def features() -> tuple[torch.Tensor, bool]:
        fs, hit, _ = cached_features(
            store, body, dataset, device=torch.device("cpu"), numerics=fp32, stamp=stamp
        )
        return fs.features, hit

    before, _ = features()
    stat = paths[0].stat()
    shutil.copyfile(paths[1], tmp_path / "swap")
    os.replace(tmp_path / "swap", paths[0])  # the blue image under the red one's name ...
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... with its mtime, as `cp -p` keeps it
    after, hit = features()
    assert hit is not rebuilt
    assert torch.equal(after[0], after[1]) is rebuilt  # rebuilt: both rows are the blue image
    assert torch.equal(after, before) is not rebuilt


# --- a full disk mid-CSV; a summary.json of another shape --------------------------------------------


class _DiskFillsAfter:
    """`os` for transfer_cases.utils.atomic whose `write` fails with ENOSPC after `pieces` writes."""

    def __init__(self, pieces: int) -> None:
        self.left = pieces

    def write(self, fd: int, data: bytes) -> int:
        if self.left == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= 1
        return os.write(fd, data)

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)


def test_a_full_disk_mid_csv_keeps_whole_batches_and_names_out(
    tmp_path: Path,
    ckpt: Path,
    image_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """The last row was cut mid-line and the run ended in a traceback."""
    monkeypatch.setattr(
        atomic, "os", _DiskFillsAfter(pieces=1)
    )  # the header with batch 1, then batch 2 fails
    out = tmp_path / "p.csv"
    with pytest.raises(SystemExit) as exit_:
        predict_main([str(ckpt), str(image_folder / "val"), "--out", str(out), "--batch-size", "2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"error: cannot write the predictions CSV {out}: no space left on device; free some space, or " in err
    )
    assert "pass --out with a location you can write" in err and "Traceback" not in err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["class"] in ("a", "b") for r in rows)  # batch 1, whole
    assert out.read_bytes().endswith(b"\r\n") and not list(tmp_path.glob(".*.tmp"))


def test_report_of_a_summary_whose_metrics_are_not_a_mapping(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_job(sweep, "0_a", "small_similar", ok_summary("small_similar", 0.8, 0.7, 0.8, 5.0, 10))
    write_job(
        sweep,
        "1_b",
        "small_different",
        {**ok_summary("small_different", 0.7, 0.6, 0.7, 5.0, 10), "metrics": [1]},
    )
    exe = Path(sys.executable).with_name("transfer-report")
    run = run_console_script([str(exe), str(sweep)], cwd=tmp_path, env=cli_env(), timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "failed: 1_b: unreadable summary.json: metrics is not a mapping" in run.stdout
    with open(sweep / "report.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "failed"]


def test_optuna_direction_against_the_optimized_metric_is_one_line(
    tmp_path: Path, image_folder: Path
) -> None:
    """`optimized_metric=val/loss` under the presets' `direction: maximize` searched for the worst trials."""
    from tests.test_optuna_failures import search

    code, stderr, sweep = search(tmp_path, image_folder, "optimized_metric=val/loss")
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count("error:") == 1
    assert "error: hydra.sweeper.direction=maximize with optimized_metric=val/loss" in stderr
    assert "hydra.sweeper.direction=minimize" in stderr and not list(sweep.glob("*/summary.json"))


def test_run_config_file_records_the_checked_values(tmp_path: Path) -> None:
    """Hydra saves .hydra/config.yaml as composed; the checks normalise `cache.enabled=no` to false and
    the checkpoint mode to follow `val/loss`: the file must say what the run used (it said max, yes)."""
    overrides = (
        "data=imagefolder",
        f"data.root={tmp_path / 'missing'}",
        "cache.enabled=no",
        "optimized_metric=val/loss",
    )
    run = train_cli(*overrides, cwd=tmp_path)

    assert "data folder not found" in one_line_error(run)  # stops after the checks: the config is final
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.cache.enabled is False and saved.callbacks.model_checkpoint.mode == "min"
