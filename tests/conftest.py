"""Shared fixtures. `kernel` runs code in a real IPython kernel (the door notebook users use)."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class Execution:
    """What one cell produced, as a notebook would show it."""

    stdout: str = ""
    stderr: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)  # execute_result data bundles
    displays: list[dict[str, Any]] = field(default_factory=list)  # display_data / update bundles
    comm_messages: int = 0
    error: dict[str, Any] | None = None  # ename, evalue, traceback

    @property
    def text(self) -> str:
        return "\n".join(r.get("text/plain", "") for r in self.results)


class KernelSession:
    def __init__(self, client: Any, manager: Any = None) -> None:
        self.client = client
        self.manager = manager

    def interrupt(self) -> None:
        """What the notebook's Interrupt button (or Ctrl-C) does: SIGINT to the kernel."""
        self.manager.interrupt_kernel()

    def run(self, code: str, timeout: float = 120.0, on_message: Any = None) -> Execution:
        """Execute `code` and collect its outputs until the kernel is idle again."""
        msg_id = self.client.execute(code, allow_stdin=False)
        out = Execution()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell did not finish in {timeout} s: {code[:200]}")
            try:
                msg = self.client.get_iopub_msg(timeout=min(remaining, 5))
            except queue.Empty:
                continue
            if on_message is not None:
                on_message(msg)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    out.stdout += content["text"]
                else:
                    out.stderr += content["text"]
            elif kind == "execute_result":
                out.results.append(content["data"])
            elif kind in ("display_data", "update_display_data"):
                out.displays.append(content["data"])
            elif kind.startswith("comm_"):
                out.comm_messages += 1
            elif kind == "error":
                out.error = content
            elif kind == "status" and content["execution_state"] == "idle":
                # drain the shell reply so the next execute starts clean
                self.client.get_shell_msg(timeout=10)
                return out

    def check(self, code: str, timeout: float = 120.0) -> Execution:
        """Run `code` and fail the test with the kernel's traceback if it raised."""
        out = self.run(code, timeout)
        if out.error:
            raise AssertionError(f"{out.error['ename']}: {out.error['evalue']}\n" + "\n".join(out.error["traceback"]))
        return out


@pytest.fixture(scope="module")
def kernel() -> Any:
    """A real IPython kernel with aiaas_lab loaded, shared by the tests of one module."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    session = KernelSession(kc, km)
    try:
        session.check("%load_ext aiaas_lab", timeout=120)
        yield session
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
