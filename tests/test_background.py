"""`--background` / `train(..., background=True)`: the cell returns at once with a handle while the
run goes on; errors found before the first step still raise in the cell that started it."""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest

import aiaas_lab

from test_widget import FrontEnd


@pytest.fixture(scope="module")
def own_kernel(kernel: Any) -> Any:
    """This module's kernel, with `time` imported; `manager` presses Interrupt."""
    kernel.check("import time")
    kernel.manager = kernel.client.parent  # the KernelManager that made the client
    return kernel


def test_background_cell_returns_while_the_widget_keeps_updating(own_kernel):
    front = FrontEnd(own_kernel)
    started = time.monotonic()
    out = own_kernel.run("h = %aiaas train mlp --data digits --epochs 3000 --seed 0 --threads 1 --background\nh.status",
                         on_message=front.on_message)
    returned = time.monotonic() - started
    assert out.error is None, out.error
    assert out.text == "'running'"
    # The next cells run while it trains, and the widget keeps receiving the run's progress.
    seen = len(front.states)
    deadline = time.monotonic() + 90
    while front.last["epochs_done"] < 2 and time.monotonic() < deadline:
        own_kernel.run("time.sleep(0.5)", on_message=front.on_message)
    assert len(front.states) > seen and front.last["status"] == "running" and front.last["epochs_done"] >= 2
    result = own_kernel.check("res = h.stop() or h.wait(60)\nres.status, len(res.history) > 0, h.status",
                              timeout=120)
    assert result.text == "('stopped', True, 'stopped')"
    assert returned < 15


def test_background_errors_before_the_first_step_raise_in_the_cell(own_kernel):
    own_kernel.check("import torch\nXb = torch.randn(20, 4); yb = torch.zeros(19, dtype=torch.long)")
    out = own_kernel.run("bad = %aiaas train mlp --data (Xb, yb) --epochs 2 --background")
    # IPython shows a UsageError as one line on stderr, without a traceback.
    assert out.stderr.startswith("UsageError: --data: expected X and y with the same number of rows"), out.stderr
    assert own_kernel.check("'bad' in dir()").text == "False"
    # The empty view it had shown is cleared.
    assert out.displays and out.displays[-1].get("text/plain", "") == ""


def test_interrupt_while_waiting_stops_the_run_and_returns_its_result(own_kernel):
    own_kernel.check("h = %aiaas train mlp --data digits --epochs 3000 --seed 0 --threads 1 --background --no-widget")
    # Interrupt only once the cell is waiting with the run's Ctrl-C handler in place: earlier, the
    # interrupt is an ordinary KeyboardInterrupt in the cell (or dropped by an idle kernel). A thread
    # of the cell watches for that handler and says so.
    msg_id = own_kernel.client.execute(
        "import signal, threading\n"
        "def _tell(end=time.monotonic() + 60):\n"
        "    while signal.getsignal(signal.SIGINT) is signal.default_int_handler and time.monotonic() < end:\n"
        "        time.sleep(0.01)\n"
        "    print('waiting', flush=True)\n"
        "threading.Thread(target=_tell, daemon=True).start()\n"
        "res = h.wait()\nres.status, res.reason")
    deadline = time.monotonic() + 60
    waiting = False
    while not waiting:
        assert time.monotonic() < deadline, "the cell never started waiting"
        try:
            msg = own_kernel.client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        waiting = (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                   and "waiting" in msg["content"]["text"])
    own_kernel.manager.interrupt_kernel()
    out = own_kernel.check("res.status, res.reason, h.status", timeout=60)
    assert out.text == "('stopped', 'interrupted', 'stopped')", out


def test_python_api_background_handle():
    run = aiaas_lab.train("mlp", "digits", epochs=3000, seed=0, threads=1, progress=False, background=True)
    assert run.status == "running"
    with pytest.raises(TimeoutError, match="still running"):
        run.wait(timeout=0.01)
    run.stop()
    result = run.wait(60)
    assert result is run.result and result.status == "stopped" and result.reason == "stop requested"
    assert run.status == "stopped" and "BackgroundRun: stopped" in repr(run)

    done = aiaas_lab.train("linear", "digits", epochs=1, seed=0, threads=1, progress=False, background=True).wait(60)
    assert done.status == "completed" and len(done.history) == 1


def test_python_api_background_validation_raises_in_the_caller():
    with pytest.raises(aiaas_lab.BadArgument, match="MODEL"):
        aiaas_lab.train("no-such-model", "digits", epochs=1, progress=False, background=True)
