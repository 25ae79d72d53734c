"""Guards on the committed sources: output-free chapters, one parameters cell, a valid toc, set-up in sync."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import lmcore
from lmcore.book import chapters, resolve_document, toc_files
from lmcore.experiments import coerce, notebook_parameters

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
TOC_NOTEBOOKS = chapters(ROOT)


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def code_of(path: Path) -> str:
    """The notebook's Python, with IPython magics and shell escapes replaced by `pass`."""
    lines = []
    for cell in cells(path):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            for line in source.splitlines():  # a magic becomes `pass`, keeping the block structure
                stripped = line.lstrip()
                lines.append(line[: len(line) - len(stripped)] + "pass" if stripped.startswith(("%", "!")) else line)
    return "\n".join(lines)


def test_book_has_chapters():
    assert NOTEBOOKS, "book/ holds no chapter notebooks"


@pytest.mark.parametrize("entry", toc_files(ROOT))
def test_every_toc_entry_exists(entry):
    assert resolve_document(ROOT, entry).is_file()


def test_every_chapter_is_in_the_toc():
    assert set(NOTEBOOKS) == set(TOC_NOTEBOOKS), "a notebook in book/ is missing from _toc.yml (or the reverse)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_output_free_with_one_parameters_cell(path):
    nb = cells(path)
    with_outputs = [i for i, c in enumerate(nb) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not with_outputs, f"{path.name}: cells {with_outputs} carry outputs; commit notebooks output-free"
    tags = [c.get("metadata", {}).get("tags", []) for c in nb]
    assert sum("parameters" in t for t in tags) == 1, f"{path.name}: want exactly one cell tagged 'parameters'"
    assert not any("injected-parameters" in t for t in tags), f"{path.name}: holds a papermill injected cell"
    meta = json.loads(path.read_text())["metadata"]
    assert "papermill" not in meta, f"{path.name}: papermill metadata left in the committed notebook"
    assert all("papermill" not in c.get("metadata", {}) for c in nb), f"{path.name}: papermill cell metadata"
    ids = [c.get("id") for c in nb]  # nbformat 4.5 requires them; tools will stop adding them silently
    assert all(ids) and len(set(ids)) == len(ids), f"{path.name}: every cell needs its own id"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_parameters_are_literals_and_ci_values_match(path):
    defaults = notebook_parameters(path)
    assert defaults, f"{path.name}: the parameters cell defines nothing"
    ci = ROOT / "book" / "params" / "ci" / f"{path.stem}.yaml"
    if ci.exists():
        values = yaml.safe_load(ci.read_text()) or {}
        unknown = set(values) - set(defaults)
        assert not unknown, f"{ci.name} sets parameters the chapter does not have: {sorted(unknown)}"
        for name, value in values.items():
            coerce(name, value, defaults[name], defaults)  # raises on a type mismatch


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_has_colab_cell_summary_and_exercises(path):
    nb = cells(path)
    colab = [c for c in nb if "google.colab" in "".join(c["source"])]
    assert colab and "remove-cell" in colab[0].get("metadata", {}).get("tags", []), \
        f"{path.name}: needs a Colab install cell tagged remove-cell"
    headings = [line for c in nb if c["cell_type"] == "markdown" for line in "".join(c["source"]).splitlines()]
    assert "## Summary" in headings and "## Exercises" in headings, f"{path.name}: end with Summary and Exercises"
    assert headings[0].startswith("# "), f"{path.name}: the first cell must be the chapter's '# ' title"


def lmcore_public_names() -> set[str]:
    """Names of the functions and classes defined in lmcore's modules."""
    names = set()
    for info in pkgutil.walk_packages(lmcore.__path__, "lmcore."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # a module needing an optional dependency is checked by its own tests
            continue
        for name, obj in vars(module).items():
            if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == info.name:
                names.add(name)
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_imports_lmcore_and_redefines_nothing_silently(path):
    tree = ast.parse(code_of(path))
    imports_lmcore = False
    referenced, defined = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmcore"):
            imports_lmcore = True
            referenced |= {a.name for a in node.names}
        elif isinstance(node, ast.Import) and any(a.name.startswith("lmcore") for a in node.names):
            imports_lmcore = True
        elif isinstance(node, ast.Attribute):
            referenced.add(node.attr)  # lmcore.nn.softmax-style references
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined[node.name] = node.lineno
    assert imports_lmcore, f"{path.name} does not import lmcore"
    shadowed = {n for n in defined if n in lmcore_public_names() and n not in referenced}
    assert not shadowed, (f"{path.name} defines {sorted(shadowed)}, which lmcore also defines, without ever "
                          "using lmcore's version: import it, or check the chapter's version against it")


def test_environment_yml_installs_what_the_makefile_installs():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r"^EXTRAS\s*:?=\s*(\S+)", makefile, re.M).group(1)
    constraints = re.search(r"^CONSTRAINTS\s*:?=\s*(\S+)", makefile, re.M).group(1)
    deps = env["dependencies"]
    assert "pip" in deps
    python = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert python == ["python=3.11"], python
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert f"-c {constraints}" in pip
    assert f"-e .[{extras}]" in pip
    assert re.search(rf'pip install .*-c \$\(CONSTRAINTS\) -e "\.\[\$\(EXTRAS\)\]"', makefile)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in extras.split(","):
        assert re.search(rf"^{extra} = \[", pyproject, re.M), f"extra {extra!r} is not defined in pyproject.toml"


def test_constraints_pin_the_tested_toolchain():
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {k.lower(): v for k, v in pins.items()}
    assert pins["jupyter-book"] == "1.0.4.post1"
    assert pins["torch"] == "2.13.0"
    assert pins["sphinx"].startswith("7.")
    assert "papermill" in pins and "nbconvert" in pins
    assert "triton" not in pins, "torch brings its own triton on GPU machines; do not pin it"


def test_readme_and_ci_run_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make book" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_code_does_not_read_the_build_environment(path):
    """A reader's kernel has none of what the build sets: chapters ask lmcore (is_static, chapter_notebook)."""
    code = code_of(path)
    for name in ("LMCORE_STATIC", "LMCORE_SOURCE", "LMCORE_RESULTS", "papermill"):
        assert name not in code, f"{path.name}: a code cell reads {name}; use lmcore.utils instead"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_installs_from_the_repository_in_config(path):
    from lmcore.book import colab_cell

    cell = next(c for c in cells(path) if "google.colab" in "".join(c["source"]))
    assert "".join(cell["source"]) == colab_cell(ROOT), \
        f"{path.name}: its Colab cell is not the one _config.yml gives; run `python -m lmcore.book colab`"


def test_the_repository_is_the_one_in_config():
    from lmcore.book import repository

    url, _ = repository(ROOT)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^Repository = "{re.escape(url)}"$', pyproject, re.M), \
        f"pyproject.toml's [project.urls] Repository must be _config.yml's repository.url {url}"
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["launch_buttons"]["colab_url"] and config["launch_buttons"]["binderhub_url"]


# --- the reader standard for code cells (issue 17) ---------------------------------------------------------------
MAX_CODE_COLUMNS = 88  # the widest code line a page shows without scrolling sideways
MAX_SHOWN_LINES = 25  # longer cells hide their plumbing (hide-input) or move it into lmcore
HIDDEN_TAGS = {"hide-input", "hide-cell", "remove-input", "remove-cell"}


def is_colab_cell(cell: dict) -> bool:
    """The install cell `python -m lmcore.book colab` writes (removed from the rendered book)."""
    return "google.colab" in "".join(cell["source"]) and "remove-cell" in cell.get("metadata", {}).get("tags", [])


def wide_code_lines(path: Path, limit: int = MAX_CODE_COLUMNS) -> list[str]:
    """'cell N (id X), line M: K characters' for every code line longer than ``limit``."""
    found = []
    for n, cell in enumerate(cells(path), 1):
        if cell["cell_type"] != "code" or is_colab_cell(cell):
            continue
        for m, line in enumerate("".join(cell["source"]).splitlines(), 1):
            if len(line) > limit:
                found.append(f"cell {n} (id {cell.get('id')}), line {m}: {len(line)} characters: "
                             f"{line.strip()[:60]!r}")
    return found


def long_shown_cells(path: Path, limit: int = MAX_SHOWN_LINES) -> list[str]:
    """'cell N (id X): K lines starting ...' for every shown code cell longer than ``limit`` lines."""
    found = []
    for n, cell in enumerate(cells(path), 1):
        tags = set(cell.get("metadata", {}).get("tags", []))
        lines = "".join(cell["source"]).splitlines()
        if cell["cell_type"] == "code" and not tags & HIDDEN_TAGS and len(lines) > limit:
            found.append(f"cell {n} (id {cell.get('id')}): {len(lines)} lines, "
                         f"starting {lines[0].strip()[:60]!r}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_lines_fit_the_page(path):
    found = wide_code_lines(path)
    assert not found, (f"{path.name}: code lines over {MAX_CODE_COLUMNS} characters scroll sideways on the "
                       "page; wrap them:\n" + "\n".join(found))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_shown_code_cells_are_short(path):
    found = long_shown_cells(path)
    assert not found, (f"{path.name}: shown code cells over {MAX_SHOWN_LINES} lines; move the plumbing into "
                       "lmcore or tag the cell hide-input:\n" + "\n".join(found))


def test_code_cell_checks_find_what_they_should(tmp_path):
    from .conftest import write_notebook

    nb = write_notebook(tmp_path / "x.ipynb", [
        ("markdown", "# X\n", []),
        ("code", "n = 1\n" + "y = " + "1 + " * 30 + "1", ["parameters"]),
        ("code", "\n".join(f"a{i} = {i}" for i in range(30)), []),
        ("code", "\n".join(f"b{i} = {i}" for i in range(30)), ["hide-input"]),
        ("code", "import sys\nif 'google.colab' in sys.modules:  # " + "x" * 100, ["remove-cell"]),
    ])
    wide = wide_code_lines(nb)
    assert len(wide) == 1 and wide[0].startswith("cell 2 (id "), wide
    assert ", line 2: 125 characters" in wide[0], wide
    long = long_shown_cells(nb)
    assert len(long) == 1 and long[0].startswith("cell 3 (id ") and "30 lines" in long[0], long
