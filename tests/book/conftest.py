"""The book built once per test session, from every chapter executed at its test-sized parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcore.book import build, find_root

ROOT = find_root(Path(__file__).parent)


@pytest.fixture(scope="session")
def built_book():
    """Execute every chapter with ``book/params/ci`` and build ``_build/html``; returns (html dir, runs)."""
    runs = build(ROOT, profile="ci")
    return ROOT / "_build" / "html", runs


def write_notebook(path: Path, cells: list[tuple[str, str, list[str]]]) -> Path:
    """A throwaway notebook: ``cells`` are (kind, source, tags) with kind 'code' or 'markdown'."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook()
    for kind, source, tags in cells:
        cell = new_code_cell(source) if kind == "code" else new_markdown_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def throwaway_book(folder: Path, notebooks: dict[str, list[tuple[str, str, list[str]]]]) -> Path:
    """A minimal book root (config, toc, intro) around the given notebooks."""
    (folder / "book").mkdir(parents=True, exist_ok=True)
    (folder / "_config.yml").write_text(
        "title: Throwaway\nonly_build_toc_files: true\nexecute:\n  execute_notebooks: 'off'\n")
    toc = "format: jb-book\nroot: book/intro\nchapters:\n" + "".join(f"  - file: book/{n}\n" for n in notebooks)
    (folder / "_toc.yml").write_text(toc)
    (folder / "book" / "intro.md").write_text("# Throwaway book\n\nA book built by a test.\n")
    for name, cells in notebooks.items():
        write_notebook(folder / "book" / f"{name}.ipynb", cells)
    return folder
