"""notebooks/01-tour.ipynb runs top to bottom in JupyterLab on the `deepscope`
kernel, driven by a real browser: headless Debian chromium (/usr/bin/chromium)
through Playwright's Python package (its own browser downloads are never used).

JupyterLab (from the project venv) serves a temp copy of the notebook on a
free port with a token; the test opens it, picks the `deepscope` kernel if
JupyterLab asks, runs Run > Run All Cells, waits until every code cell has an
execution count and the kernel is idle, then checks that at least one chart
rendered as SVG and that no cell wrote an error or to stderr. It saves a
screenshot to docs/screenshots/tour.png.

Environment: DEEPSCOPE_CHROMIUM (browser binary, default /usr/bin/chromium),
DEEPSCOPE_BROWSER_TIMEOUT (seconds for running all cells, default 1800).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOUR = os.path.join(ROOT, "notebooks", "01-tour.ipynb")
SCREENSHOT = os.path.join(ROOT, "docs", "screenshots", "tour.png")
CHROMIUM = os.environ.get("DEEPSCOPE_CHROMIUM", "/usr/bin/chromium")
RUN_TIMEOUT = float(os.environ.get("DEEPSCOPE_BROWSER_TIMEOUT", "1800"))
KERNEL_NAME = "deepscope"
KERNEL_DISPLAY_NAME = "Rust (DeepScope)"

# a chart: inline <svg> (text/html outputs) or an SVG image (image/svg+xml outputs)
SVG_OUTPUT = '.jp-OutputArea-output svg, .jp-OutputArea-output img[src^="data:image/svg+xml"]'
# stderr streams and errors (tracebacks) both render with the stderr mime type
STDERR_OUTPUT = '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]'

# JupyterLab user settings for the test: no news / update toast over the
# notebook, and every cell attached to the DOM (the default windowing leaves
# cells out of view out of the page, so their prompts could not be read).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server in a temp folder, stopped (with its kernels) by close()."""

    def __init__(self, root, home):
        self.root = str(root)
        self.port = free_port()
        self.token = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        settings = os.path.join(home, "lab-settings")
        for name, value in LAB_SETTINGS.items():
            path = os.path.join(settings, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(value, f)
        env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=settings,
                   JUPYTERLAB_WORKSPACES_DIR=os.path.join(home, "lab-workspaces"))
        self.log_path = os.path.join(home, "jupyterlab.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}"]
            + (["--allow-root"] if os.geteuid() == 0 else []),
            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"JupyterLab exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with self.api("GET", "/api/status", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"JupyterLab did not start within 120 s:\n{self.log_tail()}")
                time.sleep(0.5)

    def api(self, method, path, timeout=10):
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None,
                                     headers={"Authorization": f"token {self.token}"})
        return urllib.request.urlopen(req, timeout=timeout)

    def log_tail(self, n=60):
        self.log.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def close(self):
        if self.proc.poll() is None:
            try:  # shuts down the kernels, then the server
                self.api("POST", "/api/shutdown").close()
                self.proc.wait(30)
            except Exception:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.log.close()


def menu(page, title, command):
    """Clicks a main-menu entry by its command id (e.g. "Run", "runmenu:run-all")."""
    page.locator(".lm-MenuBar-item", has_text=title).first.click()
    page.locator(f'.lm-Menu-item[data-command="{command}"]').first.click()


def save(page, timeout=30):
    """File > Save Notebook; waits until the tab is no longer dirty. True when saved."""
    menu(page, "File", "docmanager:save")
    dirty = page.locator(".jp-NotebookPanel .jp-mod-dirty, .lm-TabBar-tab.jp-mod-dirty")
    deadline = time.monotonic() + timeout
    while dirty.count() and time.monotonic() < deadline:
        time.sleep(0.5)
    return dirty.count() == 0


