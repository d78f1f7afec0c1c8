"""`copier copy` of this repository makes a working project for a new task (copier.yml + new_project.py).

The template is the current work tree (tracked and untracked, not ignored files) committed into a
temporary git repository, so the test exercises what is on disk, not the last commit. The generated
project runs in a light virtual environment that reuses this environment's packages through a `.pth`
file (no 6 GB torch copy) and holds only the new project, installed editable with its console scripts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from scripts.new_project import (
    Answers,
    describe_default_job,
    remove_template_machinery,
    rename_project,
    replace_identifiers,
    rewrite_readme,
    yaml_scalar,
)
from transfer_cases.training.cases import CASES

ROOT = Path(__file__).resolve().parents[1]
OLD_NAMES = (
    "transfer_cases",
    "transfer-cases",
    "transfer-train",
    "transfer-eval",
    "transfer-predict",
    "transfer-report",
)
DEFAULT = {"project": "my-transfer-task", "package": "my_transfer_task"}
CUSTOM_DATA = {
    "project_name": "cat-food",
    "default_case": "large_similar",
    "default_backbone": "resnet18",
    "data_path": "/data/x",
}


def git(*args: str, cwd: Path) -> str:
    identity = ("-c", "user.name=template", "-c", "user.email=template@example.invalid")
    return subprocess.run(
        ["git", *identity, "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def clean_env() -> dict[str, str]:
    """No PYTHONPATH or active venv leaking this checkout's package into the generated project."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_ADDOPTS")
    return {k: v for k, v in os.environ.items() if k not in drop}


def text_of(path: Path) -> str | None:
    """A file's text when it is UTF-8 without NUL bytes: every text file is checked, whatever its suffix."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The work tree as copier sees a template: a git repository whose HEAD holds the current files."""
    pytest.importorskip("copier")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of this repository")
    repo = tmp_path_factory.mktemp("template")
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # tracked but deleted in the work tree: not part of the template
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "template", cwd=repo)
    return repo


def generate(template: Path, dest: Path, **data: str) -> Path:
    """What `copier copy --defaults --trust --vcs-ref HEAD TEMPLATE DEST` does, in-process."""
    from copier import run_copy

    run_copy(str(template), str(dest), data=data, defaults=True, unsafe=True, vcs_ref="HEAD", quiet=True)
    return dest


