"""The widget in a real browser: JupyterLab 4 and Notebook 7 run a notebook with `%aiaas train`;
the bars reach 100%, the charts have points, the table has a row per epoch, Stop stops a long run
while its cell is busy and the next cell runs. Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import nbformat

from aiaas_lab.notebook.widget import SNAPSHOT_INTERVAL

EPOCHS = 4
CELLS = [
    "%load_ext aiaas_lab",
    f"r = %aiaas train mlp --data digits --epochs {EPOCHS} --val 0.2 --seed 0 --threads 1",
    "long = %aiaas train mlp --data digits --epochs 5000 --seed 0 --threads 1",
    "print('next cell ran:', long.status, len(long.history))",
]
# Notebook 7.6 raises this on every load, widgets or not.
KNOWN_NOISE = ("reading 'schema'",)


def _write_notebook(server: Any, name: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, server.root / name)


def _run_all(page: Any, server: Any, name: str) -> None:
    page.goto(server.notebook_url(name))
    page.wait_for_function("() => window.jupyterapp?.shell?.currentWidget?.sessionContext"
                           "?.session?.kernel?.status === 'idle'", timeout=120_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()


def _check_run(page: Any, artifacts: Path, label: str) -> None:
    from playwright.sync_api import expect

    widgets = page.locator(".jp-OutputArea-output .aiaas-widget")
    first = widgets.nth(0)
    expect(first).to_have_attribute("data-status", "completed", timeout=120_000)
    expect(first.locator(".aiaas-status")).to_have_text(re.compile(rf"completed after {EPOCHS} epochs"))
    assert first.locator(".aiaas-epoch-bar").get_attribute("data-fraction") == "1.0000"
    assert first.locator(".aiaas-step-bar").get_attribute("data-fraction") == "1.0000"
    assert int(first.locator(".aiaas-loss-chart").get_attribute("data-points")) > EPOCHS
    assert int(first.locator(".aiaas-acc-chart").get_attribute("data-points")) == 2 * EPOCHS
    assert first.locator(".aiaas-table tbody tr").count() == EPOCHS
    assert first.locator(".aiaas-stop").is_hidden()

    # The long run: wait until it is well under way and its output has been re-rendered by a
    # snapshot refresh (every 5 s), then click Stop while its cell is busy.
    long = widgets.nth(1)
    expect(long).to_have_attribute("data-status", "running", timeout=120_000)
    seen_running = time.monotonic()
    deadline = seen_running + 120
    while (int(long.locator(".aiaas-epoch-bar").get_attribute("data-value") or 0) < 2
           or time.monotonic() - seen_running < SNAPSHOT_INTERVAL + 1):
        assert time.monotonic() < deadline, "the long run made no progress"
        time.sleep(0.2)
    # A refresh re-renders the output: still one live view per run.
    assert widgets.count() == 2
    page.screenshot(path=str(artifacts / f"{label}-running.png"))
    clicked = time.monotonic()
    long.locator(".aiaas-stop").click()
    expect(long).to_have_attribute("data-status", "stopped", timeout=10_000)
    stopped_after = time.monotonic() - clicked
    expect(long.locator(".aiaas-status")).to_have_text(re.compile(r"stopped after \d+ epochs .*\(stop requested\)"))
    next_cell = page.locator(".jp-OutputArea-output", has_text="next cell ran: stopped")
    expect(next_cell).to_have_count(1, timeout=30_000)
    assert stopped_after < 5, f"the widget showed 'stopped' {stopped_after:.1f} s after the click"
    assert not long.locator(".aiaas-hint").text_content()
    page.screenshot(path=str(artifacts / f"{label}-light.png"))
    errors = [e for e in page.errors if not any(n in e for n in KNOWN_NOISE)]
    assert not errors, errors


def test_jupyterlab_widget_runs_and_stops(lab: Any, page: Any, artifacts: Path) -> None:
    _write_notebook(lab, "train.ipynb")
    _run_all(page, lab, "train.ipynb")
    _check_run(page, artifacts, "lab")
    # Dark theme: the same view through JupyterLab's CSS variables.
    page.evaluate("() => window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
    # The theme's CSS has reached the widget once its text is light (a fixed wait would only guess).
    page.wait_for_function("() => { const el = document.querySelector('.aiaas-widget');"
                           " const [r, g, b] = getComputedStyle(el).color.match(/\\d+/g).map(Number);"
                           " return r + g + b > 3 * 127; }", timeout=30_000)
    page.locator(".aiaas-widget").nth(0).screenshot(path=str(artifacts / "lab-dark-widget.png"))
    page.screenshot(path=str(artifacts / "lab-dark.png"))


def test_notebook7_widget_runs_and_stops(notebook7: Any, page: Any, artifacts: Path) -> None:
    _write_notebook(notebook7, "train.ipynb")
    _run_all(page, notebook7, "train.ipynb")
    _check_run(page, artifacts, "nb7")
