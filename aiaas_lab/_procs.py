"""Child process lifetimes, in one place: how every process this package starts is started,
stopped and tied to its parent (stdlib only; used by the server, its runners and the kernel).

The rules:

- A child starts in its own session (process group), so a Ctrl-C in a terminal or a signal to
  the parent's group never reaches it by accident, and one `killpg` reaches it and whatever it
  started in the same group.
- On Linux it also gets PR_SET_PDEATHSIG = SIGKILL, set between fork and exec: when the parent
  dies, however it dies (SIGKILL, the OOM killer), the kernel kills the child. The signal is
  tied to the *thread* that forked, so start children from a thread that lives as long as the
  children should (the event loop's, the caller's). A parent that died before the prctl took
  effect is caught by comparing the parent pid afterwards.
- A process that cannot be started that way (started by a third-party launcher such as
  torchrun's agent, or on macOS) calls `die_with_parent()` itself, and `watch_parent()` for
  systems without PDEATHSIG.
- Stopping is SIGTERM to the group, then SIGKILL to the group after a deadline, then reaping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["LAUNCHER_PID_ENV", "popen", "spawn", "die_with_parent", "watch_parent", "stop", "stop_all", "astop", "limit_memory",
           "DEFAULT_JOB_MEMORY_MB"]

_LINUX = sys.platform.startswith("linux")
# A launcher whose children start other processes it does not control (torchrun's ranks) tells
# them here which pid their parent must be; `watch_parent` in them checks it.
LAUNCHER_PID_ENV = "AIAAS_LAB_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not _LINUX:
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Resolved once here, not in the forked child: between fork and exec only this foreign call
# and os calls run, nothing that could take a lock another thread held at fork time.
_prctl = _load_prctl()


def die_with_parent(parent: int | None = None) -> None:
    """Make the kernel SIGKILL this process when its parent dies; exit at once if the parent
    (`parent`, a pid, when given) is already gone."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(3)


def _preexec(parent: int) -> Callable[[], None] | None:
    if _prctl is None:
        return None

    def set_deathsig() -> None:  # runs in the child, between fork and exec
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(3)

    return set_deathsig


def popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(argv, **kwargs)` as a child of this process's lifetime: its own
    session, and killed when this process (this thread) dies."""
    return subprocess.Popen(list(argv), start_new_session=True, preexec_fn=_preexec(os.getpid()), **kwargs)


async def spawn(argv: Sequence[str], **kwargs: Any) -> asyncio.subprocess.Process:
    """The same for asyncio; call it from the event loop's thread (it lives as long as the server)."""
    return await asyncio.create_subprocess_exec(*argv, start_new_session=True,
                                                preexec_fn=_preexec(os.getpid()), **kwargs)


def watch_parent(parent: int | None = None, interval: float = 0.5,
                 on_orphan: Callable[[], None] = lambda: os._exit(3)) -> None:
    """For a process whose launcher cannot be trusted to take it down: PDEATHSIG where the
    system has it, and a daemon thread that notices the parent changed (reparented to init or a
    subreaper) within `interval` seconds everywhere else. `parent`: the pid the launcher said it
    has (LAUNCHER_PID_ENV), which also catches a launcher that died before this was called."""
    parent = os.getppid() if parent is None else parent
    if os.getppid() != parent:
        on_orphan()
        return
    die_with_parent(parent)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                on_orphan()
                return

    threading.Thread(target=watch, daemon=True, name="aiaas-parent-watch").start()


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def stop_all(processes: Sequence[subprocess.Popen[bytes]], grace: float = 2.0) -> None:
    """Stop each process's group: SIGTERM, SIGKILL for what is left after `grace` seconds, and
    reap the leaders. The groups are the ones `popen` made (each leader's pid is its group id)."""
    for proc in processes:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        # Also when the leader already exited: what it started in its group may not have. A
        # group id is not handed out again while any member of the group lives.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def stop(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    stop_all([proc], grace)


async def astop(process: asyncio.subprocess.Process, grace: float = 2.0) -> int:
    """`stop` for an asyncio child (started with `spawn`); returns its exit status."""
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), grace)
    _signal_group(process.pid, signal.SIGKILL)  # what the leader started in its group, too
    return await process.wait()


# A server job's cap per process (aiaas-lab serve --job-memory-mb; here, not in the executor, so
# the CLI's --help has it without importing torch). A warm runner holds ~450 MB of data (torch,
# the engine); training the built-in models on the built-in data adds well under 100 MB; 4 GB
# leaves room for real data sets while one runaway job cannot take the machine.
DEFAULT_JOB_MEMORY_MB = 4096


def limit_memory(pid: int, megabytes: int | None) -> bool:
    """Cap what process `pid` (and every process it starts afterwards) may allocate, in MB;
    False where the system cannot. RLIMIT_DATA, not RLIMIT_AS: torch (and CUDA far more) reserve
    address space they never touch (a warm runner: ~950 MB of address space for ~450 MB of data),
    so an address-space cap fails jobs that use little memory. RLIMIT_DATA counts the heap and
    every private writable mapping, which is where tensors live; an allocation past it fails in
    the process (MemoryError, torch's "can't allocate memory") instead of the OOM killer picking
    a victim. It is per process: a job's every process gets the same cap."""
    if not megabytes:
        return False
    try:
        import resource

        limit = int(megabytes) * 2**20
        resource.prlimit(pid, resource.RLIMIT_DATA, (limit, limit))  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError, ValueError):
        return False
    return True
