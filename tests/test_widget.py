"""The training widget through the doors users use: `%aiaas train` / `%aiaas predict` in a real
kernel (this file's test client plays the front-end), nbclient for saved notebooks, and the pure
pieces (curve downsampling, the static snapshot) directly."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import time
from array import array
from pathlib import Path
from typing import Any

import pytest

from aiaas_lab.engine.events import EpochEnd, RunEnded, RunStarted, StepEnd
from aiaas_lab.notebook.widget import LOSS_POINTS

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


JS = Path(__file__).resolve().parents[1] / "js"


@functools.cache
def stop_messages_from_widget_js() -> list[Any]:
    """Render js/src/widget.js on js/test/fake-dom.js, click Stop, and return what it sent."""
    node = shutil.which("node")
    if node is None:
        message = "node is missing: the Stop message is read from the real widget.js"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    script = ("import(process.argv[1]).then(async (m) => console.log(JSON.stringify(await m.stopMessage())))"
              ".catch((e) => { console.error(e); process.exit(1); });")
    done = subprocess.run([node, "-e", script, (JS / "test" / "fake-dom.js").as_uri()], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    sent = json.loads(done.stdout)
    assert sent, "clicking Stop in widget.js sent nothing"
    return sent


class FrontEnd:
    """Watches one kernel's iopub like a notebook would: our widget's comm and its states."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.comm_id: str | None = None
        self.states: list[tuple[float, dict[str, Any], int]] = []  # (time, state, message bytes)
        self.opens: list[int] = []  # sizes of comm_open messages

    def on_message(self, msg: dict[str, Any]) -> None:
        kind, content = msg["msg_type"], msg["content"]
        size = len(json.dumps(content)) + sum(len(b) for b in msg.get("buffers", []))
        if kind == "comm_open":
            state = content["data"].get("state", {})
            if state.get("_anywidget_id", "").endswith("TrainingWidget"):
                self.comm_id, self.states = content["comm_id"], []
                self.opens.append(size)
        elif kind == "comm_msg" and content["comm_id"] == self.comm_id:
            data = content["data"]
            if data.get("method") == "update" and "state" in data["state"]:
                state = dict(data["state"]["state"])
                for path, buffer in zip(data.get("buffer_paths", []), msg.get("buffers", [])):
                    if path[0] == "state":
                        state[path[1]] = bytes(buffer)
                self.states.append((time.monotonic(), state, size))

    def click_stop(self) -> None:
        """What a click on Stop puts on the wire: each message the real widget.js passes to
        `model.send` (learnt by clicking it in node), wrapped as the widget protocol wraps a
        custom message."""
        kc = self.kernel.client
        for content in stop_messages_from_widget_js():
            kc.shell_channel.send(kc.session.msg("comm_msg", {
                "comm_id": self.comm_id, "data": {"method": "custom", "content": content}}))


    @property
    def last(self) -> dict[str, Any]:
        return self.states[-1][1]


def _html_rows(markup: str) -> int:
    return len(re.findall(r"<tr><td", markup))


def test_train_shows_the_widget_with_a_static_snapshot(kernel):
    front = FrontEnd(kernel)
    out = kernel.run("r = %aiaas train mlp --data digits --epochs 3 --val 0.2 --seed 0 --threads 1", on_message=front.on_message)
    assert out.error is None, out.error
    first, final = out.displays[0], out.displays[-1]
    # One output: the widget view for live front-ends, text and HTML for everything else.
    assert {WIDGET_MIME, "text/plain", "text/html"} <= set(first)
    assert final[WIDGET_MIME]["model_id"] == first[WIDGET_MIME]["model_id"]
    assert "completed after 3 epochs" in final["text/plain"]
    html = final["text/html"]
    assert "completed after 3 epochs" in html and "<svg" in html and "<polyline" in html
    assert _html_rows(html) == 3
    # The live state: every message carries all of it; the last one is the finished run.
    last = front.last
    assert last["status"] == "completed" and last["epochs_done"] == 3 and last["history_total"] == 3
    assert last["epoch_step"] == last["steps_per_epoch"] == 23
    assert last["columns"] == ["loss", "accuracy", "val_loss", "val_accuracy"]
    assert all(size < 8_000 for _, _, size in front.states)


