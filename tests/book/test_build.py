"""The build pipeline: every chapter executed at its test-sized parameters, then the book rendered."""

from __future__ import annotations

import json

import pytest

from lmcore.book import ChapterError, build, chapters, toc_files

from .conftest import ROOT, throwaway_book

pytestmark = pytest.mark.slow


def test_every_chapter_executes_and_renders(built_book):
    html, runs = built_book
    assert (html / "index.html").is_file()
    for entry in toc_files(ROOT):
        assert (html / f"{entry}.html").is_file(), f"{entry} was not rendered"
    assert [r.chapter for r in runs] == [nb.stem for nb in chapters(ROOT)]
    timings = json.loads((ROOT / "_build" / "timings.json").read_text())
    assert timings["profile"] == "ci" and set(timings["chapters"]) == {r.chapter for r in runs}
    # the executed notebooks live in the git-ignored stage; the sources stay output-free
    staged = json.loads((ROOT / "_stage" / "book" / "00-using-this-book.ipynb").read_text())
    assert any(c.get("outputs") for c in staged["cells"] if c["cell_type"] == "code")
    source = json.loads((ROOT / "book" / "00-using-this-book.ipynb").read_text())
    assert not any(c.get("outputs") for c in source["cells"] if c["cell_type"] == "code")


def test_chapter_zero_records_its_results(built_book):
    _, runs = built_book
    results = {r.chapter: r.results for r in runs}["00-using-this-book"]
    assert results["final_loss"] < results["uniform_loss"], "the toy model learned nothing"
    assert results["grid_runs"] == 2
    page = (ROOT / "_build" / "html" / "book" / "00-using-this-book.html").read_text()
    assert f"{results['final_loss']:.4f}" in page, "the glued number does not appear in the prose"


def test_launch_buttons_open_the_chapter_from_the_repository_in_config(built_book):
    from lmcore.book import repository

    html, _ = built_book
    url, branch = repository(ROOT)
    slug = url.removeprefix("https://github.com/")
    for notebook in chapters(ROOT):
        page = (html / "book" / f"{notebook.stem}.html").read_text()
        path = f"book/{notebook.name}"
        assert f"https://colab.research.google.com/github/{slug}/blob/{branch}/{path}" in page, notebook.name
        assert f"https://mybinder.org/v2/gh/{slug}/{branch}?urlpath=lab/tree/{path}" in page, notebook.name


def test_failing_chapter_names_chapter_and_cell_and_keeps_the_old_book(tmp_path):
    root = throwaway_book(tmp_path / "book-root", {
        "fine": [("markdown", "# Fine\n", []), ("code", "n = 1", ["parameters"]), ("code", "print(n)", [])],
        "broken": [("markdown", "# Broken\n", []), ("code", "n = 1", ["parameters"]),
                   ("code", "print('ok')", []), ("code", "1 / 0", [])],
    })
    output = tmp_path / "published"
    output.mkdir()
    (output / "index.html").write_text("the previous book")
    with pytest.raises(ChapterError, match=r"broken\.ipynb failed in cell 4 .*'1 / 0'.*ZeroDivisionError"):
        build(root, output=output, log=lambda *_: None)
    assert (output / "index.html").read_text() == "the previous book", "a failed build must not publish"


def test_sphinx_warning_fails_the_build(tmp_path):
    root = throwaway_book(tmp_path / "book-root", {
        "warns": [("markdown", "# Warns\n\nSee {ref}`no-such-label`.\n", []), ("code", "n = 1", ["parameters"])],
    })
    with pytest.raises(RuntimeError, match="jupyter-book build failed"):
        build(root, output=tmp_path / "html", log=lambda *_: None)
    assert not (tmp_path / "html").exists()


def test_failing_cell_is_numbered_as_in_the_source_when_parameters_are_injected(tmp_path):
    from lmcore.book import execute_notebook

    from .conftest import write_notebook

    nb = write_notebook(tmp_path / "broken.ipynb", [
        ("markdown", "# Broken\n", []), ("code", "n = 1", ["parameters"]), ("code", "print(n)", []),
        ("code", "1 / n", [])])
    with pytest.raises(ChapterError, match=r"failed in cell 4 \(counting from 1.*'1 / n'.*ZeroDivisionError"):
        execute_notebook(nb, tmp_path / "out.ipynb", {"n": 0})  # papermill injects a cell after cell 2


def test_only_refuses_unknown_names_and_builds_a_book_of_the_chapters_given(tmp_path):
    root = throwaway_book(tmp_path / "book-root", {
        "fine": [("markdown", "# Fine\n", []), ("code", "n = 1", ["parameters"]), ("code", "print(n)", [])],
        "broken": [("markdown", "# Broken\n", []), ("code", "n = 1", ["parameters"]), ("code", "1 / 0", [])],
    })
    with pytest.raises(ValueError, match=r"--only 'fien' is not a chapter.*did you mean 'fine'"):
        build(root, output=tmp_path / "html", only=["fien"], log=lambda *_: None)
    lines = []
    runs = build(root, output=tmp_path / "html", only=["fine"], log=lines.append)
    assert [r.chapter for r in runs] == ["fine"]
    assert any("broken" in line and "placeholder" in line for line in lines)
    page = (tmp_path / "html" / "book" / "broken.html").read_text()
    assert "not executed in this build" in page
    assert "ZeroDivisionError" not in page


@pytest.mark.parametrize("cites", [True, False], ids=["a-chapter-cites", "nothing-cites-yet"])
def test_the_book_config_builds_citations_and_the_references_page(tmp_path, cites):
    """The book's own _config.yml, references.bib and references page build with warnings as errors,
    whether or not a chapter cites yet; a citation reads as author and year and links to the list."""
    import shutil

    text = "Attention as in {cite:t}`vaswani2017attention`, tiled {cite:p}`dao2023flashattention2`.\n"
    root = throwaway_book(tmp_path / "root", {
        "cites": [("markdown", "# Cites\n\n" + (text if cites else "No citation yet.\n"), []),
                  ("code", "n = 1", ["parameters"])],
    })
    shutil.copy(ROOT / "_config.yml", root / "_config.yml")
    for name in ("references.bib", "references.md"):
        shutil.copy(ROOT / "book" / name, root / "book" / name)
    with open(root / "_toc.yml", "a") as f:
        f.write("  - file: book/references\n")
    build(root, output=tmp_path / "html", log=lambda *_: None)
    page = (tmp_path / "html" / "book" / "cites.html").read_text()
    references = (tmp_path / "html" / "book" / "references.html").read_text()
    if cites:
        assert "Vaswani <em>et al.</em>" in page and "2017" in page and 'href="references.html#' in page
        assert "Attention Is All You Need" in references and "FlashAttention-2: Faster" in references
    else:
        assert "Attention Is All You Need" not in references  # only what is cited is listed
    assert (tmp_path / "html" / "_static" / "mathjax" / "tex-chtml.js").is_file()
