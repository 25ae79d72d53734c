"""The rendered book as a reader sees it: every page opened in headless Chromium."""

from __future__ import annotations

import os

import pytest

from lmcore.book import build, render_html, toc_files

from .conftest import ROOT, throwaway_book
from .sitecheck import browser_available, check_site, read_like_a_reader, reader_problems, screenshot_name

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
    assert {p.name for p in screenshots.glob("*.png")} >= {f"{screenshot_name(p)}.png" for p in pages}


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


# --- the book as a reader meets it, offline (issue 17) ---------------------------------------------
PAGES = [f"{entry}.html" for entry in toc_files(ROOT)]
CHAPTER_PAGES = [p for p in PAGES if p.endswith(".html") and (ROOT / p.replace(".html", ".ipynb")).is_file()]


@pytest.fixture(scope="module")
def offline_reading(built_book):
    """Every page of the built book read with the network cut off; screenshots in _build/screenshots."""
    html, _ = built_book
    return read_like_a_reader(html, PAGES, screenshots=ROOT / "_build" / "screenshots")


def test_math_is_typeset_offline_in_chapter_2(offline_reading):
    found = offline_reading["book/02-transformer.html"]
    assert found["math_status"] == "typeset", f"MathJax did not run offline: {found['math_status']}"
    assert found["math"] >= 10 and found["math"] >= found["mathSources"], \
        f"chapter 2: {found['math']} typeset formulas of {found['mathSources']}"
    assert not found["raw"], f"chapter 2 shows raw TeX: {found['raw'][:5]}"
    assert not found["external"], f"chapter 2 asked the network for {found['external']}"


@pytest.mark.parametrize("page", PAGES)
def test_no_page_shows_raw_tex_or_needs_the_network(offline_reading, page):
    found = offline_reading[page]
    offline = ("raw TeX", "requested from", "formulas but none")
    problems = [p for p in reader_problems(found) if p.startswith(offline)]
    assert not problems, f"{page}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", CHAPTER_PAGES)
def test_chapter_reads_cleanly(offline_reading, page):
    problems = reader_problems(offline_reading[page])
    assert not problems, f"{page}:\n" + "\n".join(problems)


def test_every_page_has_full_page_screenshots(offline_reading):
    folder = ROOT / "_build" / "screenshots"
    for page in PAGES:
        tiles = sorted(folder.glob(f"{screenshot_name(page)}-[0-9][0-9].png"))
        assert tiles and all(t.stat().st_size > 1000 for t in tiles), f"no full-page screenshot of {page}"


def test_math_is_served_by_the_book_itself(built_book):
    """Every script a page loads comes from the book's own folder: no CDN, so it reads offline."""
    import re

    html, _ = built_book
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax is not copied into _static"
    for page in PAGES:
        text = (html / page).read_text(encoding="utf-8")
        scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", text)
        remote = [s for s in scripts if re.match(r"(https?:)?//", s)]
        assert not remote, f"{page} loads scripts from the network: {remote}"
        if page == "book/02-transformer.html":
            assert any(s.endswith("_static/mathjax/tex-chtml.js") for s in scripts), scripts


def test_reader_checks_catch_what_they_should(tmp_path):
    """A throwaway chapter with a stray scalar, a wide code line, a small figure and raw TeX fails each."""
    root = throwaway_book(tmp_path / "root", {
        "messy": [("markdown", "# Messy\n\nInline $y = W x$ and\n\n$$E = m c^2$$\n", []),
                  ("code", "n = 1", ["parameters"]),
                  ("code", "1 + 1", []),
                  ("code", "x = " + " + ".join(["n"] * 70), []),
                  ("code", "import matplotlib.pyplot as plt\nplt.figure(figsize=(2, 1.5), dpi=100)\n"
                           "plt.plot([0, 1])\nplt.show()", [])],
    })
    (root / "_config.yml").write_text((root / "_config.yml").read_text() +
                                      "sphinx:\n  extra_extensions: [sphinx-mathjax-offline]\n"
                                      "parse:\n  myst_enable_extensions: [dollarmath]\n")
    build(root, log=lambda *_: None)
    html = root / "_build" / "html"
    page = html / "book" / "messy.html"
    page.write_text(page.read_text().replace("<h1>Messy<a", '<p>left raw \\(y\\)</p><h1>Messy<a', 1))
    found = read_like_a_reader(html, ["book/messy.html"])["book/messy.html"]
    problems = reader_problems(found)
    assert found["math"] >= 2 and found["math_status"] == "typeset", found
    assert any(p.startswith("stray scalar output box: '2'") for p in problems), problems
    assert any(p.startswith("scrolls sideways: code") for p in problems), problems
    assert any(p.startswith("figure under half the text width") for p in problems), problems
    assert any(p.startswith("raw TeX in the text") and "left raw" in p for p in problems), problems


def test_the_offline_browser_reaches_no_host(tmp_path):
    from .sitecheck import chromium, serve

    (tmp_path / "index.html").write_text("<p>local</p>")
    with serve(tmp_path) as base, chromium(offline=True) as driver:
        driver.set_script_timeout(30)
        driver.get(f"{base}/index.html")
        outcome = driver.execute_async_script(
            "const done = arguments[0]; fetch('https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js')"
            ".then(() => done('reached'), e => done('blocked: ' + e));")
    assert outcome.startswith("blocked"), outcome
