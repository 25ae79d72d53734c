"""A chapter run the way a reader runs it: JupyterLab in headless Chromium, a live kernel, a slider moved."""

from __future__ import annotations

import json
import os
import time

import psutil
import pytest

from lmcore.book import stage
from lmcore.lab import Lab

from .conftest import ROOT
from .sitecheck import browser_available, chromium

pytestmark = pytest.mark.slow

if not browser_available():
    if os.environ.get("CI"):
        raise RuntimeError("CI must run a chapter in JupyterLab in a browser: install Debian's chromium and "
                           "chromium-driver (.ci/run does)")
    pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver); "
                "the JupyterLab check is skipped on this machine", allow_module_level=True)

CHAPTER = "00-using-this-book.ipynb"
WIDGET_CELL = "explore(softmax_at_temperature"  # the chapter's first explore() call
SCREENSHOTS = ROOT / "_build" / "screenshots" / "lab"  # beside the rendered pages' screenshots

# The open notebook panel, through the application object JupyterLab exposes (expose_app_in_browser).
PANEL_JS = "const panel = window.jupyterapp.shell.currentWidget;"
KERNEL_IDLE_JS = """
if (!window.jupyterapp || !window.jupyterapp.shell) return false;  // the page is still loading
""" + PANEL_JS + """
const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
return !!(kernel && kernel.status === 'idle' && panel.content.widgets.length > 0);"""
RUN_UP_TO_JS = PANEL_JS + """
const done = arguments[arguments.length - 1];
const index = panel.content.widgets.findIndex(c => c.model.sharedModel.getSource().includes(arguments[0]));
if (index < 0) { done(-1); } else {
  panel.content.activeCellIndex = index;
  const commands = window.jupyterapp.commands;
  commands.execute('notebook:run-all-above').then(() => commands.execute('notebook:run-cell'))
    .then(() => done(index), err => done('failed: ' + err));
}"""
CELL_ERRORS_JS = """
return Array.from(document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"],'
  + ' .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')).map(e => e.innerText.slice(0, 300));"""


def wait_for(driver, condition, what: str, timeout: float = 90):
    """Poll ``condition(driver)`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def widget_state(driver):
    """(slider readout, figure source) of the interact widget's output, or None until both are there."""
    return driver.execute_script("""
const box = document.querySelector('.jp-OutputArea .widget-interact');
if (!box) return null;
const readout = box.querySelector('.widget-readout');
const img = box.querySelector('.widget-output img');
return readout && img && img.src ? [readout.innerText, img.src] : null;""")


def test_a_slider_moved_in_jupyterlab_redraws_the_figure(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    book = stage(ROOT, tmp_path / "book")  # a copy: the notebook JupyterLab saves is not the committed one
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    settings = tmp_path / "settings"
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))  # no question about news over the notebook
    with open(tmp_path / "server.log", "wb") as log:
        lab = Lab(book / "book", token="lmcore-test-token", log=log, settings=settings)
    server = psutil.Process(lab.process.pid)
    try:
        with chromium(width=1400, height=1800) as driver:
            driver.set_script_timeout(120)
            driver.get(lab.url.replace("/lab?", f"/lab/tree/{CHAPTER}?"))
            wait_for(driver, lambda d: d.execute_script(KERNEL_IDLE_JS), "the chapter's kernel to be idle")
            kernels = json.loads(lab.api("kernels"))
            assert len(kernels) == 1 and kernels[0]["name"] == "python3", kernels
            started = server.children(recursive=True)
            assert started, "the server started no kernel process"

            index = driver.execute_async_script(RUN_UP_TO_JS, WIDGET_CELL)
            assert isinstance(index, int) and index > 0, f"{CHAPTER} has no cell containing {WIDGET_CELL!r}"
            readout, figure = wait_for(driver, widget_state, "the explore() slider and its figure")
            assert not driver.execute_script(CELL_ERRORS_JS), driver.execute_script(CELL_ERRORS_JS)
            widget = driver.find_element(By.CSS_SELECTOR, ".jp-OutputArea .widget-interact")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", widget)
            driver.save_screenshot(str(SCREENSHOTS / "00-using-this-book.png"))

            handle = widget.find_element(By.CSS_SELECTOR, ".noUi-handle, .slider-handle, input[type=range]")
            handle.click()
            handle.send_keys(*[Keys.ARROW_RIGHT] * 10)
            moved = wait_for(driver, lambda d: (s := widget_state(d)) and s[0] != readout and s[1] != figure and s,
                             "the figure to change after the slider moved")
            assert float(moved[0]) > float(readout), (readout, moved[0])
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", widget)
            widget.screenshot(str(SCREENSHOTS / "00-using-this-book__widget.png"))
    finally:
        code = lab.stop()
    assert code == 0, f"JupyterLab exited with code {code}; its log is {tmp_path / 'server.log'}"
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind after the server shut down: {left}"
    assert (SCREENSHOTS / "00-using-this-book__widget.png").stat().st_size > 0
