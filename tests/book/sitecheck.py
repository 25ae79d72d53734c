"""Checking the rendered book as a reader sees it, in headless Chromium (Debian's chromium + chromedriver).

``check_site(html_dir, toc_pages)`` serves the folder on localhost, opens every page, and returns
a list of problems: error outputs or tracebacks on a page, images that did not load, and toc
chapters missing from the navigation. It saves a screenshot of each page.

``read_like_a_reader(html_dir, pages)`` opens every page with the browser cut off from the network
(every host name resolves to nothing, as on a machine with no connection) and lists, per page, what
a reader would trip over: math left as raw TeX, stray scalar output boxes, code wider than its
block, figures drawn smaller than half the text width. It saves full-page screenshots.
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
def chromium(width: int = 1280, height: int = 1600, offline: bool = False):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--window-size={width},{height}"):
        options.add_argument(flag)
    if offline:  # no host name resolves; the book is served from the IP literal 127.0.0.1, which needs none
        options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
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


# --- reading a page as a reader does (issue 17) ---------------------------------------------------
# Waits for MathJax (if the page loads it) to typeset, then returns what the page shows.
# The page's MathJax script can still be on its way when the page reports it has loaded (a busy
# machine): wait for it to start, up to 20 s, before calling it absent.
WAIT_FOR_MATH_JS = """
const done = arguments[arguments.length - 1];
const loads = !!document.querySelector('script[src*="mathjax"], script[src*="MathJax"]');
const start = Date.now();
(function wait() {
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) {
    mj.startup.promise.then(() => done('typeset'), (e) => done('failed: ' + e));
  } else if (!loads || Date.now() - start > 20000) {
    done(mj ? 'not started' : 'absent');
  } else {
    setTimeout(wait, 50);
  }
})();
"""
READ_PAGE_JS = """
const article = document.querySelector('article.bd-article') || document.body;
const style = getComputedStyle(article);
const textWidth = article.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
const skip = 'pre, code, script, style, mjx-container, mjx-assistive-mml, .MathJax, textarea';
const raw = [];
const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const el = node.parentElement;
  if (!el || el.closest(skip) || !visible(el)) continue;
  const m = node.nodeValue.match(/\\\\\\(|\\\\\\)|\\\\\\[|\\\\\\]|\\$\\$/);
  if (m) raw.push(node.nodeValue.trim().slice(0, 80));
}
// a number, a bool, None, a NumPy scalar or a 0-d tensor: what a cell ending in record(...) printed
const scalar = new RegExp(String.raw`^(?:[-+]?(?:\\d[\\d_]*\\.?\\d*|\\.\\d+)(?:e[-+]?\\d+)?|[-+]?(?:nan|inf)` +
  String.raw`|True|False|None|(?:np\\.)?(?:float|int|bool)\\d*\\(.{0,30}\\)|tensor\\(.{0,40}\\))$`);
const scalars = [];
for (const pre of article.querySelectorAll('.cell_output .output.text_plain pre')) {
  const t = pre.innerText.trim();
  if (t.length <= 50 && scalar.test(t)) scalars.push(t);
}
const wide = [];
for (const pre of article.querySelectorAll('pre')) {
  // code a reader reads: cell sources and code blocks in the prose (outputs print what they print)
  if (pre.closest('.cell_output') || !visible(pre) || pre.scrollWidth <= pre.clientWidth + 1) continue;
  const where = pre.closest('.cell_input') ? 'code' : 'block';
  const line = pre.innerText.split('\\n').reduce((a, b) => b.length > a.length ? b : a, '');
  wide.push(where + ' ' + pre.scrollWidth + 'px in ' + pre.clientWidth + 'px: ' + line.trim().slice(0, 60));
}
const small = [];
for (const img of article.querySelectorAll('.cell_output img, figure img, img.figure')) {
  if (!visible(img)) continue;
  const w = img.getBoundingClientRect().width;
  if (w < 0.5 * textWidth) small.push((img.getAttribute('src') || '').split('/').pop() + ' ' + Math.round(w) +
                                      'px of ' + Math.round(textWidth) + 'px');
}
return {math: document.querySelectorAll('mjx-container').length,
        mathSources: document.querySelectorAll('.math, span.math, div.math').length,
        raw: raw, scalars: scalars, wide: wide, small: small,
        external: performance.getEntriesByType('resource').map(e => e.name)
                    .filter(n => !n.startsWith(location.origin) && !n.startsWith('data:')),
        height: document.documentElement.scrollHeight, width: document.documentElement.clientWidth};
