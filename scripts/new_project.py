"""Turn a verbatim copy of this repository into a new project for a new task.

`copier copy --trust --vcs-ref HEAD <this repo> <dest>` copies the tree as it is (no `.jinja` files)
and then runs this script inside the copy (see `copier.yml`), so the template root keeps no Jinja
syntax, stays directly runnable and testable, and there is no second tree to keep in sync. By hand:

    python3 scripts/new_project.py --project-name my-task --package-name my_task \
        [--data-path /data/images] [--case small_similar] [--backbone mobilenet_v2] [--root .]

Standard library only and Python 3.9+: it runs under copier's interpreter, before the new project
has an environment of its own.
"""

from __future__ import annotations

import argparse
import keyword
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_PACKAGE = "transfer_cases"
TEMPLATE_PROJECT = "transfer-cases"
SCRIPT_PREFIX = "transfer-"
# Fallback when pyproject.toml lists no console scripts (it is the source of truth otherwise).
KNOWN_SCRIPTS = ("transfer-train", "transfer-eval", "transfer-predict", "transfer-report")

TEXT_SUFFIXES = {".py", ".toml", ".yaml", ".yml", ".md", ".txt", ".cfg", ".ini", ".ipynb", ".sh", ".json"}
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "outputs", "multirun", "logs", "build", "dist"}
SKIP_DIRS |= {".pytest_cache", ".ruff_cache", ".mypy_cache", ".ipynb_checkpoints", "node_modules"}
# Files that only make sense in the template; `{package}` is the package's (new) name.
TEMPLATE_ONLY = (
    "copier.yml",
    "copier.yaml",
    "tests/test_new_project.py",
    "scripts/new_project.py",
    "scripts/__init__.py",
    "docs/new_project.md",
)
NEW_TASK_SECTION = re.compile(r"^## Start a new (task|project)\b.*?(?=^## |\Z)", re.M | re.S)
# The Makefile's `new` rule with the comment lines just above it (its recipe lines start with a tab)
# and the variable only it uses.
MAKE_NEW_RULE = re.compile(r"^(?:#.*\n)*new:.*\n(?:\t.*\n)*\n?", re.M)
MAKE_DEST_VAR = re.compile(r"^DEST\s*\?=.*\n", re.M)
# A YAML scalar that needs no quotes: a path without spaces, `#`, quotes or a leading indicator.
PLAIN_YAML = re.compile(r"[\w./~$][\w./~${}:@+=,-]*")


@dataclass(frozen=True)
class Answers:
    """The questions of `copier.yml`, as the new project needs them."""

    project_name: str = "my-transfer-task"
    package_name: str = "my_transfer_task"
    data_path: str = ""  # empty: keep the embedded hymenoptera images as the default data
    case: str = "small_similar"
    backbone: str = "mobilenet_v2"


def validate(root: Path, answers: Answers) -> None:
    """Refuse names that would break the build, imports or console scripts, before touching files."""
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", answers.project_name):
        raise ValueError(
            f"project name {answers.project_name!r}: use letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit (e.g. my-transfer-task)"
        )
    pkg = answers.package_name
    if not (pkg.isidentifier() and pkg.isascii() and pkg == pkg.lower()) or keyword.iskeyword(pkg):
        raise ValueError(f"package name {pkg!r}: use a lower-case Python identifier (e.g. my_transfer_task)")
    if pkg == "tests" or pkg in getattr(sys, "stdlib_module_names", ()):
        raise ValueError(f"package name {pkg!r} would shadow the tests package or a standard module")
    for group, name in (("case", answers.case), ("backbone", answers.backbone)):
        options = sorted(p.stem for p in (root / "configs" / group).glob("*.yaml"))
        if name not in options:
            raise ValueError(f"{group} {name!r}: choose one of {', '.join(options)}")


def console_scripts(root: Path) -> list[str]:
    """The template's console scripts (`transfer-*`) as `pyproject.toml` declares them."""
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    names = re.findall(r"^\s*\"?([\w.-]+)\"?\s*=", section.group(1), re.M) if section else []
    found = [n for n in names if n.startswith(SCRIPT_PREFIX)]
    return sorted(set(found) | set(KNOWN_SCRIPTS))


def replacements(root: Path, answers: Answers) -> dict[str, str]:
    """Old identifier -> new one: package, distribution name and every console script."""
    mapping = {
        TEMPLATE_PACKAGE: answers.package_name,
        TEMPLATE_PROJECT: answers.project_name,
        # The Hydra plugin package (src/hydra_plugins/<package>_sweeper): one per installed project.
        f"{TEMPLATE_PACKAGE}_sweeper": f"{answers.package_name}_sweeper",
    }
    for script in console_scripts(root):
        mapping[script] = f"{answers.project_name}-{script[len(SCRIPT_PREFIX) :]}"
    return mapping


