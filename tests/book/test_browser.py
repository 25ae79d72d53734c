"""The rendered book as a reader sees it: every page opened in headless Chromium."""

from __future__ import annotations

import os

import pytest

from lmcore.book import build, render_html, toc_files

from .conftest import ROOT, throwaway_book
from .sitecheck import browser_available, check_site

pytestmark = pytest.mark.slow

if not browser_available():
    if os.environ.get("CI"):
        raise RuntimeError("CI must check the rendered book in a browser: install Debian's chromium and "
                           "chromium-driver (.ci/run does)")
    pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver); "
                "the rendered-book check is skipped on this machine", allow_module_level=True)


def test_every_page_renders_without_errors(built_book):
    html, _ = built_book
    pages = [f"{entry}.html" for entry in toc_files(ROOT)]
    screenshots = ROOT / "_build" / "screenshots"
    problems = check_site(html, pages, screenshots=screenshots)
    assert not problems, "\n".join(problems)
    assert sorted(p.name for p in screenshots.glob("*.png")) == sorted(p.replace("/", "__").replace(".html", ".png")
                                                                        for p in pages)


def test_check_catches_a_chapter_that_prints_a_traceback(tmp_path):
    """A throwaway chapter that catches an exception and prints its traceback must fail the check."""
    root = throwaway_book(tmp_path / "root", {
        "errors": [("markdown", "# Errors\n", []), ("code", "n = 1", ["parameters"]),
                   ("code", "import traceback\ntry:\n    raise ValueError('this chapter is broken')\n"
                            "except ValueError:\n    traceback.print_exc()", [])],
        "fine": [("markdown", "# Fine\n", []), ("code", "n = 2", ["parameters"]), ("code", "print(n)", [])],
    })
    build(root, log=lambda *_: None)
    html = root / "_build" / "html"
    problems = check_site(html, ["book/intro.html", "book/errors.html", "book/fine.html"])
    assert any(p.startswith("book/errors.html") and "this chapter is broken" in p for p in problems), problems
    assert not any(p.startswith("book/fine.html") for p in problems), problems


def test_check_catches_an_error_output(tmp_path):
    """An executed chapter holding an error output (rendered without papermill) must fail the check."""
    import nbformat

    root = throwaway_book(tmp_path / "root", {
        "errors": [("markdown", "# Errors\n", []), ("code", "n = 1", ["parameters"]), ("code", "1 / 0", [])],
    })
    path = root / "book" / "errors.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                                  traceback=["ZeroDivisionError: division by zero"])]
    nbformat.write(nb, str(path))
    render_html(root, root / "html")
    problems = check_site(root / "html", ["book/intro.html", "book/errors.html"])
    assert any(p.startswith("book/errors.html") and "division by zero" in p for p in problems), problems


def test_check_catches_a_missing_image(tmp_path):
    root = throwaway_book(tmp_path / "root", {
        "pictures": [("markdown", "# Pictures\n", []), ("code", "n = 1", ["parameters"]),
                     ("code", "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()", [])],
    })
    build(root, log=lambda *_: None)
    html = root / "_build" / "html"
    assert check_site(html, ["book/intro.html", "book/pictures.html"]) == []
    for image in (html / "_images").glob("*.png"):
        image.unlink()
    problems = check_site(html, ["book/intro.html", "book/pictures.html"])
    assert any("image did not load" in p for p in problems), problems
