"""Each kind of report opened in headless Chromium (Playwright): no console error, every image
loaded, tables and thumbnails present, a header click sorts, the page renders in under 1 s.

`make test-browser` runs it. It needs the `browser` extra (`pip install -e ".[browser]"`) and a
Chromium: the system's (`apt-get install chromium`) or Playwright's own (`playwright install
chromium`); without either it skips, saying which is missing. Set REPORT_SCREENSHOTS=<folder> to keep
a full-page screenshot of each report.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.test_audit import mean_colour_features, write_folder
from tests.test_report import fake_sweep
from tests.test_report_html import TinyData, TinyModel
from transfer_cases.commands.report import main as report_main
from transfer_cases.reporting.audit_html import audit_page
from transfer_cases.reporting.audit_run import Audit
from transfer_cases.reporting.predictions import ValPredictions
from transfer_cases.reporting.run_report import write_run_report

pytestmark = pytest.mark.slow
SYSTEM_CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason='Playwright is not installed: pip install -e ".[browser]"'
    )
    executable = next((shutil.which(name) for name in SYSTEM_CHROMIUM if shutil.which(name)), None)
    with sync_api.sync_playwright() as p:
        try:
            launched = p.chromium.launch(executable_path=executable, headless=True)
        except Exception as e:  # no system browser and none of Playwright's own
            pytest.skip(
                "no Chromium: apt-get install chromium, or playwright install chromium "
                f"({str(e).splitlines()[0]})"
            )
        yield launched
        launched.close()


def open_report(browser: Any, path: Path, name: str) -> tuple[Any, list[str]]:
    """The page at `path`, loaded, and the console errors it raised."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(path.resolve().as_uri(), wait_until="load")
    shots = os.environ.get("REPORT_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)
    return page, errors


def check_page(page: Any, errors: list[str]) -> None:
    assert errors == []
    broken = page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => !i.complete || i.naturalWidth === 0).length"
    )
    assert broken == 0
    load_ms = page.evaluate(
        "() => { const t = performance.getEntriesByType('navigation')[0]; "
        "return t.loadEventEnd - t.startTime; }"
    )
    assert 0 < load_ms < 1000, f"rendered in {load_ms:.0f} ms"


def test_run_report_in_a_browser(browser: Any, tmp_path: Path) -> None:
    import lightning as L

    torch.manual_seed(0)
    data = TinyData(tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[ValPredictions(tmp_path, top_wrong=4)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(TinyModel(), datamodule=data, verbose=False)
    summary = {"status": "ok", "case": "small_similar", "backbone": "tiny", "metrics": {"val/acc": 0.3}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("epoch,val/acc,val/loss\n0,0.2,1.1\n1,0.3,1.0\n")
    page, errors = open_report(browser, write_run_report(tmp_path, strict=True), "run_report")
    check_page(page, errors)
    assert page.locator(".thumbs .thumb img").count() >= 1
    assert page.locator("table.confusion tbody tr").count() == 3
    assert page.locator("svg polyline").count() >= 1


def test_sweep_report_in_a_browser_sorts_by_a_header_click(browser: Any, tmp_path: Path) -> None:
    sweep = fake_sweep(tmp_path)
    report_main([str(sweep)])
    page, errors = open_report(browser, sweep / "report.html", "sweep_report")
    check_page(page, errors)
    assert page.locator("img").count() == 2
    jobs = lambda: page.locator("table.sortable tbody tr td:first-child").all_text_contents()  # noqa: E731
    assert jobs() == ["0", "1", "2", "10"]
    header = page.locator("table.sortable th", has_text="val acc")
    header.click()
    assert jobs()[:2] == ["1", "0"]  # 0.600 before 0.900; failed jobs ("-") after the numbers
    header.click()
    assert jobs()[:2] == ["0", "1"]


def test_audit_report_in_a_browser(browser: Any, tmp_path: Path) -> None:
    splits = write_folder(tmp_path)
    features = {k: mean_colour_features(d) for k, d in splits.items()}
    result = Audit(duplicate_threshold=0.999, folds=2).run(splits, features, ["blue", "red"])
    path = tmp_path / "audit.html"
    path.write_text(audit_page(result))
    page, errors = open_report(browser, path, "audit_report")
    check_page(page, errors)
    assert page.locator(".pair").count() >= 2
    assert page.locator(".pair img").count() == 2 * page.locator(".pair").count()
    assert np.isfinite(result["imbalance"])