def is_text(path: Path) -> bool:
    """Known text suffixes, plus suffix-less files (Makefile, .ci/run) that decode as UTF-8."""
    if path.suffix in TEXT_SUFFIXES or path.name in ("Makefile", ".gitignore"):
        return True
    if path.suffix or path.stat().st_size > 1_000_000:
        return False
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data


def text_files(root: Path) -> Iterator[Path]:
    """Every text file of the project, skipping environments, caches and run outputs."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).parts
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel[:-1]):
            continue
        if path.is_file() and not path.is_symlink() and is_text(path):
            yield path


def replace_identifiers(root: Path, mapping: dict[str, str]) -> list[Path]:
    """Rewrite text files in one regex pass: a new name that contains an old one is not replaced twice."""
    alternatives = "|".join(re.escape(old) for old in sorted(mapping, key=len, reverse=True))
    pattern = re.compile(rf"(?<![A-Za-z0-9_])(?:{alternatives})(?![A-Za-z0-9_])")
    changed = []
    for path in text_files(root):
        text = path.read_text(encoding="utf-8")
        new = pattern.sub(lambda m: mapping[m.group(0)], text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def rename_package(root: Path, package: str) -> None:
    """`src/transfer_cases` -> `src/<package>` and its Hydra plugin package (no-op when the name is kept)."""
    plugins = root / "src" / "hydra_plugins"
    for old, new in (
        (root / "src" / TEMPLATE_PACKAGE, root / "src" / package),
        (plugins / f"{TEMPLATE_PACKAGE}_sweeper", plugins / f"{package}_sweeper"),
    ):
        if old == new or not old.exists():
            continue
        if new.exists():
            raise FileExistsError(f"{new} already exists")
        old.rename(new)


def yaml_scalar(value: str) -> str:
    """A YAML string: plain for a simple path with a `/` (never read as null, bool or number), else quoted."""
    if "/" in value and PLAIN_YAML.fullmatch(value):
        return value
    return "'" + value.replace("'", "''") + "'"


def _sub_once(path: Path, pattern: str, replacement: str) -> None:
    """Replace exactly one line of a config, or fail loudly when the template changed shape."""
    text = path.read_text(encoding="utf-8")
    new, count = re.subn(pattern, lambda m: m.group(1) + replacement, text, flags=re.M)
    if count != 1:
        raise ValueError(f"{path}: expected one line matching {pattern!r}, found {count}")
    path.write_text(new, encoding="utf-8")


def set_defaults(root: Path, answers: Answers) -> None:
    """The default case and backbone of `train.yaml`; with a data path, `data=imagefolder` at that root."""
    configs = root / "configs"
    train = configs / "train.yaml"
    _sub_once(train, r"^([ \t]*-[ \t]*case:[ \t]*)\S+[ \t]*$", answers.case)
    _sub_once(train, r"^([ \t]*-[ \t]*backbone:[ \t]*)\S+[ \t]*$", answers.backbone)
    if not answers.data_path:
        return
    _sub_once(configs / "data" / "imagefolder.yaml", r"^(root:[ \t]*)\S.*$", yaml_scalar(answers.data_path))
    for name in ("train.yaml", "eval.yaml"):
        if (configs / name).is_file():
            _sub_once(configs / name, r"^([ \t]*-[ \t]*data:[ \t]*)\S+[ \t]*$", "imagefolder")


def rewrite_readme(root: Path, answers: Answers) -> None:
    """The title and the paragraph under it name the new project and its default job."""
    path = root / "README.md"
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    data = (
        f"`{answers.data_path}` (`data=imagefolder`)"
        if answers.data_path
        else "the embedded hymenoptera images"
    )
    intro = textwrap.fill(
        "Transfer learning for image classification with PyTorch Lightning and Hydra. "
        f"Default job (`configs/train.yaml`): case `{answers.case}`, backbone `{answers.backbone}`, "
        f"data {data}.",
        width=100,
        break_long_words=False,
        break_on_hyphens=False,
    )
    head = f"# {answers.project_name}\n\n{intro}\n"
    # Replace the title and the paragraph under it; keep everything from the first blank line after it.
    match = re.match(r"# .*\n\n(?:[^\n]+\n)*", text)
    path.write_text(head + (text[match.end() :] if match else "\n" + text), encoding="utf-8")


DEFAULT_JOB = re.compile(r"^<!-- default-job\b.*?-->\n.*?^<!-- /default-job -->\n", re.M | re.S)


def describe_default_job(answers: Answers) -> str:
    """The README passage on the default job, for the new project's own answers."""
    if answers.data_path:
        data = (
            f"your images in `{answers.data_path}` (`data=imagefolder`: `train/<class>/` and "
            "`val/<class>/` folders, or one folder per class split by `data.val_fraction`)"
        )
    else:
        data = "the **embedded** hymenoptera images (ants vs bees, 245 train / 153 val images)"
    if answers.backbone == "mobilenet_v2":
        weights = "the **embedded** ImageNet-1k MobileNetV2 (no download)"
    else:
        weights = f"the pretrained weights of `configs/backbone/{answers.backbone}.yaml` (downloaded once)"
    text = (
        f"The default job (`configs/train.yaml`) is case `{answers.case}` with {weights}, on {data}. "
        "The embedded ants/bees and MobileNetV2 stay in the package: `data=hymenoptera` and "
        "`backbone=mobilenet_v2` run offline, and the tests and the notebook use them by name."
    )
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False) + "\n"