def test_stop_reaches_a_busy_cell_and_keeps_weights_and_history(kernel):
    front = FrontEnd(kernel)
    clicked: dict[str, float] = {}
    stop_messages_from_widget_js()  # learnt before the run, so node's start-up is not in the timing

    def on_message(msg: dict[str, Any]) -> None:
        front.on_message(msg)
        if not clicked and front.states and front.last["epochs_done"] >= 2:
            front.click_stop()  # the cell is busy training: this must still get through
            clicked["at"] = time.monotonic()

    out = kernel.run("r = %aiaas train mlp --data digits --epochs 3000 --seed 0 --threads 1\nr.status, len(r.history)",
                     on_message=on_message, timeout=180)
    assert out.error is None, out.error
    assert clicked, "the run ended before it could be stopped"
    ended = next(t for t, state, _ in front.states if state["status"] != "running")
    assert front.last["status"] == "stopped" and front.last["reason"] == "stop requested"
    assert ended - clicked["at"] < 1.0, f"stopped {ended - clicked['at']:.2f} s after the click"
    status, epochs = eval(out.text)  # noqa: S307 - the kernel's repr of a (str, int) tuple
    assert status == "stopped" and 2 <= epochs < 3000
    # The next cell runs and the model trained so far is there to use.
    after = kernel.check("p = %aiaas predict mlp --data digits --classes --no-widget\np.shape[0], r.history[-1]['epoch']")
    assert after.text.strip() == f"(1797, {epochs})"


def test_messages_stay_few_and_small_whatever_the_step_rate(kernel):
    front = FrontEnd(kernel)
    code = (
        "import aiaas_lab\n"
        "import time; t0 = time.monotonic()\n"
        # log_every=1: an event every step, the worst case for the reporter
        "r = aiaas_lab.train('mlp', 'digits', epochs=40, batch_size=16, seed=0, log_every=1, progress='widget', threads=1)\n"
        "seconds = time.monotonic() - t0"
    )
    out = kernel.run(code, on_message=front.on_message, timeout=180)
    assert out.error is None, out.error
    seconds = float(kernel.check("seconds").text)
    steps = front.last["step"]
    assert steps == 40 * 113 and front.last["status"] == "completed"
    # At most ten updates a second (plus the first and the last), each well under 8 KB.
    assert len(front.states) <= seconds * 10 + 2, (len(front.states), seconds)
    assert max(size for _, _, size in front.states) < 8_000
    # The curve is downsampled, not truncated: it spans the whole run.
    curve = array("f", front.last["losses"])
    steps = curve[: len(curve) // 2]
    assert len(steps) <= LOSS_POINTS + 1 and steps[0] < 100 and steps[-1] == 40 * 113
    assert front.last["history_total"] == 40


def test_html_mode_shows_a_static_view_without_a_widget(kernel):
    front = FrontEnd(kernel)
    kernel.check("%config AiaasMagics.display = 'html'")
    try:
        out = kernel.run("r = %aiaas train mlp --data digits --epochs 2 --seed 0 --threads 1", on_message=front.on_message)
    finally:
        kernel.check("%config AiaasMagics.display = 'auto'")
    assert out.error is None, out.error
    assert front.comm_id is None and out.comm_messages == 0
    assert all(WIDGET_MIME not in d and "text/html" in d for d in out.displays)
    assert "completed after 2 epochs" in out.displays[-1]["text/html"]


def test_no_widget_gives_text_progress(kernel):
    out = kernel.run("r = %aiaas train mlp --data digits --epochs 1 --seed 0 --threads 1 --no-widget")
    assert out.error is None and out.comm_messages == 0 and not out.displays
    assert "completed after 1 epoch" in out.stdout


def test_predict_shows_a_table_and_labelled_thumbnails(kernel):
    kernel.check("r = %aiaas train mlp --data digits --epochs 1 --seed 0 --threads 1 --no-widget")
    out = kernel.check("p = %aiaas predict mlp --data digits")
    view = out.displays[-1]
    assert "predictions: first 10 of 1797 rows" in view["text/plain"]
    assert "probability" in view["text/html"] and _html_rows(view["text/html"]) == 10
    assert view["text/html"].count("<img src='data:image/png;base64,") == 24  # 8x8 digits, 24 shown
    classes = kernel.check("c = %aiaas predict mlp --data digits --classes").displays[-1]
    assert "probability" not in classes["text/html"] and classes["text/html"].count("<img") == 24
    quiet = kernel.check("c = %aiaas predict mlp --data digits --no-widget")
    assert not quiet.displays


def test_regression_predictions_show_values_without_thumbnails(kernel):
    kernel.check("import torch\nXr = torch.randn(50, 3); yr = Xr.sum(1, keepdim=True)\n"
                 "rr = %aiaas train linear --data (Xr, yr) --epochs 1 --loss mse --no-widget")
    view = kernel.check("pr = %aiaas predict linear --data Xr").displays[-1]
    assert "value" in view["text/html"] and "<img" not in view["text/html"]
    assert _html_rows(view["text/html"]) == 10


def test_saved_notebook_keeps_the_widget_view_and_the_html_snapshot(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext aiaas_lab"),
        nbformat.v4.new_code_cell("r = %aiaas train mlp --data digits --epochs 2 --val 0.2 --seed 0 --threads 1"),
    ])
    NotebookClient(nb, timeout=180, kernel_name="python3", store_widget_state=True).execute()
    outputs = nb.cells[1].outputs
    assert len(outputs) == 1, outputs  # one output, updated in place
    data = outputs[0]["data"]
    model_id = data[WIDGET_MIME]["model_id"]
    assert "completed after 2 epochs" in data["text/html"] and _html_rows(data["text/html"]) == 2
    assert "completed after 2 epochs" in data["text/plain"]
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"][model_id]["state"]
    assert state["state"]["status"] == "completed"
    nbformat.validate(nb)


