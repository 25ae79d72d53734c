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


# ----------------------------------------------------------------------------------------------
# results that already exist are never lost


def quiet(*_):
    pass


def test_rerun_without_resume_leaves_the_old_run_intact(toy, tmp_path):
    folder = tmp_path / "one"
    assert run(toy, {"x": 3}, folder, log=quiet).ok
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(experiments.FolderInUse, match=r"holds an earlier run.*--resume.*--overwrite.*--next"):
        run(toy, {"x": 4}, folder, log=quiet)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # the command line says so in one line and exits 2
    done = subprocess.run([sys.executable, "-m", "lmcore.experiments", "run", str(toy), "-p", "x", "5",
                           "--out", str(folder)], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # --next writes a numbered sibling; --resume with the same parameters does nothing
    lines = []
    assert run(toy, {"x": 4}, folder, policy="next", log=lines.append).folder == tmp_path / "one-2"
    assert "writing to" in lines[0] and "one-2" in lines[0]
    assert run(toy, {"x": 3}, folder, policy="resume", log=quiet).skipped


def test_failed_rerun_keeps_earlier_results_and_a_later_good_run_clears_the_error(toy, tmp_path):
    folder = tmp_path / "one"
    assert run(toy, {"x": 3}, folder, log=quiet).ok
    good = (folder / "results.json").read_text()
    failed = run(toy, {"x": 3, "fail": True}, folder, policy="overwrite", log=quiet)
    assert not failed.ok and failed.folder.parent == folder and failed.folder.name.startswith("failed-")
    assert (folder / "results.json").read_text() == good, "a failed run deleted earlier results"
    assert "asked to fail" in (failed.folder / "error.txt").read_text()
    assert run(toy, {"x": 4}, folder, policy="overwrite", log=quiet).ok
    assert sorted(p.name for p in folder.iterdir()) == ["params.json", "results.json", "run.json", "toy.html",
                                                         "toy.ipynb"], "stale error files survived a good run"
    assert json.loads((folder / "results.json").read_text())["square"] == 16


def test_repeated_grid_option_is_refused(toy, tmp_path, capsys):
    assert experiments.main(["grid", str(toy), "--grid", "x=1,2", "--grid", "x=3",
                             "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "--grid x is given twice" in err and "x=1,2,3" in err
    assert not (tmp_path / "g").exists()


def test_grid_interrupted_by_sigterm_has_a_table_of_what_is_on_disk(tmp_path):
    """Over an older grid (--overwrite): the table lists exactly the finished runs now on disk."""
    import signal
    import time

    slow = write_notebook(tmp_path / "slow.ipynb", [
        ("code", "x = 1\nnap = 0.0", ["parameters"]),
        ("code", "import time\nfrom lmcore.results import record\ntime.sleep(nap)\nrecord('square', x * x)",
         []),
    ])
    out = tmp_path / "grid"
    for i, x in enumerate([7, 8, 9]):  # an older grid's folders and table
        (out / f"run-{i:03d}").mkdir(parents=True)
        (out / f"run-{i:03d}" / "params.json").write_text(json.dumps({"x": x}))
    (out / "results.csv").write_text("run,status,x\nrun-000,ok,7\nrun-001,ok,8\nrun-002,ok,9\n")
    argv = ["grid", str(slow), "--grid", "x=1,2,3", "-p", "nap", "30", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "lmcore.experiments", *argv, "--overwrite"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob(".run-000.staging-*")):
        time.sleep(0.2)
    time.sleep(3.0)  # inside the first run's 30 s nap (or still starting its kernel)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: 0 of 3 runs finished") and "--resume" in last, err
    assert "Traceback" not in err
    rows = list(csv.DictReader((out / "results.csv").open()))
    on_disk = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert rows == [] and on_disk == [], (rows, on_disk)  # nothing finished, nothing old left to mislead

    # a fast grid stopped with Ctrl-C after its first run: the table holds that run, --resume does the rest
    argv = ["grid", str(slow), "--grid", "x=1,2,3", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "lmcore.experiments", *argv, "--overwrite"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while time.time() < deadline and not (out / "run-000" / "run.json").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    rows = list(csv.DictReader((out / "results.csv").open()))
    finished = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert [r["run"] for r in rows] == finished and "run-000" in finished, (rows, finished, err)
    for row in rows:
        assert json.loads((out / row["run"] / "params.json").read_text())["x"] == int(row["x"])
    assert not list(out.glob(".*staging*")), "a half-run staging folder was left behind"
    if proc.returncode == 130:  # stopped before the last run: continue as the message says
        assert "--resume" in err.strip().splitlines()[-1]
    done = subprocess.run([sys.executable, "-m", "lmcore.experiments", *argv, "--resume"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{len(rows)} of 3 runs finished earlier" in done.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["x"] for r in rows] == ["1", "2", "3"] and [r["square"] for r in rows] == ["1", "4", "9"]


def test_a_cell_abandoned_by_an_interrupt_ends_without_a_traceback(caplog):
    """The race behind a traceback after "interrupted: ...": papermill shuts the kernel down on the
    loop where the stopped cell waits, and the cell ends in an error nothing reads."""
    import asyncio
    import gc
    import logging

    from nbclient.exceptions import DeadKernelError

    from lmcore.book import _quiet_abandoned_cells

    loop = _quiet_abandoned_cells()

    async def fail(err):
        raise err

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for err in (DeadKernelError("Kernel died"), ValueError("a real bug")):
            task = loop.create_task(fail(err))
            loop.run_until_complete(asyncio.wait([task]))  # finished; its error is never read
            del task
            gc.collect()
    unread = [r.exc_info[1] for r in caplog.records if r.name == "asyncio" and r.exc_info]
    assert [type(e) for e in unread] == [ValueError], unread


def test_resume_refuses_a_folder_it_would_not_describe(toy, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run")
    with pytest.raises(experiments.FolderInUse, match="holds no run of a chapter to continue"):
        run(toy, {"x": 3}, folder, policy="resume", log=quiet)
    with pytest.raises(experiments.FolderInUse, match="notes.txt, which this grid of 2 runs would not list"):
        grid(toy, {"x": [1, 2]}, folder, policy="resume", progress=False, log=quiet)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
