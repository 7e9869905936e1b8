"""Process lifetimes outside the server: a parent (a kernel, a script) killed during
`aiaas_lab.train(..., workers=2)` leaves no rank behind, and `_procs.stop_all` escalates from
SIGTERM to SIGKILL for a whole process group.

Descendants are found from the parent's pid (psutil), recorded before the parent dies, and
followed by their psutil handles (which also guard against a reused pid): never by scanning
the machine's processes for a command line."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from server_fixtures import wait_gone

from aiaas_lab import _procs

_PARENT = textwrap.dedent("""
    import sys, torch, aiaas_lab
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 16, generator=g)
    y = (X[:, 0] > 0).long()
    seen = []
    def report(event):
        if type(event).__name__ == "StepEnd" and not seen:
            seen.append(1)
            print("training", flush=True)
    aiaas_lab.train("mlp", (X, y), epochs=10000, batch_size=16, workers=2, progress=False, callbacks=[report])
""")


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, seconds: float) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + seconds
    while marker not in seen:
        assert proc.poll() is None, f"the parent exited ({proc.returncode}): {seen.decode(errors='replace')}"
        assert time.monotonic() < deadline, f"no {marker!r} within {seconds} s: {seen.decode(errors='replace')}"
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            seen += os.read(proc.stdout.fileno(), 4096)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("signum, within", [(signal.SIGKILL, 20), (signal.SIGTERM, 10)])
def test_a_parent_killed_during_a_two_worker_run_leaves_no_process(tmp_path, signum: int, within: float) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        _read_until(parent, b"training", 120)
        descendants = psutil.Process(parent.pid).children(recursive=True)
        assert len(descendants) >= 2, [p.cmdline() for p in descendants]  # both ranks
        parent.send_signal(signum)
        parent.wait(10)
        left = wait_gone(descendants, within)
        assert not left, [(p.pid, p.cmdline()) for p in left]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


_STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_stop_escalates_to_sigkill_for_the_whole_group() -> None:
    proc = _procs.popen([sys.executable, "-c", _STUBBORN], stdout=subprocess.PIPE)
    assert os.getpgid(proc.pid) == proc.pid  # its own group
    grandchild = psutil.Process(int(_read_until(proc, b"\n", 30).split()[0]))
    assert os.getpgid(grandchild.pid) == proc.pid  # what it started shares the group
    t0 = time.monotonic()
    _procs.stop(proc, grace=1.0)
    assert proc.returncode == -signal.SIGKILL  # it ignored the SIGTERM
    assert 1.0 <= time.monotonic() - t0 < 10
    assert not wait_gone([grandchild], 5)


def test_a_child_dies_with_its_parent_even_when_started_in_its_own_session(tmp_path) -> None:
    # The middle process starts a sleeper through _procs, reports its pid, and is SIGKILLed.
    middle = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from aiaas_lab import _procs
        child = _procs.popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE)
    try:
        child = psutil.Process(int(_read_until(middle, b"\n", 30).split()[0]))
        assert os.getsid(child.pid) == child.pid  # no terminal Ctrl-C reaches it
        middle.kill()
        middle.wait()
        assert not wait_gone([child], 10)
    finally:
        if middle.poll() is None:
            middle.kill()