# -- the pure pieces ---------------------------------------------------------------------


def test_loss_series_stays_bounded_and_keeps_the_mean():
    from aiaas_lab.notebook.widget import _Series

    series = _Series()
    for step in range(1, 1_000_001):
        series.add(step, 1.0 if step % 2 else 3.0)
    steps, losses = series.points()
    assert LOSS_POINTS // 2 <= len(steps) <= LOSS_POINTS
    assert steps[0] < 5_000 and steps[-1] == 1_000_000  # spans the whole run
    assert all(abs(v - 2.0) < 1e-6 for v in losses)  # merging averages, it never picks
    assert len(series.to_bytes()) == 8 * len(steps)


def test_snapshot_renders_every_status():
    from aiaas_lab.notebook.widget import _RunView

    view = _RunView()
    view.apply(RunStarted(run_id="r", epochs=4, start_epoch=0, steps_per_epoch=10, batch_size=8,
                          train_samples=80, val_samples=0, task="regression", num_classes=None))
    for step in range(1, 11):
        view.add_step(StepEnd(epoch=1, step=step, epoch_step=step, loss=1 / step, samples=8 * step))
    view.apply(EpochEnd(epoch=1, step=10, metrics={"loss": 0.3}, seconds=1.0, samples_per_s=80.0))
    assert view.fraction() == 0.25 and view.eta() is not None
    html = view.html()
    assert "running" in html and "accuracy" not in html and _html_rows(html) == 1
    view.apply(RunEnded(status="failed", epochs_completed=1, steps=10, seconds=2.0, error="ValueError: <bad>"))
    html = view.html()
    assert "failed: ValueError: &lt;bad&gt;" in html and "error-color" in html
    state = view.state()
    assert state["status"] == "failed" and state["loss"] == pytest.approx(0.1) and math.isfinite(state["elapsed"])


def test_a_diverged_loss_never_breaks_the_message():
    from aiaas_lab.notebook.widget import _RunView

    view = _RunView()
    view.apply(RunStarted(run_id="r", epochs=1, start_epoch=0, steps_per_epoch=10, batch_size=8,
                          train_samples=80, val_samples=0, task="classification", num_classes=2))
    view.add_step(StepEnd(epoch=1, step=1, epoch_step=1, loss=math.nan, samples=8))
    state = {k: v for k, v in view.state().items() if not isinstance(v, bytes)}
    assert state["loss"] == "NaN"  # the wire form js/src/nonfinite.js decodes
    json.dumps(state, allow_nan=False)  # what the kernel's session does to every message
    assert "loss NaN" in view.text()


def test_widget_outside_a_kernel_falls_back_to_text():
    from aiaas_lab import TextProgress
    from aiaas_lab.notebook.reporters import make_reporter

    assert isinstance(make_reporter("widget"), TextProgress)
    assert isinstance(make_reporter("html"), TextProgress)
