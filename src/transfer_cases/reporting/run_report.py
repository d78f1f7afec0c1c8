"""`report.html` of one run, built from its folder alone: summary.json, .hydra/config.yaml,
csv/metrics.csv, val_predictions.npz, advice.json and audit.json, each section skipped when its
file is missing. Charts are inline SVG and tables plain HTML: the report costs milliseconds."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from transfer_cases.reporting import html as h
from transfer_cases.reporting.audit_html import audit_section
from transfer_cases.reporting.formats import fmt_score, fmt_time
from transfer_cases.reporting.predictions import read_predictions
from transfer_cases.reporting.svg import heat_color, line_chart
from transfer_cases.training.summary import read_summary
from transfer_cases.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)
REPORT_FILE = "report.html"


@rank_zero_only
def write_run_report(
    run_dir: str | Path, out_dir: str | Path | None = None, *, strict: bool = False
) -> Path | None:
    """Write `report.html` for the run in `run_dir` (into `out_dir`, default the run folder).

    At the end of a run a broken report must not fail the run: without `strict` an error is one
    warning and None is returned."""
    run = Path(run_dir)
    path = Path(out_dir or run) / REPORT_FILE
    try:
        atomic_write_text(path, run_html(run), what="run report", setting="--out")
    except Exception as e:
        if strict:
            raise
        log.warning("could not write the run report %s: %s", path, e)
        return None
    return path


def run_html(run: Path) -> str:
    summary = read_summary(run) or {"status": "unknown", "error": "no summary.json"}
    cfg = _config(run)
    predictions = read_predictions(run)
    audit = _json(run / "audit.json")
    advice = summary.get("advice") if isinstance(summary.get("advice"), dict) else _json(run / "advice.json")
    title = f"Run report: {summary.get('case') or '?'} · {summary.get('backbone') or '?'}"
    warnings = list(summary.get("warnings") or [])
    if summary.get("status") != "ok":
        warnings.insert(0, f"the run {summary.get('status')}: {summary.get('error')}")
    if audit:
        warnings += list(audit.get("warnings") or [])
    return h.page(
        title,
        [
            h.warnings_block(warnings),
            h.section("What was trained", _case_facts(summary, cfg, run)),
            h.section("Metrics (val/test: best checkpoint; train: last epoch)", _metrics(summary)),
            h.section("Learning curves", _curves(run)),
            *(
                _prediction_sections(predictions)
                if predictions
                else [h.section("Predictions", _no_predictions())]
            ),
            h.section("Advisor's evidence", _advice(advice)) if advice else "",
            audit_section(audit) if audit else "",
            h.section("Timings", _timings(summary)),
        ],
    )


def _config(run: Path) -> dict[str, Any]:
    path = run / ".hydra" / "config.yaml"
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else {}
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def _json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`; None when missing, unreadable or not an object (a report section
    is skipped, never the whole report)."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _case_facts(summary: dict[str, Any], cfg: dict[str, Any], run: Path) -> str:
    case = cfg.get("case") or {}
    params = summary.get("params") or {}
    keep = case.get("keep")
    freeze = case.get("freeze")
    return h.definitions(
        [
            ("status", summary.get("status")),
            ("case", summary.get("case")),
            ("backbone", summary.get("backbone")),
            ("init", summary.get("init")),
            ("stages kept (cut)", "all" if keep is None and case else keep),
            ("frozen", freeze),
            ("probe epochs (LP-FT)", case.get("probe_epochs")),
            (
                "trainable / frozen params",
                f"{_count(params.get('trainable'))} / {_count(params.get('frozen'))}" if params else None,
            ),
            ("trained on", (summary.get("metrics_source") or {}).get("val_test_inputs")),
            ("data", summary.get("data")),
            ("best checkpoint", summary.get("best_checkpoint")),
            ("run folder", str(run)),
        ]
    )


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _metrics(summary: dict[str, Any]) -> str:
    metrics = summary.get("metrics") or {}
    if not metrics:
        return "<p class=muted>No metrics.</p>"
    rows = [[k, f"{v:.4f}" if isinstance(v, (int, float)) else v] for k, v in sorted(metrics.items())]
    return h.table(["metric", "value"], rows, numeric=["value"])


def history(run: Path) -> dict[int, dict[str, float]]:
    """`{epoch: {metric: value}}` from csv/metrics.csv (the last value of an epoch wins)."""
    path = run / "csv" / "metrics.csv"
    rows: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return rows
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            try:
                epoch = int(float(line.get("epoch") or "nan"))
            except ValueError:
                continue
            for key, value in line.items():
                if key not in ("epoch", "step") and value:
                    with contextlib.suppress(ValueError):
                        rows.setdefault(epoch, {})[key] = float(value)
    return rows


def _curves(run: Path) -> str:
    epochs = history(run)
    if not epochs:
        return "<p class=muted>No csv/metrics.csv.</p>"

    def series(key: str) -> list[tuple[float, float]]:
        return [(e, v[key]) for e, v in sorted(epochs.items()) if key in v]

    loss = {"train": series("train/loss_epoch"), "val": series("val/loss")}
    acc = {"train": series("train/acc"), "val": series("val/acc")}
    return line_chart(loss, "loss") + " " + line_chart(acc, "accuracy")


def _no_predictions() -> str:
    return (
        "<p class=muted>No val_predictions.npz in the run folder: add the callback "
        "<code>callbacks.val_predictions</code> (transfer_cases.reporting.predictions.ValPredictions).</p>"
    )


def per_class_scores(
    probs: np.ndarray, labels: np.ndarray, n: int
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """The confusion matrix (rows: true class) and precision, recall, F1 and support per class."""
    predicted = probs.argmax(axis=1)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    scores = []
    for c in range(n):
        tp, support, called = matrix[c, c], matrix[c].sum(), matrix[:, c].sum()
        precision = tp / called if called else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append({"precision": precision, "recall": recall, "f1": f1, "support": int(support)})
    return matrix, scores


def _prediction_sections(p: dict[str, np.ndarray]) -> list[str]:
    classes = [str(c) for c in p["classes"]]
    matrix, scores = per_class_scores(p["probs"], p["labels"], len(classes))
    head = "".join(f"<th>{h.esc(c)}</th>" for c in classes)
    body = []
    for i, name in enumerate(classes):
        total = max(int(matrix[i].sum()), 1)
        cells = "".join(
            f'<td class=num style="background:{heat_color(v / total)};'
            f'color:{"#fff" if v / total > 0.5 else "#000"}">{v}</td>'
            for v in matrix[i]
        )
        body.append(f"<tr><th>{h.esc(name)}</th>{cells}</tr>")
    confusion = (
        f'<table class="confusion"><thead><tr><th>true \\ predicted</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    rows = [
        [c, fmt_score(s["precision"]), fmt_score(s["recall"]), fmt_score(s["f1"]), s["support"]]
        for c, s in zip(classes, scores, strict=True)
    ]
    per_class = h.table(
        ["class", "precision", "recall", "F1", "support"],
        rows,
        numeric=["precision", "recall", "F1", "support"],
    )
    thumbs = []
    for i, uri, name in zip(p["wrong"], p["thumbs"], p["names"], strict=True):
        true, pred = classes[p["labels"][i]], classes[int(p["probs"][i].argmax())]
        prob = float(p["probs"][i].max())
        thumbs.append(
            f'<div class="thumb">{h.img(str(uri), f"{name}: {true} predicted as {pred}")}'
            f"<b>{h.esc(pred)}</b> {prob:.2f}<br>true: {h.esc(true)}<br>"
            f"<span class=muted>{h.esc(name)}</span></div>"
        )
    wrong = (
        f'<div class="thumbs">{"".join(thumbs)}</div>'
        if thumbs
        else "<p>No validation image is misclassified.</p>"
    )
    errors = int((p["probs"].argmax(1) != p["labels"]).sum())
    return [
        h.section("Confusion matrix (validation, best checkpoint)", confusion),
        h.section("Per class", per_class),
        h.section(
            f"Most confidently wrong ({len(thumbs)} of {errors} errors)",
            wrong,
        ),
    ]


def _advice(advice: dict[str, Any]) -> str:
    facts = h.definitions(
        [
            ("case", advice.get("case")),
            ("data size", advice.get("size")),
            ("similarity", advice.get("similarity")),
            ("best stage", f"{advice.get('best_stage')} of {advice.get('depth')}"),
            ("overrides", " ".join(advice.get("overrides") or [])),
        ]
    )
    stages = [
        [
            s.get("stage"),
            s.get("width"),
            f"{s.get('logme_pretrained', 0):.3f}",
            f"{s.get('probe_pretrained', 0):.3f}",
            f"{s.get('probe_random', 0):.3f}",
        ]
        for s in advice.get("stages") or []
    ]
    table = (
        h.table(
            ["stage", "width", "LogME", "probe pretrained", "probe random"],
            stages,
            numeric=["stage", "width", "LogME", "probe pretrained", "probe random"],
        )
        if stages
        else ""
    )
    reasons = "".join(f"<li>{h.esc(r)}</li>" for r in advice.get("reasoning") or [])
    return facts + table + (f"<ul>{reasons}</ul>" if reasons else "")


def _timings(summary: dict[str, Any]) -> str:
    rows = [["training (all phases)", fmt_time(summary.get("train_time_s"))]]
    for name, phase in (summary.get("phases") or {}).items():
        rows.append([f"phase {name} ({phase.get('epochs')} epochs)", fmt_time(phase.get("train_time_s"))])
    cache = summary.get("feature_cache") or {}
    for label, entry in (cache.get("files") or {}).items():
        rows.append([f"feature cache: {label}", "hit" if entry.get("hit") else "built"])
    return h.table(["what", "time"], rows, sortable=False)
