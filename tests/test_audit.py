"""The data audit: planted duplicates and flipped labels are found, look-alikes are not duplicates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tests.test_configs import TINY_OVERRIDES, run_cli
from transfer_cases.data.sources import FileSource, SubsetDataset
from transfer_cases.reporting.audit import (
    imbalance,
    label_issues,
    near_duplicate_candidates,
    out_of_fold_probabilities,
)
from transfer_cases.reporting.audit_html import audit_page
from transfer_cases.reporting.audit_run import Audit, summary_line
from transfer_cases.utils.errors import ConfigError


def clusters(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, d)) * 1.5
    y = rng.integers(0, classes, n)
    return centers[y] + rng.normal(0, 1, (n, d)), y


def test_candidates_cross_splits_and_within_train_once_never_a_sample_with_itself() -> None:
    x, _ = clusters(60, 16, 3, seed=0)
    val = np.vstack([x[5] * 2.0, x[7] + 1e-4, np.random.default_rng(1).normal(0, 1, (4, 16))])
    train = np.vstack([x, x[10:11]])  # row 60 repeats row 10
    found = near_duplicate_candidates({"train": train, "val": val}, threshold=0.999)
    pairs = {(c.split_a, c.index_a, c.split_b, c.index_b) for c in found}
    assert pairs == {("train", 5, "val", 0), ("train", 7, "val", 1), ("train", 10, "train", 60)}


def test_confident_learning_ranks_flipped_labels_first() -> None:
    """m flipped labels among 400 samples: at least 60 % of them in the top 2m suspects."""
    x, y = clusters(400, 24, 4, seed=2)
    m = 20
    flipped = np.random.default_rng(3).choice(len(y), m, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 4
    probs = out_of_fold_probabilities(x, noisy, folds=5, seed=0)
    assert probs.shape == (400, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    issues = label_issues(probs, noisy)
    top = {i.index for i in issues[: 2 * m]}
    assert len(top & set(flipped)) >= 0.6 * m
    assert [i.margin for i in issues] == sorted(i.margin for i in issues)
    assert all(i.suggested != i.given for i in issues)
    assert sum(i.flagged for i in issues) >= 0.6 * m


def test_imbalance_is_largest_over_smallest() -> None:
    assert imbalance({"a": 30, "b": 10}) == 3.0
    assert imbalance({"a": 3, "b": 0}) == float("inf")


def write_folder(root: Path, seed: int = 0) -> dict[str, SubsetDataset]:
    """Two classes of smooth random pictures; val holds an exact and a half-size copy of train images
    and a different picture of the same mean colour (a look-alike for colour features)."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[list]] = {"train": [[], []], "val": [[], []]}
    pictures = []
    for i in range(12):
        base = np.array([200, 40, 40]) if i % 2 else np.array([40, 40, 200])
        blobs = np.clip(base + rng.normal(0, 60, (6, 6, 3)), 0, 255).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(blobs).resize((48, 48), Image.Resampling.BILINEAR))
        pictures.append(pixels)
        path = root / "train" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        splits["train"][0].append(path)
        splits["train"][1].append(i % 2)
    (root / "val").mkdir()
    copies = {
        "exact.png": Image.fromarray(pictures[3]),
        "half.png": Image.fromarray(pictures[4]).resize((24, 24), Image.Resampling.BICUBIC),
        "lookalike.png": Image.fromarray(np.clip(pictures[6][::-1, :] + 0, 0, 255).astype(np.uint8)),
    }
    for name, image in copies.items():
        image.save(root / "val" / name)
        splits["val"][0].append(root / "val" / name)
    splits["val"][1] += [1, 0, 0]
    return {
        k: SubsetDataset(FileSource(paths, labels), np.arange(len(paths)), transform=None)
        for k, (paths, labels) in splits.items()
    }


def mean_colour_features(dataset: SubsetDataset) -> np.ndarray:
    """Features that only see colour: a flipped picture is the 'same' to them, not to the pixel check."""
    return np.stack(
        [
            np.asarray(dataset.source.load(int(i)).resize((4, 4)), dtype=np.float32).mean(axis=(0, 1))
            for i in dataset.indices
        ]
    )


