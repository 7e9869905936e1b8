"""NaN and infinite losses on the widget: its synced state stays JSON that Jupyter accepts (the
wire strings that js/src/nonfinite.js decodes) and the static snapshot shows NaN / inf / -inf.

Through a real kernel: the engine's events, as a run that diverges produces them, are fed to the
widget reporter in a cell, and this file's client watches iopub like a front-end. Then a real
`%aiaas train` whose validation loss overflows."""

from __future__ import annotations

import json
import math
import re
from array import array
from typing import Any

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# One run, as events: finite steps, a -inf step, an epoch whose validation loss is inf, then a NaN
# step and the failure the engine reports for it.
FEED = """
import math
from aiaas_lab.engine.events import EpochEnd, RunEnded, RunStarted, StepEnd
from aiaas_lab.notebook import widget

# No throttling, so that every event's state goes out and is checked.
saved = widget.SEND_INTERVAL, widget.SEND_BUDGET
widget.SEND_INTERVAL, widget.SEND_BUDGET = 0.0, math.inf
try:
    report = widget.make_widget_reporter("widget")
    report(RunStarted(run_id="r", epochs=3, start_epoch=0, steps_per_epoch=4, batch_size=8, train_samples=32,
                      val_samples=8, task="regression", num_classes=None))
    for step, loss in enumerate([1.0, 0.5, -math.inf, 0.25], start=1):
        report(StepEnd(epoch=1, step=step, epoch_step=step, loss=loss, samples=8 * step))
    report(EpochEnd(epoch=1, step=4, metrics={"loss": 0.5, "val_loss": math.inf}, seconds=1.0, samples_per_s=32.0))
    report(StepEnd(epoch=2, step=5, epoch_step=1, loss=math.nan, samples=40))
    report(RunEnded(status="failed", epochs_completed=1, steps=5, seconds=1.5,
                    reason="the loss is not finite at step 5", error="the loss is not finite at step 5"))
finally:
    widget.SEND_INTERVAL, widget.SEND_BUDGET = saved
"""


class Watcher:
    """The synced states of our widget's comm, as a front-end receives them (JSON plus buffers)."""

    def __init__(self) -> None:
        self.comm_id: str | None = None
        self.states: list[dict[str, Any]] = []

    def __call__(self, msg: dict[str, Any]) -> None:
        content = msg["content"]
        if msg["msg_type"] == "comm_open" and content["data"].get("state", {}).get("_anywidget_id", "").endswith("TrainingWidget"):
            self.comm_id, self.states = content["comm_id"], [content["data"]["state"]["state"]]
        elif msg["msg_type"] == "comm_msg" and content["comm_id"] == self.comm_id and "state" in content["data"].get("state", {}):
            state = dict(content["data"]["state"]["state"])
            for path, buffer in zip(content["data"].get("buffer_paths", []), msg.get("buffers", [])):
                if path[0] == "state":
                    state[path[1]] = bytes(buffer)
            self.states.append(state)


def _no_serialisation_trouble(out: Any) -> None:
    assert out.error is None, out.error
    # jupyter_client falls back to cleaning a message it cannot pack, with this warning on stderr
    assert "serialization failed" not in out.stderr.lower(), out.stderr


def _nonfinite_labels(markup: str) -> list[str]:
    return re.findall(r"<text class='aiaas-nonfinite'[^>]*>([^<]*)</text>", markup)


def test_nan_and_infinite_losses_reach_the_widget_and_its_snapshot(kernel):
    watch = Watcher()
    out = kernel.run(FEED, on_message=watch)
    _no_serialisation_trouble(out)
    assert watch.comm_id is not None and len(watch.states) >= 2
    # Every state went out as strict JSON; the diverged loss as the wire string, not null.
    for state in watch.states:
        json.dumps({k: v for k, v in state.items() if not isinstance(v, bytes)}, allow_nan=False)
    last = watch.states[-1]
    assert last["status"] == "failed" and last["loss"] == "NaN"
    # The opening state, then one per event: started, four steps, the epoch, the NaN step, the end.
    assert [state["loss"] for state in watch.states] == [None, None, 1.0, 0.5, "-Infinity", 0.25, 0.25, "NaN", "NaN"]
    # The float32 payloads carry the values themselves.
    curve = array("f", last["losses"])
    losses = curve[len(curve) // 2:]
    assert losses[2] == -math.inf and math.isnan(losses[-1])
    assert list(array("f", last["history"])) == [1.0, 0.5, math.inf]
    # The snapshot in the output: the figures, the table and the chart's marks.
    html = out.displays[-1]["text/html"]
    assert "loss NaN" in html
    assert re.search(r"<td[^>]*>inf</td>", html), "the val_loss cell reads inf"
    assert sorted(_nonfinite_labels(html)) == ["-inf", "NaN", "inf"]
    for points in re.findall(r"points='([^']*)'", html):
        assert all(math.isfinite(float(c)) for c in re.split(r"[ ,]", points)), points
    assert "loss NaN" in out.displays[-1]["text/plain"]


def test_an_overflowing_validation_loss_shows_as_inf_in_a_real_run(kernel):
    watch = Watcher()
    code = ("import torch\n"
            "Xn = torch.randn(200, 4); yn = torch.randn(200, 1)\n"
            # the model's squared error on these overflows float32: val_loss is inf every epoch
            "Vn = (torch.full((20, 4), 3e38), torch.full((20, 1), -3e38))\n"
            "rn = %aiaas train linear --data (Xn, yn) --val Vn --epochs 2 --seed 3 --threads 1\n"
            "rn.status, [row['val_loss'] for row in rn.history]")
    out = kernel.run(code, on_message=watch)
    _no_serialisation_trouble(out)
    assert out.text.strip() == "('completed', [inf, inf])"
    assert watch.states[-1]["status"] == "completed" and watch.states[-1]["columns"] == ["loss", "val_loss"]
    rows = list(array("f", watch.states[-1]["history"]))
    assert rows[2::3] == [math.inf, math.inf] and all(math.isfinite(v) for v in rows[1::3])
    html = out.displays[-1]["text/html"]
    assert len(re.findall(r"<td[^>]*>inf</td>", html)) == 2
    assert "inf" in _nonfinite_labels(html)
