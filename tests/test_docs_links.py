"""README and docs/ cannot rot quietly: relative links resolve, named tests exist, the README is short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
# `test_x.py::test_name` or `tests/test_x.py::test_name[param]` in a code span.
NAMED_TEST = re.compile(r"`(?:tests/)?(test_\w+\.py)::(\w+)(?:\[[^`]*\])?`")


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "notebooks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for heading in re.findall(
        r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M
    ):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        found.add(slug)
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `page` (outside code blocks) whose file or heading does not exist, or
    that leave `root` (a clean clone has nothing outside it)."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto:: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        missing = not file.exists() or root.resolve() not in (file, *file.parents)
        if missing or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == [], f"{page.relative_to(ROOT)}: broken relative links"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_tests_exist(page: Path) -> None:
    missing = []
    for file, name in NAMED_TEST.findall(page.read_text(encoding="utf-8")):
        source = ROOT / "tests" / file
        if not source.is_file() or not re.search(rf"^\s*(?:async\s+)?def {name}\(", source.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert missing == [], f"{page.relative_to(ROOT)} names tests that do not exist"


def test_readme_fits_a_few_screens() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to a page under docs/"


def test_the_checker_sees_a_broken_link_and_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A `code` heading, here\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-code-heading-here) [web](https://example.org/x)\n"
        "[gone](missing.md) ![img](img/none.png) [anchor](there.md#nowhere)\n"
        "```\n[in a code block](not/checked.md)\n```\n"
    )
    (tmp_path / "docs").mkdir()
    outside = tmp_path / "docs" / "out.md"
    outside.write_text("[up and out](../../elsewhere.md) [fine](../there.md)\n")
    assert broken_links(page, tmp_path) == ["missing.md", "img/none.png", "there.md#nowhere"]
    assert broken_links(outside, tmp_path) == ["../../elsewhere.md"]