def test_audit_confirms_exact_and_resized_copies_and_rejects_a_look_alike(tmp_path: Path) -> None:
    splits = write_folder(tmp_path)
    features = {k: mean_colour_features(d) for k, d in splits.items()}
    result = Audit(duplicate_threshold=0.999, folds=2).run(splits, features, ["blue", "red"])
    pairs = {
        (p["file_a"].rsplit("/", 1)[-1], p["file_b"].rsplit("/", 1)[-1])
        for p in result["duplicates"]["pairs"]
    }
    assert ("3.png", "exact.png") in pairs
    assert ("4.png", "half.png") in pairs
    assert not any("lookalike.png" in b for _, b in pairs)  # colour twins, other pixels
    assert any("lookalike.png" in p["file_b"] for p in result["duplicates"]["unconfirmed"])
    assert result["duplicates"]["across_splits"] == 2
    assert result["counts"]["train"] == {"blue": 6, "red": 6}
    assert all(p["thumb_a"].startswith("data:image/jpeg;base64,") for p in result["duplicates"]["pairs"])
    assert "duplicates: 2 pairs across splits, 0 within train" in summary_line(result)
    assert any("leakage" in w for w in result["warnings"])
    html = audit_page(json.loads(json.dumps(result)))
    assert html.count("<img ") >= 4 and "exact.png" in html


@pytest.mark.parametrize(
    ("setting", "message"),
    [("duplicate_threshold", "audit.duplicate_threshold=2"), ("pixel_tolerance", "audit.pixel_tolerance=2")],
)
def test_settings_out_of_range_name_the_setting(setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Audit(**{setting: 2})


def test_transfer_audit_writes_json_and_html_and_one_summary_line(tmp_path: Path, image_folder: Path) -> None:
    run = run_cli(
        "transfer-audit",
        *TINY_OVERRIDES,
        f"data.root={image_folder}",
        "audit.folds=2",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    audit = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert audit["images"] == {"train": 12, "val": 6}
    assert audit["counts"]["train"] == {"a": 6, "b": 6}
    assert [line for line in run.stdout.splitlines() if line.startswith("audit: 18 images;")]
    assert (tmp_path / "run" / "audit.html").read_text().startswith("<!DOCTYPE html>")


def test_case_auto_audits_the_data_when_the_config_has_the_audit_group(
    compose_train: Callable[..., DictConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After advising, `case=auto` audits into the run folder (next to advice.json, where the run
    report finds it); a config without the group does not audit; an audit that breaks is a warning."""
    from tests.test_advise_auto import RANK_VARS, FakeAdvisor, advice_for
    from transfer_cases.advise import auto
    from transfer_cases.reporting import audit_run

    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(auto, "advise_from_config", FakeAdvisor(advice_for(20)))
    calls: list[str] = []

    def fake_audit(cfg: DictConfig, out: Path) -> None:
        calls.append(str(out))
        if len(calls) == 2:
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(audit_run, "audit_from_config", fake_audit)
    assert audit_run.audit_if_configured(OmegaConf.create({"case": {}}), tmp_path) is None  # no group
    assert calls == []
    assert auto.resolve_auto_case(compose_train("case=auto")).case == "small_similar"
    assert calls == [str(tmp_path / "run")]
    failing = compose_train("case=auto")  # the advice replaces case=auto in place
    assert auto.resolve_auto_case(failing).case == "small_similar"  # the audit failed: still advised
    assert "the data audit did not run: RuntimeError: disk on fire" in caplog.text


def test_transfer_audit_refuses_a_bad_setting_before_any_extraction(
    tmp_path: Path, image_folder: Path
) -> None:
    run = run_cli(
        "transfer-audit",
        *TINY_OVERRIDES,
        f"data.root={image_folder}",
        "audit.duplicate_threshold=2",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: audit.duplicate_threshold=2 must be a number >= 0 and <= 1 (cosine similarity of a candidate "
        "pair); e.g. audit.duplicate_threshold=0.8"
    ]
    assert not (tmp_path / "cache").exists()


def test_pixel_match_tells_two_objects_on_one_plain_background_apart() -> None:
    """Aircraft on a blue sky: close on average (the sky), but their pixels do not correlate."""
    from transfer_cases.reporting.audit_run import pixel_match

    sky = np.full((32, 32), 0.6, dtype=np.float32)
    plane, bird = sky.copy(), sky.copy()
    plane[15:17, 8:24] = 0.1  # a wide dark bar
    bird[8:24, 15:17] = 0.1  # a tall one
    diff, corr = pixel_match(plane, bird)
    assert diff < 0.04 and corr < 0.5
    assert pixel_match(plane, plane + 0.01) == (pytest.approx(0.01), pytest.approx(1.0))
    assert pixel_match(sky, sky) == (0.0, 1.0)  # two blank images are the same picture