def run_all_cells(lab, name, kernel_display_name, screenshot, timeout=RUN_TIMEOUT, chromium=CHROMIUM):
    """Opens `name` in JupyterLab, runs all cells, checks the outputs, saves a screenshot.

    Returns the notebook as saved by JupyterLab after the run (nbformat JSON).
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}")
            panel = page.locator(".jp-NotebookPanel").first
            panel.wait_for(state="visible", timeout=120_000)
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(state="visible")

            # JupyterLab asks for a kernel when the notebook names none it knows
            dialog = page.locator(".jp-Dialog")
            try:
                dialog.wait_for(state="visible", timeout=5_000)
            except Exception:
                pass
            else:
                select = dialog.locator("select")
                if select.count():
                    select.first.select_option(label=kernel_display_name)
                dialog.locator("button.jp-mod-accept").click()
                dialog.wait_for(state="hidden")

            # more room for the notebook: hide the file browser (View > Show Left Sidebar)
            if page.locator("#jp-left-stack").is_visible():
                page.keyboard.press("Control+b")

            kernel_name = page.locator(".jp-NotebookPanel .jp-Toolbar-kernelName").first
            kernel_name.wait_for(state="visible")
            assert kernel_display_name in kernel_name.inner_text(), (
                f"the notebook runs on {kernel_name.inner_text()!r}, not {kernel_display_name!r}")
            # the kernel has started (evcxr's first cell comes later, with the run)
            page.locator("#jp-main-statusbar").get_by_text("Idle").wait_for(timeout=300_000)

            def prompts():
                return page.locator(".jp-NotebookPanel .jp-CodeCell .jp-InputArea-prompt").all_inner_texts()

            menu(page, "Run", "runmenu:run-all")  # Run > Run All Cells

            # Run All queues every code cell at once (prompt [*]); done when no
            # prompt shows [*] and the kernel is idle (after an error the kernel
            # aborts the queue and the prompts of the aborted cells go back to [ ])
            deadline = time.monotonic() + timeout
            settled = 0
            while settled < 3:
                if time.monotonic() > deadline:
                    page.screenshot(path=screenshot)
                    raise AssertionError(f"cells still running after {timeout:.0f} s: {prompts()}\n"
                                         f"JupyterLab log:\n{lab.log_tail()}")
                time.sleep(1)
                idle = page.locator("#jp-main-statusbar").get_by_text("Idle").count() > 0
                settled = settled + 1 if idle and not any("*" in p for p in prompts()) else 0
            not_run = [i for i, p in enumerate(prompts()) if not p.strip().strip(":").strip("[]").isdigit()]

            stderr = page.locator(STDERR_OUTPUT)
            errors = [stderr.nth(i).inner_text()[:2000] for i in range(stderr.count())]

            charts = page.locator(SVG_OUTPUT)
            if charts.count():  # the screenshot shows the first chart, mid-page
                charts.first.evaluate("e => e.scrollIntoView({block: 'center'})")
                time.sleep(0.5)
            os.makedirs(os.path.dirname(screenshot), exist_ok=True)
            page.screenshot(path=screenshot)

            assert not errors, "cells wrote errors or to stderr:\n" + "\n---\n".join(errors)
            assert not not_run, f"code cells without an execution count: {not_run} of {prompts()}"
            n_charts = charts.count()
            assert n_charts >= 1, "no output rendered an SVG chart"
            assert charts.first.bounding_box()["width"] > 0

            # save, and read back what JupyterLab wrote
            save(page)
        finally:
            browser.close()
    with open(os.path.join(lab.root, name)) as f:
        return json.load(f)


def check_saved_outputs(nb):
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    not_run = [i for i, c in enumerate(code) if not isinstance(c.get("execution_count"), int)]
    assert not not_run, f"code cells without an execution count in the saved notebook: {not_run}"
    bad = [o for c in code for o in c["outputs"]
           if o["output_type"] == "error" or (o["output_type"] == "stream" and o["name"] == "stderr")]
    assert not bad, f"error or stderr outputs in the saved notebook: {json.dumps(bad)[:3000]}"


@pytest.fixture(scope="module")
def tour():
    if not os.path.exists(TOUR):
        pytest.skip(f"{os.path.relpath(TOUR, ROOT)} does not exist yet")
    return TOUR


def test_tour_notebook_declares_the_deepscope_kernel(tour):
    with open(tour) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    spec = nb["metadata"].get("kernelspec", {})
    assert spec.get("name") == KERNEL_NAME, f"metadata.kernelspec is {spec}"
    assert nb["metadata"].get("language_info", {}).get("name", "rust") == "rust"


def serve_notebook(path, tmp_path_factory, name):
    """A Lab server whose root holds a copy of `path`; skips without playwright,
    jupyterlab or the browser. A generator: yields the server, then stops it."""
    pytest.importorskip("playwright", reason="playwright is not installed (make setup)")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (make setup)")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium (or set DEEPSCOPE_CHROMIUM)")
    root = tmp_path_factory.mktemp(f"{name}-root")
    shutil.copy(path, root / os.path.basename(path))
    server = Lab(root, tmp_path_factory.mktemp(f"{name}-home"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def lab(tour, deepscope_kernelspec, tmp_path_factory):
    yield from serve_notebook(tour, tmp_path_factory, "lab")


@pytest.mark.slow
def test_tour_runs_all_cells_in_jupyterlab(lab, tour):
    saved = run_all_cells(lab, os.path.basename(tour), KERNEL_DISPLAY_NAME, SCREENSHOT)
    check_saved_outputs(saved)


# --- the router playground (notebook 05): widgets rendered and answering ----

PROTOTYPING = os.path.join(ROOT, "notebooks", "05-routing-prototyping.ipynb")
PLAYGROUND_SCREENSHOT = os.path.join(ROOT, "docs", "screenshots", "playground.png")
# the playground's output area (ipywidgets' Output view) and its summary line
PLAYGROUND_VIEW = ".jp-OutputArea-output .widget-output"


def top_k_slider(page):
    return page.locator(".widget-slider", has=page.locator(".widget-label", has_text="top-k")).first


def type_into_readout(page, slider, text):
    """Types `text` into a slider's readout and presses Enter, as a user can;
    returns the time (time.monotonic) the Enter was pressed."""
    readout = slider.locator(".widget-readout")
    readout.scroll_into_view_if_needed()
    readout.click()
    page.keyboard.press("Control+a")
    page.keyboard.type(text)
    pressed = time.monotonic()
    page.keyboard.press("Enter")
    return pressed


def wait_for_summary(page, start, timeout=30_000):
    """Waits until the playground's view starts with `start`."""
    page.wait_for_function(
        "([sel, start]) => { const v = document.querySelector(sel); return v && v.innerText.startsWith(start); }",
        arg=[PLAYGROUND_VIEW, start], timeout=timeout)


