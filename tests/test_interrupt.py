"""Ctrl-C during `%aiaas train` in a real kernel: the first one stops at the next step (tested in
test_magics.py); a second one, for a forward pass that hangs, interrupts as usual."""

from __future__ import annotations

import time
from typing import Any

HANGING = """
import signal, time, torch
from torch import nn
from sklearn.datasets import load_digits
X, y = load_digits(return_X_y=True)

class Hangs(nn.Module):
    '''Trains normally for a few steps, then hangs in forward. While hanging it reports, once,
    that the first Ctrl-C has been taken (the training loop's handler is gone again), so the test
    sends the second only then: two signals close together would reach Python as one.'''
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(64, 10)
        self.calls = 0
    def forward(self, x):
        self.calls += 1
        if self.calls > 5:
            print('hanging', flush=True)
            told, end = False, time.monotonic() + 120
            while time.monotonic() < end:
                time.sleep(0.05)
                if not told and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                    print('first interrupt taken', flush=True)
                    told = True
        return self.layer(x)

hangs = Hangs()
"""


def _wait_for(kernel: Any, msg_id: str, text: str, seen: dict[str, Any], timeout: float = 60) -> None:
    """Read the cell's messages until its stdout shows `text` (or it ends)."""
    deadline = time.monotonic() + timeout
    while text not in seen["stdout"] and not seen["idle"]:
        assert time.monotonic() < deadline, f"no {text!r} in {seen['stdout']!r}"
        msg = kernel.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            seen["stdout" if content["name"] == "stdout" else "stderr"] += content["text"]
        elif kind == "error":
            seen["error"] = content
        elif kind == "status" and content["execution_state"] == "idle":
            kernel.client.get_shell_msg(timeout=10)
            seen["idle"] = True


def test_a_second_interrupt_during_a_hanging_forward_raises_keyboard_interrupt(kernel):
    kernel.check(HANGING)
    msg_id = kernel.client.execute("r = %aiaas train hangs --data (X, y) --epochs 3 --no-widget\nprint('after')")
    seen: dict[str, Any] = {"stdout": "", "stderr": "", "error": None, "idle": False}
    _wait_for(kernel, msg_id, "hanging", seen)
    assert not seen["idle"], seen
    started = time.monotonic()
    kernel.interrupt()
    _wait_for(kernel, msg_id, "first interrupt taken", seen)
    assert not seen["idle"], "the first interrupt ended the cell while its forward pass was hanging"
    kernel.interrupt()
    _wait_for(kernel, msg_id, "\0never printed\0", seen)  # until the cell ends
    assert time.monotonic() - started < 60  # well before the forward's own 120 s end
    assert seen["error"] is not None and seen["error"]["ename"] == "KeyboardInterrupt", seen
    assert "after" not in seen["stdout"].splitlines()
    # No result was bound, Ctrl-C is ordinary again and the kernel trains normally.
    out = kernel.check("import aiaas_lab\nprint('r' in dir(), signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    assert out.stdout.split() == ["False", "True"]
    out = kernel.check("hangs.calls = -10**9\nr = %aiaas train hangs --data (X, y) --epochs 1 --no-widget\nprint(r.status)")
    assert out.stdout.strip().endswith("completed")
