"""Small inline SVG charts for the run report: drawn as text, so a report costs milliseconds, not a
matplotlib import and a rendering pass per figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from transfer_cases.reporting.html import esc

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 460, 260, 48, 12, 24, 34


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str = "epoch") -> str:
    """One SVG with a line per series (points are (x, y)); an empty chart says there is no data."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img">'
    head += f'<title>{esc(title)}</title><text x="{LEFT}" y="15" font-size="13">{esc(title)}</text>'
    if not points:
        return head + f'<text x="{LEFT}" y="{HEIGHT // 2}" fill="#777">no data</text></svg>'
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    pad = (y1 - y0) * 0.05 or 0.05
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [
        head,
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>',
    ]
    for frac in (0, 0.5, 1):
        y = y0 + frac * (y1 - y0)
        parts.append(
            f'<text x="{LEFT - 4}" y="{sy(y) + 4:.1f}" font-size="10" text-anchor="end">{y:.3g}</text>'
        )
    for x in sorted({x0, x1, round((x0 + x1) / 2)}):
        parts.append(
            f'<text x="{sx(x):.1f}" y="{HEIGHT - 18}" font-size="10" text-anchor="middle">{x:g}</text>'
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" font-size="11" text-anchor="middle">{xlabel}</text>'
    )
    for i, (name, values) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        finite = [(x, y) for x, y in values if math.isfinite(y)]
        if not finite:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in finite]
        parts.append(
            f'<text x="{WIDTH - RIGHT - 60 * (len(series) - i)}" y="15" font-size="11" fill="{color}">'
            f"&#9632; {esc(name)}</text>"
        )
    return "".join(parts) + "</svg>"


def heat_color(value: float) -> str:
    """White (0) to dark blue (1), for a confusion-matrix cell."""
    v = min(max(value, 0.0), 1.0)
    r, g, b = (int(255 - v * (255 - c)) for c in (8, 69, 148))
    return f"rgb({r},{g},{b})"
