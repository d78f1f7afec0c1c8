"""What the advisor writes: advice.json that round-trips, the exact command, a PNG, the table."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from transfer_cases.advise import StageScores, decide, print_advice, read_advice, train_command, write_advice
from transfer_cases.advise.report import stage_figure, stage_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def small_different_advice():
    stages = [
        StageScores(i + 1, w, lp, lr, pp, 0.02, pr, 0.03, stride=s)
        for i, (w, s, lp, lr, pp, pr) in enumerate(
            [(16, 2, -0.7, -0.7, 0.5, 0.3), (24, 4, -0.2, -0.6, 0.9, 0.4), (32, 8, -0.5, -0.7, 0.7, 0.35)]
        )
    ]
    return decide({"ants": 20, "bees": 18}, stages, threshold_source="measured by test")


def test_command_puts_user_overrides_first_and_replaces_the_case() -> None:
    advice = small_different_advice()
    command = train_command(advice, ["data=hymenoptera", "case=auto", "case.keep=9", "trainer.max_epochs=3"])
    assert shlex.split(command) == [
        "transfer-train",
        "data=hymenoptera",
        "trainer.max_epochs=3",
        "case=small_different",
        "case.keep=2",
    ]
    assert shlex.split(train_command(advice, ["data.root=/my data"]))[1] == "data.root=/my data"


def test_advice_json_round_trips_and_holds_the_command(tmp_path: Path) -> None:
    advice = small_different_advice()
    paths = write_advice(
        advice, tmp_path / "out", extra_overrides=["data=hymenoptera"], timings={"extract_s": 1.5}
    )
    assert read_advice(paths["json"]) == advice
    assert read_advice(tmp_path / "out") == advice
    record = json.loads(paths["json"].read_text())
    assert record["command"] == "transfer-train data=hymenoptera case=small_different case.keep=2"
    assert record["overrides"] == ["case=small_different", "case.keep=2"]
    assert record["timings"] == {"extract_s": 1.5}
    assert record["samples_per_class"] == {"ants": 20, "bees": 18}
    assert [s["probe_pretrained"] for s in record["stages"]] == [0.5, 0.9, 0.7]
    assert record["threshold_source"] == "measured by test"


def test_advice_json_says_how_the_control_was_built_and_holds_the_h_score(tmp_path: Path) -> None:
    advice = small_different_advice()
    stages = tuple(replace(s, h_score_pretrained=0.1 * s.stage, h_score_random=0.01) for s in advice.stages)
    note = "random init (torch seed 7, from advisor seed 0), BatchNorm statistics estimated on 38 images"
    advice = replace(advice, control=note, stages=stages)
    record = json.loads(write_advice(advice, tmp_path)["json"].read_text())
    assert record["control"] == note
    assert [s["h_score_pretrained"] for s in record["stages"]] == [0.1, 0.2, 0.30000000000000004]
    assert read_advice(tmp_path) == advice
    console = Console(record=True, width=80)
    console.print(stage_table(advice))
    text = console.export_text()
    assert "H-score" in text and "0.200" in text and "estimated on 38 images" in text
    assert "…" not in text  # every cell whole in 80 columns


def test_chart_is_a_png(tmp_path: Path) -> None:
    chart = write_advice(small_different_advice(), tmp_path)["chart"]
    data = chart.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # two panels of lines, not an empty canvas


def test_printed_advice_marks_the_stage_and_ends_with_the_command() -> None:
    console = Console(record=True, width=200)
    print_advice(small_different_advice(), ["data=hymenoptera"], console=console)
    text = console.export_text()
    assert "2 ◀" in text and "stride" in text
    assert "0.900 ± 0.020" in text
    assert "measured by test" in text
    assert text.rstrip().endswith("transfer-train data=hymenoptera case=small_different case.keep=2")


def curve_advice():
    """The full body's probe climbs 0.80 -> 0.86 -> 0.90 from 25 to 100 per class; 400 per class."""
    stages = [
        StageScores(1, 16, -0.5, -0.7, 0.6, 0.02, 0.3, 0.03),
        StageScores(2, 32, -0.2, -0.7, 0.9, 0.01, 0.3, 0.03, curve_per_class=(25, 50, 100)),
    ]
    stages[1] = replace(stages[1], curve_acc=(0.8, 0.86, 0.9), curve_std=(0.01, 0.01, 0.01))
    return decide({c: 400 for c in "abcd"}, stages)


def test_the_predicted_gain_and_its_curve_are_written_printed_and_drawn(tmp_path: Path) -> None:
    advice = curve_advice()
    paths = write_advice(advice, tmp_path)
    record = json.loads(paths["json"].read_text())
    gain = record["gain"]
    assert gain["per_class"] == 400 and gain["curve_acc"] == [0.8, 0.86, 0.9] and gain["stage"] == 2
    assert gain["trained_per_class"] == [20, 40, 80] and 0.9 < gain["head_acc"] < 1
    assert read_advice(tmp_path) == advice
    console = Console(record=True, width=300)
    print_advice(advice, console=console)
    lines = [line for line in console.export_text().splitlines() if "predicted fine-tuning gain" in line]
    assert len(lines) == 1 and lines[0].startswith("predicted fine-tuning gain at 400/class: +0.0")
    # The chart's third panel: the curve at the images each probe trained on, extrapolated to 400.
    curve_ax = stage_figure(advice).axes[-1]
    assert "predicted fine-tuning gain" in curve_ax.get_title() and curve_ax.get_xscale() == "log"
    extrapolated = next(line for line in curve_ax.get_lines() if line.get_linestyle() == "--")
    assert extrapolated.get_xdata()[0] == pytest.approx(80) and extrapolated.get_xdata()[-1] == pytest.approx(
        400
    )
    assert extrapolated.get_ydata()[-1] == pytest.approx(gain["head_acc"])