@pytest.fixture(scope="module")
def lab05(deepscope_kernelspec, tmp_path_factory):
    yield from serve_notebook(PROTOTYPING, tmp_path_factory, "lab05")


@pytest.mark.slow
def test_the_playground_answers_its_top_k_slider_in_jupyterlab(lab05):
    """Runs notebook 05 in JupyterLab, then sets the playground's top-k to 1
    in the browser (its slider's readout, as a user can) and waits for the
    redrawn view: its summary names the change and the charts differ. Then
    reloads the page: the widgets come back from the kernel and answer.
    Prints the time from the change to the redrawn view."""
    from playwright.sync_api import sync_playwright

    name = os.path.basename(PROTOTYPING)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(f"{lab05.url}/lab/tree/{name}?token={lab05.token}")
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(state="visible", timeout=120_000)
            if page.locator("#jp-left-stack").is_visible():
                page.keyboard.press("Control+b")
            page.locator("#jp-main-statusbar").get_by_text("Idle").wait_for(timeout=300_000)
            menu(page, "Run", "runmenu:run-all")
            view = page.locator(PLAYGROUND_VIEW).first
            view.wait_for(state="visible", timeout=600_000)
            # Run All goes on to the cell that moves the controls from Rust and back
            deadline = time.monotonic() + RUN_TIMEOUT
            while not view.inner_text().startswith("No intervention") or page.locator("#jp-main-statusbar").get_by_text("Idle").count() == 0:
                assert time.monotonic() < deadline, f"the playground view reads {view.inner_text()[:300]!r}"
                time.sleep(0.5)
            errors = page.locator(STDERR_OUTPUT)
            assert errors.count() == 0, [errors.nth(i).inner_text()[:500] for i in range(errors.count())]
            charts = view.locator("svg")
            before_charts = [charts.nth(i).inner_html() for i in range(charts.count())]

            slider = top_k_slider(page)
            t = type_into_readout(page, slider, "1")
            wait_for_summary(page, "top-1 on layer")
            took = time.monotonic() - t
            after_charts = [charts.nth(i).inner_html() for i in range(charts.count())]
            assert len(after_charts) >= 2, f"the view shows {len(after_charts)} charts (KL per token, the routing map)"
            # the KL per token and the last layer's routing map (one expert per token now) are
            # redrawn; the maps of the layers before it, which top-k did not touch, are not
            changed = [a != b for a, b in zip(after_charts, before_charts)]
            assert len(after_charts) == len(before_charts) and changed[0] and sum(changed) >= 2, changed
            assert errors.count() == 0, [errors.nth(i).inner_text()[:500] for i in range(errors.count())]
            assert "error" not in view.inner_text()[:200].lower(), view.inner_text()[:500]
            print(f"\nplayground: top-k 4 -> 1 in the browser, redrawn view after {took:.2f} s")
            slider.scroll_into_view_if_needed()
            time.sleep(0.3)
            os.makedirs(os.path.dirname(PLAYGROUND_SCREENSHOT), exist_ok=True)
            page.screenshot(path=PLAYGROUND_SCREENSHOT)

            # a reloaded page gets the widgets back from the kernel (comm_info, then
            # request_state per widget) and they still answer. Saved first: a reload
            # reads the notebook from disk, and autosave runs only every 2 minutes
            assert save(page), "the notebook was not saved before the reload"
            page.reload()
            view = page.locator(PLAYGROUND_VIEW).first
            view.wait_for(state="visible", timeout=120_000)
            wait_for_summary(page, "top-1 on layer")
            assert "model not found" not in page.locator(".jp-NotebookPanel").first.inner_text()
            slider = top_k_slider(page)
            assert slider.locator(".widget-readout").inner_text().strip() == "1"
            type_into_readout(page, slider, "2")
            wait_for_summary(page, "top-2 on layer")
        finally:
            browser.close()