@pytest.fixture(scope="module")
def generated(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(template, tmp_path_factory.mktemp("gen") / DEFAULT["project"])


@pytest.fixture(scope="module")
def light_venv(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_light_venv(generated, tmp_path_factory.mktemp("venv"))


def make_light_venv(generated: Path, venv: Path) -> Path:
    """A venv seeing this environment's packages, with the generated project installed editable."""
    pytest.importorskip("hatchling", reason="the build backend; in the dev extras")
    pytest.importorskip("editables", reason="hatchling's editable installs; in the dev extras")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        env=clean_env(),
    ).stdout.strip()
    # A plain path line: this environment's packages, but not the .pth files that add our src/.
    Path(site, "_reuse_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index"]
    install += ["--no-deps", "--no-build-isolation", "-e", str(generated)]
    subprocess.run(install, check=True, capture_output=True, env=clean_env(), timeout=300)
    return venv


def own_image_folder(root: Path, per_class: int = 8) -> Path:
    """A user's ImageFolder (`train/` and `val/`, two classes that are not ants and bees), from a few
    of the embedded photos."""
    embedded = ROOT / "src" / "transfer_cases" / "assets" / "hymenoptera"
    for split in ("train", "val"):
        for mine, theirs in (("cats", "ants"), ("dogs", "bees")):
            (root / split / mine).mkdir(parents=True)
            for photo in sorted((embedded / split / theirs).glob("*.jpg"))[:per_class]:
                shutil.copy2(photo, root / split / mine / photo.name)
    return root


def make_args(venv: Path, stamp: Path) -> list[str]:
    """Make variables that use `venv` as the project's environment, already installed (no pip)."""
    stamp.touch()
    return [f"VENV={venv}", f"STAMP={stamp}"]


def run_in(venv: Path, cwd: Path, *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    exe = venv / "bin" / cmd[0]
    return subprocess.run(
        [str(exe), *cmd[1:]], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


# --- the script on its own ---------------------------------------------------------------------------


def test_copier_questions_follow_the_configs() -> None:
    questions = yaml.safe_load((ROOT / "copier.yml").read_text())
    backbones = sorted(p.stem for p in (ROOT / "configs" / "backbone").glob("*.yaml"))
    assert sorted(questions["default_backbone"]["choices"]) == backbones
    assert tuple(questions["default_case"]["choices"]) == (*CASES, "auto")
    cases = sorted(p.stem for p in (ROOT / "configs" / "case").glob("*.yaml"))
    assert sorted([*CASES, "auto"]) == cases
    assert "{{" not in "".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))


def test_one_pass_never_replaces_a_new_name_twice(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(
        "import transfer_cases\n# transfer-train, transfer-cases, transfer-learning\n"
    )
    (tmp_path / "blob.bin").write_bytes(b"\0transfer_cases")
    mapping = {
        "transfer_cases": "transfer_cases_v2",
        "transfer-cases": "transfer-cases-v2",
        "transfer-train": "transfer-cases-v2-train",
    }
    replace_identifiers(tmp_path, mapping)
    assert (tmp_path / "a.py").read_text() == (
        "import transfer_cases_v2\n# transfer-cases-v2-train, transfer-cases-v2, transfer-learning\n"
    )
    assert (tmp_path / "blob.bin").read_bytes() == b"\0transfer_cases"


def test_make_new_and_its_readme_section_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text(
        "ARGS ?=\nDEST ?=\n\n.PHONY: help new clean\n\n"
        'new: $(STAMP)  ## a new project\n\t@test -n "$(DEST)"\n\t$(BIN)/copier copy . "$(DEST)"\n\n'
        "clean:  ## remove outputs\n\trm -rf outputs\n"
    )
    (tmp_path / "README.md").write_text(
        "# t\n\nintro\n\n## Start a new task\n\n```bash\nmake new DEST=../x\n```\n\n## Tests\n\nmake test\n"
    )
    (tmp_path / "copier.yml").write_text("project_name: x\n")
    remove_template_machinery(tmp_path, "transfer_cases")
    makefile = (tmp_path / "Makefile").read_text()
    assert makefile == "ARGS ?=\n\n.PHONY: help clean\n\nclean:  ## remove outputs\n\trm -rf outputs\n"
    assert (tmp_path / "README.md").read_text() == "# t\n\nintro\n\n## Tests\n\nmake test\n"
    assert not (tmp_path / "copier.yml").exists()


@pytest.mark.parametrize("prefix", ["", "/srv", "/srv/x", "/srv/xyz/abc", "/mnt/some-disk-1"])
def test_a_data_path_is_never_broken_across_readme_lines(tmp_path: Path, prefix: str) -> None:
    """Wrapping must not split a path at a hyphen: a code span would then show a space in it."""
    path = f"{prefix}/data-sets/cat-food-photos-2024-06-shoot/train-and-val-folders"
    (tmp_path / "README.md").write_text(
        "# x\n\nintro\n\n## Quick start\n\n" + describe_default_job(Answers())
    )
    answers = Answers(data_path=path, case="auto")
    rewrite_readme(tmp_path, answers)
    lines = [describe_default_job(answers).splitlines(), (tmp_path / "README.md").read_text().splitlines()]
    for text in lines:
        assert any(f"`{path}`" in line for line in text), text


@pytest.mark.parametrize(
    ("value", "expected"),
    [("/data/x", "/data/x"), ("/my data/it's", "'/my data/it''s'"), ("~", "'~'"), ("10", "'10'")],
)
def test_yaml_scalar_round_trips(value: str, expected: str) -> None:
    assert yaml_scalar(value) == expected
    assert yaml.safe_load(f"root: {yaml_scalar(value)}")["root"] == value


@pytest.mark.parametrize(
    "answers",
    [Answers(package_name="class"), Answers(project_name="-x"), Answers(backbone="nope"), Answers(case="x")],
)
def test_bad_answers_are_refused_before_any_change(tmp_path: Path, answers: Answers) -> None:
    package = tmp_path / "src" / "transfer_cases"
    package.mkdir(parents=True)
    for group, name in (("case", "small_similar"), ("backbone", "mobilenet_v2")):
        (tmp_path / "configs" / group).mkdir(parents=True)
        (tmp_path / "configs" / group / f"{name}.yaml").write_text("x: 1\n")
    with pytest.raises(ValueError):
        rename_project(tmp_path, answers)
    assert package.is_dir()


# --- copier end to end -------------------------------------------------------------------------------


@pytest.mark.slow  # a whole copier run per project; the renaming steps have fast unit tests above
@pytest.mark.parametrize("custom", [False, True], ids=["defaults", "custom"])
def test_generated_project_is_renamed_and_configured(
    template: Path, generated: Path, tmp_path: Path, custom: bool
) -> None:
    project, package = ("cat-food", "cat_food") if custom else (DEFAULT["project"], DEFAULT["package"])
    gen = generate(template, tmp_path / project, **CUSTOM_DATA) if custom else generated

    assert (gen / "src" / package / "__init__.py").is_file() and (gen / "src" / package / "assets").is_dir()
    assert not (gen / "src" / "transfer_cases").exists()
    for gone in ("copier.yml", "tests/test_new_project.py", "scripts/new_project.py", ".git"):
        assert not (gen / gone).exists(), gone
    leftovers = []
    for path in filter(Path.is_file, gen.rglob("*")):
        text = text_of(path)
        if text is not None:
            leftovers += [f"{path.relative_to(gen)}: {old}" for old in OLD_NAMES if old in text]
    assert not leftovers
    assert os.access(gen / ".ci" / "run", os.X_OK)

    pyproject = (gen / "pyproject.toml").read_text()  # no tomllib: Python 3.10 is supported
    assert f'\nname = "{project}"\n' in pyproject
    assert f'\n{project}-train = "{package}.commands.train:main"\n' in pyproject
    assert f'packages = ["src/{package}", "src/hydra_plugins"]' in pyproject

    readme = (gen / "README.md").read_text()
    assert readme.startswith(f"# {project}\n") and f"{project}-train " in readme
    assert f"src/{package}/" in readme and "## Start a new task" not in readme
    makefile = (gen / "Makefile").read_text()
    assert f"$(BIN)/{project}-train" in makefile and "\nnew:" not in makefile

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(gen / "configs"), version_base="1.3"):
            cfg = compose("train")
    finally:
        GlobalHydra.instance().clear()
    assert cfg.case.name == ("large_similar" if custom else "small_similar")
    assert cfg.backbone.arch == ("resnet18" if custom else "mobilenet_v2")
    assert cfg.backbone._target_.startswith(f"{package}.")
    embedded_job = "The default job is case `small_similar` on the **embedded** data and weights"
    quick_start = " ".join(readme.split("## Quick start", 1)[1].split("\n## ", 1)[0].split())
    if custom:
        assert cfg.data.root == "/data/x" and cfg.data._target_.endswith("ImageFolderDataModule")
        assert "- data: imagefolder" in (gen / "configs" / "eval.yaml").read_text()
        # The README and `make help` describe this project's default job, not the template's.
        assert embedded_job not in readme and "default-job" not in readme
        assert "case `large_similar`" in quick_start and "`/data/x` (`data=imagefolder`" in quick_start
        assert "configs/backbone/resnet18.yaml" in quick_start
        assert "large_similar, resnet18 on /data/x (data=imagefolder)" in makefile
    else:
        assert OmegaConf.to_container(cfg.data)["root"] == "${asset:hymenoptera}"
        assert embedded_job in quick_start


@pytest.mark.slow
def test_generated_project_installs_and_runs(generated: Path, light_venv: Path) -> None:
    spec = run_in(
        light_venv,
        generated,
        "python",
        "-c",
        "import importlib.util as u; print(u.find_spec('my_transfer_task').origin); "
        "print(u.find_spec('transfer_cases.commands') is None)",
    )
    assert spec.returncode == 0, spec.stderr
    origin, old = spec.stdout.split()
    assert Path(origin).is_relative_to(generated / "src" / "my_transfer_task") and old == "True"

    job = run_in(light_venv, generated, "my-transfer-task-train", "--cfg", "job")
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: small_similar" in job.stdout and "my_transfer_task." in job.stdout

    if shutil.which("make"):
        targets = subprocess.run(["make", "help"], cwd=generated, capture_output=True, text=True, check=True)
        assert "make train" in targets.stdout and "make test " in targets.stdout
        assert "make new" not in targets.stdout


def test_template_default_job_is_the_embedded_one() -> None:
    """The template's own default job (what `make train` runs here): the embedded data and weights."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train")
    finally:
        GlobalHydra.instance().clear()
    assert OmegaConf.to_container(cfg.data)["root"] == "${asset:hymenoptera}"
    assert (cfg.case.name, cfg.backbone.arch) == ("small_similar", "mobilenet_v2")


@pytest.mark.slow  # a full copier run through make; the fast suite keeps its time budget
def test_make_new_answers_from_args_without_a_terminal(template: Path, tmp_path: Path) -> None:
    """`make new DEST=... ARGS="--defaults -d ..."` as a script or CI runs it: stdin is no terminal."""
    copier = Path(sys.prefix) / "bin" / "copier"
    if shutil.which("make") is None or not copier.is_file():
        pytest.skip("needs make and copier (in the dev extras) in this environment")
    dest = tmp_path / "cli-task"
    args = "--defaults -d project_name=cli-task -d data_path=/data/y -d default_case=auto"
    run = subprocess.run(
        ["make", "new", f"DEST={dest}", f"ARGS={args}", *make_args(Path(sys.prefix), tmp_path / "stamp")],
        cwd=template,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    train = (dest / "configs" / "train.yaml").read_text()
    assert "- case: auto" in train and "- data: imagefolder" in train
    assert "root: /data/y" in (dest / "configs" / "data" / "imagefolder.yaml").read_text()
    assert (dest / "src" / "cli_task").is_dir() and (dest / "README.md").read_text().startswith(
        "# cli-task\n"
    )
    makefile = (dest / "Makefile").read_text()
    assert "\nnew:" not in makefile and "copier" not in makefile


@pytest.mark.slow
@pytest.mark.parametrize("own_data", [False, True], ids=["defaults", "own-image-folder"])
def test_generated_project_make_test_passes(
    template: Path, generated: Path, tmp_path: Path, own_data: bool
) -> None:
    """A new project's own `make test` holds for its answers: with the default ones, and pointed at the
    user's image folder (whose classes are not the embedded ants and bees)."""
    if own_data:
        images = own_image_folder(tmp_path / "my images")
        project = generate(template, tmp_path / "pets", project_name="pets", data_path=str(images))
        assert f"`{images}`" in " ".join((project / "README.md").read_text().split())
    else:
        project = generated
    venv = make_light_venv(project, tmp_path / "venv")
    basetemp = f"--basetemp={tmp_path / 'pytest-tmp'}"
    if shutil.which("make"):
        cmd = ["make", "test", f"ARGS=-p no:cacheprovider {basetemp}", *make_args(venv, tmp_path / "stamp")]
    else:
        cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", basetemp]
    env = {k: v for k, v in clean_env().items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    run = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
