"""Self-contained HTML pages: one file, styles, script and images inlined, nothing fetched.

A report is opened from a laptop, a cluster's scratch folder or an e-mail attachment: it must need
no server, no network and no sibling files. Charts are inline SVG or PNG data URIs; tables sort by
a click on their header (a few lines of script, no library).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

from PIL import Image

STYLE = """
img{max-width:100%;height:auto}
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#aaa}
tr.failed td{color:#b00}pre{background:#f6f6f6;padding:8px;overflow-x:auto;white-space:pre-wrap}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;margin:6px 0}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}.thumb{width:140px;font-size:12px;overflow-wrap:anywhere}
.thumb img{width:128px;height:128px;object-fit:contain;background:#eee;display:block}
.pair{display:flex;gap:4px;align-items:flex-start;border:1px solid #ddd;padding:4px;font-size:12px}
.pair img{width:96px;height:96px;object-fit:contain;background:#eee}
.muted{color:#777}dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{font-weight:600}
"""

# Sort a table by the clicked column: numbers as numbers (a leading number of the cell), else text.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.dataset.order !== "asc"; th.dataset.order = asc ? "asc" : "desc";
      function key(row) {
        var text = row.cells[col].textContent.trim(), n = parseFloat(text.replace(/,/g, ""));
        return isNaN(n) ? text : n;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def page(title: str, sections: Sequence[str]) -> str:
    """A whole HTML document: `sections` are HTML fragments, in order."""
    body = "\n".join(s for s in sections if s)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n"
        f"{body}\n<script>{SCRIPT}</script>\n</body></html>\n"
    )


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>\n" + "\n".join(p for p in parts if p) + "\n</section>"


def table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    numeric: Sequence[str] = (),
    row_classes: Sequence[str] | None = None,
    sortable: bool = True,
    raw: bool = False,
) -> str:
    """An HTML table; cells are escaped unless `raw` (cells that already are HTML)."""
    num = set(numeric)
    head = "".join(f'<th class="num">{esc(c)}</th>' if c in num else f"<th>{esc(c)}</th>" for c in columns)
    lines = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(
            f"<td{' class=num' if c in num else ''}>{v if raw else esc(v)}</td>"
            for c, v in zip(columns, row, strict=True)
        )
        lines.append(f"<tr{cls}>{cells}</tr>")
    kind = ' class="sortable"' if sortable else ""
    return f"<table{kind}><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(lines) + "\n</tbody></table>"


def definitions(items: Sequence[tuple[str, Any]]) -> str:
    """A two-column list of facts (name: value), skipping empty values."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items if v not in (None, ""))
    return f"<dl>{rows}</dl>"


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(uri: str, alt: str, *, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{uri}" alt="{esc(alt)}"{size}>'


def thumbnail_uri(image: Image.Image, size: int = 128, quality: int = 80) -> str:
    """A small JPEG of `image` as a data URI (a few kB: dozens fit in a report)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def warnings_block(lines: Sequence[str]) -> str:
    return "\n".join(f'<div class="warn">{esc(line)}</div>' for line in lines)