def rewrite_default_job(root: Path, answers: Answers) -> None:
    """The README's default-job passage and `make train`'s help line follow the answers."""
    template = Answers()  # the template's own default job: its README passage already says so
    if (answers.data_path, answers.case, answers.backbone) == (
        template.data_path,
        template.case,
        template.backbone,
    ):
        return
    readme = root / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        readme.write_text(DEFAULT_JOB.sub(lambda m: describe_default_job(answers), text), encoding="utf-8")
    makefile = root / "Makefile"
    if makefile.is_file():
        data = f"{answers.data_path} (data=imagefolder)" if answers.data_path else "embedded hymenoptera"
        help_line = f'the default job: {answers.case}, {answers.backbone} on {data} (ARGS="case=... ...")'
        text = re.sub(
            r"^(train:[^#\n]*## ).*$", lambda m: m.group(1) + help_line, makefile.read_text(), flags=re.M
        )
        makefile.write_text(text, encoding="utf-8")


def remove_template_machinery(root: Path, package: str) -> None:
    """Drop what only creates new projects: copier.yml, this script, its test, `make new`, its README part."""
    for rel in TEMPLATE_ONLY:
        (root / rel.format(package=package)).unlink(missing_ok=True)
    if (root / "scripts").is_dir() and not any((root / "scripts").iterdir()):
        (root / "scripts").rmdir()
    readme = root / "README.md"
    if readme.is_file():
        readme.write_text(NEW_TASK_SECTION.sub("", readme.read_text(encoding="utf-8")), encoding="utf-8")
    makefile = root / "Makefile"
    if makefile.is_file():
        text = MAKE_DEST_VAR.sub("", MAKE_NEW_RULE.sub("", makefile.read_text(encoding="utf-8")))
        text = re.sub(r"^(\.PHONY:.*?) new\b", r"\1", text, flags=re.M)
        makefile.write_text(text, encoding="utf-8")


def rename_project(root: Path, answers: Answers) -> None:
    """Make the copy at `root` the new project: names, package folder, default config, README."""
    root = root.resolve()
    if not (root / "src" / TEMPLATE_PACKAGE).is_dir():
        raise FileNotFoundError(f"{root / 'src' / TEMPLATE_PACKAGE} not found: run this in a fresh copy")
    validate(root, answers)
    mapping = replacements(root, answers)  # before pyproject.toml is rewritten
    remove_template_machinery(root, TEMPLATE_PACKAGE)
    replace_identifiers(root, mapping)
    rename_package(root, answers.package_name)
    set_defaults(root, answers)
    rewrite_readme(root, answers)
    rewrite_default_job(root, answers)
    for cache in root.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project-name", required=True, help="distribution name and console-script prefix")
    parser.add_argument("--package-name", required=True, help="Python import name")
    parser.add_argument("--data-path", default="", help="image folder for data=imagefolder (empty: embedded)")
    # The choices are the config group's files (this script runs before the package is installed).
    cases = sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "configs" / "case").glob("*.yaml"))
    parser.add_argument("--case", default=Answers.case, choices=cases or None)
    parser.add_argument("--backbone", default=Answers.backbone, help="a file stem of configs/backbone/")
    parser.add_argument("--root", type=Path, default=Path(), help="the copy to rewrite (default: cwd)")
    args = parser.parse_args(argv)
    answers = Answers(args.project_name, args.package_name, args.data_path, args.case, args.backbone)
    try:
        rename_project(args.root, answers)
    except (ValueError, OSError) as err:
        print(f"new_project: {err}", file=sys.stderr)
        return 1
    print(f"created {answers.project_name}: src/{answers.package_name}, {answers.project_name}-train, ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
