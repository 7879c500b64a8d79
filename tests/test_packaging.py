"""A plain (non-editable) install works from any directory and installs no top-level `eval` or `data`."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO_ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


@pytest.mark.slow
def test_non_editable_install_works_from_any_directory(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    top_level = {p.name for p in target.iterdir()}
    assert "ctxaware" in top_level
    assert not {"eval", "data", "tests", "recipes", "benchmarks"} & top_level, top_level
    probe = (
        "import ctxaware, ctxaware.eval, ctxaware.data, ctxaware.cli;"
        f"assert ctxaware.__file__.startswith({str(target)!r}), ctxaware.__file__;"
        "print(ctxaware.data.DATA_DIR)"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    shown = subprocess.run([sys.executable, "-c", probe], cwd="/", env=env, check=True, capture_output=True, text=True)
    assert shown.stdout.strip() == str(target / "ctxaware" / "data")
    help_text = subprocess.run(
        [sys.executable, "-m", "ctxaware.cli", "--help"], cwd="/", env=env, check=True, capture_output=True, text=True
    ).stdout
    assert "usage: ctxaware" in help_text
    (entry_points,) = target.glob("ctxaware-*.dist-info/entry_points.txt")
    assert "ctxaware = ctxaware.cli:main" in entry_points.read_text()  # the `ctxaware` console script


def test_bitsandbytes_is_an_extra_not_a_core_dependency():
    """Installed, bitsandbytes is imported by PEFT in every process (and on a CPU reaches for the Hub): only users who
    ask for 4-bit weights get it."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("bitsandbytes") for dep in project["dependencies"])
    assert any(dep.startswith("bitsandbytes") for dep in project["optional-dependencies"]["4bit"])
