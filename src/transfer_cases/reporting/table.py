"""Tables that read at 80 columns, in a terminal and in a log file alike.

A table that folds its cells (`small_s / imilar`, `mobile / net_v2`) cannot be read or grepped.
Here no cell is ever cut or folded; instead, in this order, until the table fits:

1. a column with the same value in every row leaves the table for a header line (`case: small_similar`);
2. headers are abbreviated, each abbreviation explained in a legend line under the table;
3. the widest text columns leave the table for lines under it, one per row (`0: lr=0.01 ...`).
No line is longer than the width unless one identifier alone is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

GAP = "  "


@dataclass
class TextTable:
    """A table laid out for `width` columns: `head` (title, constant columns), `header` and `rule`,
    one `lines` entry per row (in row order), then `foot` (legend, spilled columns)."""

    head: list[str] = field(default_factory=list)
    header: str = ""
    rule: str = ""
    lines: list[str] = field(default_factory=list)
    foot: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([*self.head, self.header, self.rule, *self.lines, *self.foot]) + "\n"


def layout(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int = 80,
    numeric: Sequence[str] = (),
    abbreviations: Mapping[str, str] | None = None,
    key: str | None = None,
    keep: Sequence[str] = (),
    title: str | None = None,
) -> TextTable:
    """Lay out `rows` (cells as text) under `columns` within `width` characters.

    `key` names the column that identifies a row (never moved; spilled cells are listed under its
    value); `keep` are columns never moved to the header even when constant (e.g. a status).
    """
    abbreviations = dict(abbreviations or {})
    cols = list(columns)
    data = [list(r) for r in rows]
    head = [title] if title else []
    # 1. Constant columns into a header line.
    if len(data) > 1:
        constant = [
            c for i, c in enumerate(cols) if c != key and c not in keep and len({r[i] for r in data}) == 1
        ]
        if constant:
            items = [f"{c}: {data[0][cols.index(c)]}" for c in constant]
            head += wrap_items([f"every row: {items[0]}", *items[1:]], width)
            keep_idx = [i for i, c in enumerate(cols) if c not in constant]
            cols = [cols[i] for i in keep_idx]
            data = [[r[i] for i in keep_idx] for r in data]
    names = list(cols)
    legend: list[str] = []
    # 2. Abbreviated headers, with a legend.
    if _width(names, data) > width:
        for i, c in enumerate(cols):
            if c in abbreviations:
                names[i] = abbreviations[c]
                legend.append(f"{abbreviations[c]} = {c}")
    # 3. Spill the widest text columns under the table, whole, one line per row.
    spilled: list[tuple[str, list[str]]] = []
    numeric_set = set(numeric)
    while _width(names, data) > width:
        movable = [i for i, c in enumerate(cols) if c != key and c not in numeric_set and c not in keep]
        if not movable:
            break
        i = max(movable, key=lambda j: max([len(names[j]), *(len(r[j]) for r in data)]))
        spilled.append((cols.pop(i), [r.pop(i) for r in data]))
        names.pop(i)
    widths = [max([len(n), *(len(r[i]) for r in data)]) for i, n in enumerate(names)]
    right = [c in numeric_set for c in cols]
    header = GAP.join(_pad(n, w, r) for n, w, r in zip(names, widths, right, strict=True)).rstrip()
    lines = [GAP.join(_pad(v, w, a) for v, w, a in zip(r, widths, right, strict=True)).rstrip() for r in data]
    foot = [f"({', '.join(legend)})"] if legend else []
    if spilled:
        keys = [r[cols.index(key)] for r in data] if key in cols else [str(j) for j in range(len(data))]
        for j, row_key in enumerate(keys):
            extra = "; ".join(f"{c}: {values[j]}" for c, values in spilled if values[j] not in ("", "-"))
            if extra:
                foot.append(f"{row_key}: {extra}")
    return TextTable(head, header, "-" * len(header), lines, foot)


def wrap_items(items: Sequence[str], width: int, sep: str = "; ") -> list[str]:
    """`items` joined by `sep` into lines of at most `width` characters, never splitting an item."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


def _width(names: Sequence[str], data: Sequence[Sequence[str]]) -> int:
    widths = [max([len(n), *(len(r[i]) for r in data)]) for i, n in enumerate(names)]
    return sum(widths) + len(GAP) * max(len(widths) - 1, 0)


def _pad(text: str, width: int, right: bool) -> str:
    return text.rjust(width) if right else text.ljust(width)