"""
# A laptop screen at which the theme's text column reaches its full width: a code block then holds
# 88 columns, the widest code line the chapters may have (tests/book/test_sources.py).
READING_WIDTH = 1440
SCREENSHOT_TILE = 4000  # px of page per full-page screenshot tile


def screenshot_name(page: str) -> str:
    """``book/02-transformer.html`` -> ``book__02-transformer``."""
    return page.replace("/", "__").removesuffix(".html")


def save_full_page(driver, folder: Path, page: str, width: int, height: int) -> list[Path]:
    """The top of the page as ``NAME.png``, the whole page in tiles ``NAME-01.png``, ``NAME-02.png``..."""
    import base64

    name = screenshot_name(page)
    for old in folder.glob(f"{name}-[0-9][0-9].png"):  # tiles of an earlier, longer rendering
        old.unlink()
    driver.save_screenshot(str(folder / f"{name}.png"))
    saved = [folder / f"{name}.png"]
    tops = list(range(0, height, SCREENSHOT_TILE))
    if len(tops) > 1 and height - tops[-1] < SCREENSHOT_TILE // 4:
        tops.pop()  # a sliver at the bottom joins the tile above it
    for n, top in enumerate(tops, 1):
        bottom = height if n == len(tops) else top + SCREENSHOT_TILE
        clip = {"x": 0, "y": top, "width": width, "height": bottom - top, "scale": 1}
        shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                      {"format": "png", "clip": clip, "captureBeyondViewport": True})
        path = folder / f"{name}-{n:02d}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        saved.append(path)
    return saved


def read_like_a_reader(html_dir: Path, pages: list[str], screenshots: Path | None = None) -> dict[str, dict]:
    """Open ``pages`` offline and return, per page, what a reader sees: ``math`` (typeset formulas),
    ``math_status``, and lists ``raw`` (raw TeX in visible text), ``scalars`` (stray scalar outputs),
    ``wide`` (code blocks that scroll sideways), ``small`` (figures under half the text width),
    ``external`` (requests that left the machine)."""
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
    seen = {}
    with serve(html_dir) as base, chromium(width=READING_WIDTH, height=900, offline=True) as driver:
        driver.set_script_timeout(60)
        for page in pages:
            if not (html_dir / page).is_file():
                raise FileNotFoundError(f"{page} was not built in {html_dir}")
            driver.get(f"{base}/{page}")
            status = driver.execute_async_script(WAIT_FOR_MATH_JS)
            driver.execute_script("return document.fonts ? document.fonts.ready : null")
            found = driver.execute_script(READ_PAGE_JS)
            found["math_status"] = status
            if screenshots is not None:
                save_full_page(driver, screenshots, page, found["width"], found["height"])
            seen[page] = found
    return seen


def reader_problems(found: dict) -> list[str]:
    """One line per problem in what ``read_like_a_reader`` saw on one page."""
    problems = [f"raw TeX in the text: {t!r}" for t in found["raw"]]
    if found["mathSources"] and not found["math"]:
        problems.append(f"{found['mathSources']} formulas but none typeset (MathJax: {found['math_status']})")
    problems += [f"requested from the network: {u}" for u in found["external"]]
    problems += [f"stray scalar output box: {t!r}" for t in found["scalars"]]
    problems += [f"scrolls sideways: {w}" for w in found["wide"]]
    problems += [f"figure under half the text width: {s}" for s in found["small"]]
    return problems
