"""Checking the rendered book as a reader sees it, in headless Chromium (Debian's chromium + chromedriver).

``check_site(html_dir, toc_pages)`` serves the folder on localhost, opens every page, and returns
a list of problems: error outputs or tracebacks on a page, images that did not load, and toc
chapters missing from the navigation. It saves a screenshot of each page.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# Outputs that mean a cell failed: an error output, or a traceback printed to the page.
ERROR_SELECTORS = ".output.error, .output.traceback, div.output_error, div.cell_output .traceback, .ansi-red-fg"
FIND_PROBLEMS_JS = """
const problems = [];
for (const el of document.querySelectorAll(arguments[0])) {
  problems.push('error output: ' + el.innerText.slice(0, 200));
}
for (const pre of document.querySelectorAll('div.cell_output pre, div.output pre')) {
  const t = pre.innerText;
  if (/Traceback \\(most recent call last\\)|^\\w+Error: /m.test(t)) problems.push('traceback: ' + t.slice(0, 200));
}
for (const img of document.images) {
  if (!img.complete || img.naturalWidth === 0) problems.push('image did not load: ' + img.getAttribute('src'));
}
return problems;
"""
NAV_LINKS_JS = """
return Array.from(document.querySelectorAll('nav.bd-docs-nav a, .bd-sidebar-primary a'))
  .map(a => a.getAttribute('href'));
"""


def browser_available() -> bool:
    return bool(CHROMIUM and CHROMEDRIVER)


@contextmanager
def serve(folder: Path):
    """Serve ``folder`` on a free localhost port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def chromium(width: int = 1280, height: int = 1600):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def check_site(html_dir: Path, pages: list[str], screenshots: Path | None = None) -> list[str]:
    """Open ``pages`` (paths relative to ``html_dir``, e.g. ``book/01-bpe.html``) and list every problem."""
    problems = []
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
    with serve(html_dir) as base, chromium() as driver:
        for page in pages:
            if not (html_dir / page).is_file():
                problems.append(f"{page}: page was not built")
                continue
            driver.get(f"{base}/{page}")
            driver.execute_script("return document.fonts ? document.fonts.ready : null")
            for found in driver.execute_script(FIND_PROBLEMS_JS, ERROR_SELECTORS):
                problems.append(f"{page}: {found}")
            links = {Path(h.split("#")[0]).name for h in driver.execute_script(NAV_LINKS_JS) if h}
            missing = [p for p in pages if Path(p).name not in links and Path(p).name != "intro.html"
                       and Path(p).name != Path(page).name]
            if missing:
                problems.append(f"{page}: navigation lacks {missing}")
            if screenshots is not None:
                driver.save_screenshot(str(screenshots / (page.replace("/", "__").replace(".html", ".png"))))
    return problems
