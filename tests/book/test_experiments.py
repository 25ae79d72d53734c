"""The experiment runner: parameter checking, single runs, grids with a failing run, collection."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmcore import experiments
from lmcore.experiments import ParameterError, grid, notebook_parameters, parse_value, run, validate

from .conftest import ROOT, write_notebook

CHAPTER0 = ROOT / "book" / "00-using-this-book.ipynb"


@pytest.fixture
def toy(tmp_path) -> Path:
    """A throwaway chapter: squares x, records it, and fails on purpose when fail is True."""
    return write_notebook(tmp_path / "toy.ipynb", [
        ("markdown", "# Toy\n", []),
        ("code", "x = 2          # a number\nscale = 1.0    # a float\nfail = False   # raise on purpose\n"
                 "label = 'a'    # text\nsizes = [1, 2] # a list", ["parameters"]),
        ("code", "from lmcore.results import record\nif fail:\n    raise RuntimeError('asked to fail')\n"
                 "record('square', x * x * scale)\nrecord('label_length', len(label))", []),
    ])


def test_parameters_cell_defaults(toy):
    assert notebook_parameters(toy) == {"x": 2, "scale": 1.0, "fail": False, "label": "a", "sizes": [1, 2]}


@pytest.mark.parametrize("text, value", [("3", 3), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("False", False),
                                         ("[1, 2]", [1, 2]), ("hello", "hello"), ("None", None)])
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_validate_coerces_and_refuses(toy):
    assert validate(toy, {"scale": 2}) == {"scale": 2.0}
    assert validate(toy, {"label": 5}) == {"label": "5"}
    with pytest.raises(ParameterError, match=r"no parameter 'y'[\s\S]*x = 2[\s\S]*scale = 1.0"):
        validate(toy, {"y": 1})
    with pytest.raises(ParameterError, match=r"x='many'.*does not match[\s\S]*valid parameters"):
        validate(toy, {"x": "many"})
    with pytest.raises(ParameterError, match="fail=1"):
        validate(toy, {"fail": 1})


def test_cli_refuses_bad_parameter_before_running(tmp_path):
    out = tmp_path / "never"
    done = subprocess.run([sys.executable, "-m", "lmcore.experiments", "run", str(CHAPTER0),
                           "-p", "learning_rat", "0.1", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "no parameter 'learning_rat'" in done.stderr and "learning_rate = 0.3" in done.stderr
    assert not out.exists(), "nothing may run (or be written) for a refused parameter"


def test_run_writes_notebook_html_and_results(toy, tmp_path):
    result = run(toy, {"x": 3, "scale": 0.5}, tmp_path / "one")
    assert result.ok, result.error
    assert result.results == {"square": 4.5, "label_length": 1}
    folder = tmp_path / "one"
    assert json.loads((folder / "results.json").read_text()) == result.results
    assert json.loads((folder / "params.json").read_text()) == {"x": 3, "scale": 0.5}
    page = (folder / "toy.html").read_text()
    assert "<html" in page and "Traceback" not in page
    executed = json.loads((folder / "toy.ipynb").read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])


def test_grid_collects_every_run_even_when_one_fails(toy, tmp_path):
    out = tmp_path / "grid"
    results = grid(toy, {"x": [1, 2], "fail": [False, True]}, out, progress=False)
    assert [r.ok for r in results] == [True, False, True, False]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["run-000", "run-001", "run-002", "run-003"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["status"] for row in rows] == ["ok", "failed", "ok", "failed"]
    assert [row["square"] for row in rows] == ["1.0", "", "4.0", ""]
    assert "asked to fail" in rows[1]["error"] and "cell" in rows[1]["error"]
    assert (out / "run-001" / "error.txt").exists()
    assert (out / "plot.png").stat().st_size > 1000


def test_grid_cli_on_chapter_zero(tmp_path):
    """The documented command: a grid over chapter 0 gives run folders, results.csv and a plot."""
    out = tmp_path / "lr"
    done = subprocess.run(
        [sys.executable, "-m", "lmcore.experiments", "grid", str(CHAPTER0), "--grid", "learning_rate=0.3,3.0",
         "-p", "run_grid", "False", "-p", "steps", "20", "--plot", "final_loss", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [float(r["learning_rate"]) for r in rows] == [0.3, 3.0]
    assert all(r["status"] == "ok" and float(r["final_loss"]) > 0 for r in rows)
    assert (out / "run-000" / "00-using-this-book.html").exists()
    assert (out / "plot.png").exists()


def test_unknown_chapter_is_refused():
    with pytest.raises(FileNotFoundError, match="no chapter notebook"):
        experiments.find_notebook("no-such-chapter")
