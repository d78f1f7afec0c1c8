"""The tutorial notebook: stored without outputs (fast), and run end to end with sane results (slow).

The slow test runs `make notebook` (headless `jupyter execute`, what a fresh install has) in a
temporary copy of the project's Makefile, pyproject.toml and notebook, with this interpreter as the
`python3` kernel (a kernel spec in a temporary JUPYTER_PATH, so the machine's own Jupyter kernels
never matter). Everything must land in the copy's `outputs/notebook/` (the project's gitignored run
folder), nothing in `notebooks/`; then it checks the `results.json` the notebook's last cell writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CASES, case_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_four_cases.ipynb"
KERNEL = "python3"  # the notebook's own kernelspec name, which `make notebook` uses
RUN_TIMEOUT_S = 1800  # about two minutes on 2 idle cores, much more on a busy CI runner


def stored_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def parameters_cell(cells: list) -> int:
    tagged = [i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one code cell tagged 'parameters'"
    return tagged[0]


def test_notebook_is_stored_without_outputs() -> None:
    nb = stored_notebook()
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    dirty = [c.get("id", i) for i, c in enumerate(code) if c["outputs"] or c["execution_count"] is not None]
    assert not dirty, (
        f"{NOTEBOOK.name} is stored with outputs in cells {dirty}: clear all outputs before saving "
        "(Jupyter: Edit > Clear Outputs of All Cells)"
    )
    assert nb["cells"][parameters_cell(nb["cells"])]["cell_type"] == "code"


def test_notebook_is_valid_nbformat() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4
    nbformat.validate(nb)


@pytest.fixture
def kernel_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec that runs ipykernel in this interpreter (the project's virtualenv)."""
    pytest.importorskip("ipykernel")
    jupyter = tmp_path / "jupyter"
    spec_dir = jupyter / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter / "runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return KERNEL


def expected_layout(case: str, full_depth: int) -> tuple[int, int]:
    """(kept stages, frozen stages) as `configs/case/<case>.yaml` defines them."""
    definition = case_config(case)
    keep = definition["keep"]
    kept = full_depth if keep is None else (keep if keep > 0 else full_depth + keep)
    frozen = {"all": kept, "none": 0}.get(definition["freeze"], definition["freeze"])
    return kept, frozen


@pytest.mark.slow
def test_make_notebook_runs_the_four_cases_into_outputs(tmp_path: Path, kernel_name: str) -> None:
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    jupyter = Path(sys.prefix) / "bin" / "jupyter"
    if shutil.which("make") is None or not jupyter.is_file():
        pytest.skip("needs make and jupyter (nbclient's `jupyter execute`) in this environment")
    assert kernel_name == json.loads(NOTEBOOK.read_text())["metadata"]["kernelspec"]["name"]
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    for rel in ("Makefile", "pyproject.toml", f"notebooks/{NOTEBOOK.name}"):
        shutil.copy2(ROOT / rel, project / rel)
    stamp = tmp_path / "installed"  # this environment is installed: no `pip install` from the copy
    stamp.touch()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    run = subprocess.run(
        ["make", "notebook", f"VENV={sys.prefix}", f"STAMP={stamp}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    out = project / "outputs" / "notebook"
    assert sorted(p.name for p in (project / "notebooks").iterdir()) == [NOTEBOOK.name]
    assert (out / "freezing.png").is_file() and (out / "learning_curves.png").is_file()
    executed = nbformat.read(out / NOTEBOOK.name, as_version=4)  # the executed copy, with its figures
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the freezing figure and the learning curves are displayed"

    results = json.loads((out / "results.json").read_text())
    assert list(results["cases"]) == list(CASES)
    epochs = results["parameters"]["epochs"]
    for case, r in results["cases"].items():
        assert r["case"] == case_config(case), f"{case}: the notebook trained the shipped case"

        # What is kept, frozen and trained follows the case definition, stage by stage.
        full = r["full_depth"]
        kept, frozen = expected_layout(case, full)
        assert (r["kept_stages"], r["frozen_stages"]) == (kept, frozen), case
        status = [s["kept"] if s["kept"] == "cut" else s["training"] for s in r["stages"]]
        assert status == ["frozen"] * frozen + ["trainable"] * (kept - frozen) + ["cut"] * (full - kept), case
        params = [s["params"] for s in r["stages"]]
        trainable, frozen_params = (
            sum(p for p, st in zip(params, status, strict=True) if st == k) for k in ("trainable", "frozen")
        )
        assert r["trainable"] == r["head_params"] + trainable and r["frozen"] == frozen_params, case
        # A new two-class linear head on the last kept stage's width.
        assert r["head_params"] == (r["stages"][kept - 1]["width"] + 1) * 2, case
        if frozen:
            assert r["frozen_unchanged"] is True, f"{case}: frozen weights or BatchNorm statistics moved"

        # Every case trained for the configured epochs, with finite losses.
        assert len(r["val_acc"]) == len(r["train_loss"]) == epochs, case
        assert all(0.0 <= a <= 1.0 for a in r["val_acc"]) and r["final_val_acc"] == r["val_acc"][-1], case
        assert all(math.isfinite(v) for v in r["train_loss"]), case

    cut = results["cases"]["small_different"]
    assert cut["kept_stages"] == cut["full_depth"] - 1 and cut["stages"][-1]["kept"] == "cut"
    # Two balanced classes, 153 validation images: chance is 0.5; a frozen ImageNet body does far better.
    assert results["cases"]["small_similar"]["final_val_acc"] >= 0.8
