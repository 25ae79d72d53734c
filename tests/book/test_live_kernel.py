"""A chapter run as a reader runs it: a plain kernel (no papermill, no LMCORE_STATIC), every cell run twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmcore.book import profile_parameters, stage
from lmcore.utils import SOURCE_ENV, STATIC_ENV

from .conftest import ROOT

pytestmark = pytest.mark.slow

CHAPTER = "00-using-this-book.ipynb"  # the cheapest chapter with an explore() widget and a parameters cell


def with_values(nb, values: dict) -> None:
    """Put ``values`` in a cell after the ``parameters`` cell, as the book build does (a reader edits the cell)."""
    import nbformat

    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    lines = [f"{name} = {value!r}" for name, value in values.items()]
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell("\n".join(lines)))


# Run in its own process, as a reader's Jupyter is: no event loop or patched asyncio left by the tests before.
RUN_TWICE = """
import sys, nbformat
from nbclient import NotebookClient
path, folder = sys.argv[1], sys.argv[2]
nb = nbformat.read(path, as_version=4)
client = NotebookClient(nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": folder}})
with client.setup_kernel():
    for index, cell in enumerate(nb.cells):
        for _ in range(2):  # the reader's second Shift+Enter on the same cell
            client.execute_cell(cell, index)  # raises CellExecutionError naming the cell on an error
nbformat.write(nb, path)
"""


def test_a_chapter_runs_in_a_live_kernel_with_every_cell_run_twice(tmp_path):
    import nbformat

    staged = stage(ROOT, tmp_path / "root") / "book"
    notebook = staged / CHAPTER
    nb = nbformat.read(str(notebook), as_version=4)
    # the CI profile; the grid of the chapter running itself through papermill is the build test's to run
    with_values(nb, {**profile_parameters(ROOT, "ci", ROOT / "book" / CHAPTER), "run_grid": False})
    nbformat.write(nb, str(notebook))
    env = {k: v for k, v in os.environ.items() if k not in (STATIC_ENV, SOURCE_ENV, "LMCORE_RESULTS")}
    share = Path(sys.prefix) / "share" / "jupyter"  # this environment's kernel is "python3"
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(share), os.environ.get("JUPYTER_PATH")]))
    done = subprocess.run([sys.executable, "-c", RUN_TWICE, str(notebook), str(staged)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    nb = nbformat.read(str(notebook), as_version=4)
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "a cell did not run"
    widgets = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "the chapter's explore() showed no widget in a live kernel"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
