"""docs/bad_inputs.md cannot rot: every row names tests, and every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "bad_inputs.md"
TEST_ID = re.compile(r"`(tests/[\w/]+\.py::[^`]+)`")


def table_rows() -> list[str]:
    """The body rows of every table (not the header or the `|---|` line under it)."""
    lines = [line for line in TABLE.read_text().splitlines() if line.startswith("|")]
    return [
        line
        for i, line in enumerate(lines)
        if not re.fullmatch(r"\|(-+\|)+", line)
        and not (i + 1 < len(lines) and lines[i + 1].startswith("|---"))
    ]


class Collector:
    """A pytest plugin that records the ids of the collected tests."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.skipped_files: set[str] = set()

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.ids.update(item.nodeid for item in items)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        # A module skipped as a whole (tests/test_timm.py without the timm extra) collects no items.
        if report.skipped and report.nodeid.endswith(".py"):
            self.skipped_files.add(report.nodeid)


def test_every_row_names_tests_that_exist() -> None:
    rows = table_rows()
    assert len(rows) >= 100
    named = [TEST_ID.findall(row) for row in rows]
    assert all(named), [row for row, ids in zip(rows, named, strict=True) if not ids]
    wanted = {test_id for ids in named for test_id in ids}
    files = sorted({test_id.split("::")[0] for test_id in wanted})
    assert all((ROOT / f).is_file() for f in files), [f for f in files if not (ROOT / f).is_file()]
    collector = Collector()
    # Collected as pytest itself would, so parametrized ids ("[trainer=gpu]") are checked too;
    # "slow or not slow" overrides the default deselection of slow tests.
    code = pytest.main(
        ["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow", "--rootdir", str(ROOT)]
        + [str(ROOT / f) for f in files],
        plugins=[collector],
    )
    assert code == pytest.ExitCode.OK
    # Rows of an optional extra cannot be checked where it is not installed (the module is skipped).
    unchecked = {t for t in wanted if t.split("::")[0] in collector.skipped_files}
    assert sorted(wanted - collector.ids - unchecked) == []
