"""Screenshots of report pages for the docs, in headless Chromium (the `browser` extra).

    python -m studies.report_screenshots OUT_DIR REPORT.html [REPORT.html ...]

Each page is shot whole, 1200 px wide, as `<parent folder>_<file stem>.jpg`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from playwright.sync_api import sync_playwright

    out, *pages = argv if argv is not None else sys.argv[1:]
    Path(out).mkdir(parents=True, exist_ok=True)
    executable = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable)
        for page_path in map(Path, pages):
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            target = Path(out) / f"{page_path.parent.name}_{page_path.stem}.jpg"
            page.screenshot(path=str(target), type="jpeg", quality=70, full_page=True)
            print(target)
        browser.close()


if __name__ == "__main__":
    main()
