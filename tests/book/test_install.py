"""The Colab install cell's command run against a locally built wheel, and recorded results found from anywhere."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmcore.book import colab_cell, repository
from lmcore.utils import install_command

from .conftest import ROOT


def test_install_command_is_a_function_of_the_source(tmp_path):
    url, branch = repository(ROOT)
    assert install_command(f"{url}@{branch}") == shlex.quote(f"lmcore[book] @ git+{url}@{branch}")
    wheel = tmp_path / "lmcore-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert install_command(wheel, constraints="c.txt", extras="") == f"-c c.txt 'lmcore @ {wheel.as_uri()}'"
    with pytest.raises(ValueError, match=r"source='nowhere/lmcore.whl' is neither a repository URL"):
        install_command("nowhere/lmcore.whl")
    pins = url.replace("https://github.com/", "https://raw.githubusercontent.com/") + f"/{branch}/constraints.txt"
    command = install_command(f"{url}@{branch}", constraints=pins)
    assert colab_cell(ROOT).splitlines()[-1].strip() == f"%pip install -q {command}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """lmcore installed from a wheel built here, with the Colab cell's command, into a fresh venv."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "lmcore", src / "lmcore", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "book" / "results", src / "book" / "results")
    run = dict(check=True, capture_output=True, text=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", str(src), "-w", str(tmp / "dist")], **run)
    wheel = next((tmp / "dist").glob("lmcore-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], **run)
    python = tmp / "venv" / "bin" / "python"
    command = install_command(wheel, constraints=ROOT / "constraints.txt")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", *shlex.split(command)],
                   **run)
    return python, tmp


def where_results(python: Path, cwd: Path) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import lmcore, lmcore.results as r
        print(lmcore.__file__)
        print(r.results_dir())
    """)
    return subprocess.run([str(python), "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


def test_the_colab_command_installs_lmcore_and_its_recorded_results(installed, tmp_path):
    python, tmp = installed
    done = where_results(python, tmp_path)
    assert done.returncode == 0, done.stderr
    package, results = done.stdout.split("\n")[:2]
    assert Path(package).is_relative_to(tmp / "venv"), package  # the installed copy, not this checkout
    assert Path(results).is_relative_to(tmp / "venv") and Path(results).name == "results", results
    assert sorted(p.name for p in Path(results).iterdir()) == sorted(
        p.name for p in (ROOT / "book" / "results").iterdir() if p.suffix in (".csv", ".json"))


def test_results_beside_the_notebook_come_first_and_missing_ones_say_where_to_get_them(installed, tmp_path):
    python, tmp = installed
    beside = tmp_path / "results"
    beside.mkdir()
    (beside / "bench-h100.json").write_text('{"provenance": {}}')
    done = where_results(python, tmp_path)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.split("\n")[1]) == beside
    moved = tmp / "moved-away"
    shipped = Path(where_results(python, tmp / "venv").stdout.split("\n")[1])
    shipped.rename(moved)
    try:
        done = where_results(python, tmp / "venv")
    finally:
        moved.rename(shipped)
    url, _ = repository(ROOT)
    assert done.returncode == 1
    assert f"download the folder book/results of {url}" in done.stderr.strip().splitlines()[-1]
