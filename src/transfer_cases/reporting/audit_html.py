"""The audit in HTML: duplicate pairs side by side, label suspects with their probabilities, counts."""

from __future__ import annotations

from typing import Any

from transfer_cases.reporting import html as h


def audit_section(audit: dict[str, Any]) -> str:
    """The audit's section of a run report (and the body of audit.html)."""
    dup, labels = audit.get("duplicates") or {}, audit.get("label_issues") or {}
    settings = audit.get("settings") or {}
    facts = h.definitions(
        [
            ("images", ", ".join(f"{k} {v}" for k, v in (audit.get("images") or {}).items())),
            ("duplicate pairs across splits", dup.get("across_splits")),
            ("duplicate pairs within train", dup.get("within_train")),
            ("feature candidates checked", dup.get("candidates")),
            ("likely label errors", labels.get("flagged")),
            ("out-of-fold probe accuracy", f"{labels.get('probe_accuracy', 0):.3f}"),
            ("train imbalance (largest/smallest)", f"{audit.get('imbalance', 1):.2f}x"),
            (
                "rules",
                f"duplicate: nearest neighbours from cosine {settings.get('duplicate_threshold')}, "
                f"grey levels at 32x32 differing by <= {settings.get('pixel_tolerance')} on average and "
                f"correlating >= {settings.get('min_correlation')}; label error: confident learning",
            ),
        ]
    )
    pairs = "".join(_pair(p) for p in dup.get("pairs") or []) or "<p>None found.</p>"
    unconfirmed = "".join(_pair(p) for p in dup.get("unconfirmed") or [])
    suspects = "".join(_suspect(s) for s in labels.get("suspects") or []) or "<p>None found.</p>"
    counts = audit.get("counts") or {}
    classes = audit.get("classes") or []
    count_rows = [[c, *(counts[s].get(c, 0) for s in counts)] for c in classes]
    count_table = h.table(["class", *counts], count_rows, numeric=list(counts))
    return "\n".join(
        [
            h.section("Data audit", facts),
            h.section("Duplicate pairs (confirmed at pixel level)", f'<div class="thumbs">{pairs}</div>'),
            h.section("Similar, not the same picture", f'<div class="thumbs">{unconfirmed}</div>')
            if unconfirmed
            else "",
            h.section(
                "Likely label errors (most negative margin first)", f'<div class="thumbs">{suspects}</div>'
            ),
            h.section("Class counts", count_table),
        ]
    )


def _pair(p: dict[str, Any]) -> str:
    images = "".join(
        h.img(p[f"thumb_{s}"], f"{p[f'split_{s}']} {p[f'file_{s}']}")
        for s in ("a", "b")
        if p.get(f"thumb_{s}")
    )
    caption = (
        f"{h.esc(p['split_a'])} #{p['index_a']} ({h.esc(p.get('label_a'))}) = "
        f"{h.esc(p['split_b'])} #{p['index_b']} ({h.esc(p.get('label_b'))})<br>"
        f"cos {p['similarity']:.3f}, pixels {p['pixel_difference']:.3f}, corr {p.get('correlation', 1):.2f}"
    )
    return f'<div class="pair">{images}<div>{caption}</div></div>'


def _suspect(s: dict[str, Any]) -> str:
    image = h.img(s["thumb"], f"{s['split']} {s['file']}") if s.get("thumb") else ""
    mark = "" if s.get("flagged") else " <span class=muted>(not flagged)</span>"
    return (
        f'<div class="thumb">{image}given <b>{h.esc(s["given"])}</b> {s["p_given"]:.2f}<br>'
        f"probe: {h.esc(s['suggested'])} {s['p_suggested']:.2f}{mark}<br>"
        f"<span class=muted>{h.esc(s['split'])} {h.esc(s['file'].rsplit('/', 1)[-1])}</span></div>"
    )


def audit_page(audit: dict[str, Any]) -> str:
    """audit.html: the audit alone, one self-contained file."""
    return h.page("Data audit", [h.warnings_block(audit.get("warnings") or []), audit_section(audit)])
