"""The declared torchvision stage tables as markdown: `python -m transfer_cases.backbones.tables`.

docs/backbones.md's "Supported backbones" tables are this output; a test keeps them equal.
"""

from __future__ import annotations

import re

from transfer_cases.backbones.torchvision_zoo import TABLES, StageTable


def markdown() -> str:
    return "\n\n".join(_table(t) for t in TABLES) + "\n"


def _table(t: StageTable) -> str:
    groups: dict[tuple[int, ...], list[str]] = {}
    for arch, widths in t.widths.items():
        groups.setdefault(widths, []).append(arch)
    head = ["stage", "modules", "stride", *(" ".join(f"`{a}`" for a in archs) for archs in groups.values())]
    rows = [
        [str(i), _modules(names), str(stride), *(str(w[i]) for w in groups)]
        for i, (names, stride) in enumerate(zip(t.stages, t.strides, strict=True))
    ]
    if t.neck:
        rows.append(["neck", _modules(t.neck), "", *(str(t.neck_width or w[-1]) for w in groups)])
    title = f"**{t.family}**" + (f" ({t.note})" if t.note else "")
    return "\n".join([title, "", _row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)])


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _modules(names: tuple[str, ...]) -> str:
    """`features.4`, `features.5`, `features.6` → `features.4-6`; other names as they are."""
    parts: list[str] = []
    for name in names:
        m = re.fullmatch(r"(.+)\.(\d+)", name)
        prev = re.fullmatch(r"(.+)\.(\d+)(?:-(\d+))?", parts[-1]) if parts else None
        if m and prev and prev[1] == m[1] and int(prev[3] or prev[2]) + 1 == int(m[2]):
            parts[-1] = f"{prev[1]}.{prev[2]}-{m[2]}"
        else:
            parts.append(name)
    return " ".join(f"`{p}`" for p in parts)


if __name__ == "__main__":
    print(markdown(), end="")
