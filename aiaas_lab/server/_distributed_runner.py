"""A `workers > 1` job: the runner hands it to torchrun, through the same entry point a user
runs on a cluster (`torchrun ... -m aiaas_lab.worker JOB.json`), and relays what rank 0 reports.

The runner stays the one process the executor knows: it speaks the same line protocol on its
channel ({"event"}, {"model"}, {"error"}), turns the executor's cancel (its stop flag) into the
worker's stop file, and reads rank 0's events from the JSON-lines file the worker appends to.

torchrun is started through this module's `main` (`python -m aiaas_lab.server._distributed_runner
TORCHRUN-ARGS`), which is torchrun with one change: every TCPStore it hosts (the rendezvous and
the store it shares with the ranks) listens on 127.0.0.1 only. Stock torchrun binds them to all
interfaces (`::`) even for --standalone, and anyone who can reach the port can join the job's
rendezvous. The ranks' gloo sockets are kept on the loopback interface too.

Lifetimes: torchrun starts through `_procs` (its own session; SIGKILLed if this runner dies), and
tells its ranks its pid (`_procs.LAUNCHER_PID_ENV`) so a rank whose torchrun died, even before it
could watch, exits. A SIGTERM to this runner is passed on to torchrun (run_distributed_job).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _procs

__all__ = ["run_distributed_job", "worker_job", "main"]

_POLL_SECONDS = 0.05  # how often the events file is read: well under the widget's 10 updates/s


def worker_job(job: dict[str, Any]) -> dict[str, Any]:
    """The `aiaas_lab.worker` job description (its module docstring) for a server job: the same
    job, with the paths and the events this runner reads."""
    h = dict(job["hyperparameters"])
    model_ref = job["model"]
    if "pickle" in model_ref and not job.get("allow_code"):
        raise PermissionError("model.pickle: this server does not run models sent as code.")
    # A sharded model checkpoints per rank; the worker refuses it, so a sharded job restarts from scratch.
    if not h.get("shard"):
        h.update(checkpoint="checkpoint", resume=True)
    h["threads"] = int(job.get("threads", 1))
    spec: dict[str, Any] = {
        "run_id": job["job_id"],
        "model": model_ref,
        "data": job["data"],
        "val": job["val"],
        "hyperparameters": h,
        "events": {"file": "events.jsonl"},
        "output": "model.safetensors",
        "stop_file": "STOP",
    }
    if job.get("preprocessing"):
        spec["preprocessing"] = {k: v for k, v in job["preprocessing"].items() if v}
    return spec


def _model_info(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["aiaas.model"])


def run_distributed_job(job: dict[str, Any], send: Callable[[dict[str, Any]], None], stop: Any) -> int:
    """Run the job under torchrun in the job's directory (the cwd); returns the exit code."""
    directory = Path.cwd()
    try:
        spec = worker_job(job)
    except PermissionError as exc:
        send({"error": str(exc)})
        return 0
    (directory / "worker-job.json").write_text(json.dumps(spec, indent=2))
    for stale in ("STOP", "model.safetensors"):
        (directory / stale).unlink(missing_ok=True)
    events_file = directory / "events.jsonl"
    offset = events_file.stat().st_size if events_file.exists() else 0  # a resumed job reports anew
    workers = int(job["hyperparameters"]["workers"])
    env = dict(os.environ)
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would listen on whatever the hostname resolves to
    process = _procs.popen(
        [sys.executable, "-m", "aiaas_lab.server._distributed_runner", "--nnodes", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", str(job["job_id"]),
         "--local-addr", "127.0.0.1", "--nproc-per-node", str(workers),
         "-m", "aiaas_lab.worker", "worker-job.json"],
        cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=sys.stdout, stderr=sys.stderr)
    ended: dict[str, Any] | None = None
    pending = b""
    stop_written = False
    # torchrun is in its own session: the executor's SIGTERM to this runner's group (the server
    # stopping, a cancel past its grace) never reaches it, and without a handler this process
    # would die at once, leaving torchrun to PDEATHSIG's SIGKILL. So SIGTERM ends the loop and
    # the finally passes it on to torchrun, which stops its ranks. A flag, not an exception: a
    # raise could land inside `send`, halfway through a protocol line.
    terminated: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    try:
        while not terminated:
            if stop.is_set() and not stop_written:
                # Written elsewhere, then renamed: the ranks never read half a reason.
                (directory / "STOP.tmp").write_text(getattr(stop, "reason", "") or "cancelled")
                os.replace(directory / "STOP.tmp", directory / "STOP")
                stop_written = True
            finished = process.poll() is not None
            if events_file.exists():
                with open(events_file, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "run_ended":
                        ended = event  # sent last, after the model
                    else:
                        send({"event": event})
            if finished:
                break
            time.sleep(_POLL_SECONDS)
    finally:
        # torchrun passes the SIGTERM on to its ranks. Within the executor's STOP_GRACE_S (2 s),
        # after which it SIGKILLs this runner and PDEATHSIG takes torchrun down too.
        _procs.stop(process, grace=1.5)
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        return 128 + signal.SIGTERM  # stopped from outside: the executor knows why; nothing to report
    output = directory / "model.safetensors"
    if ended is None:
        # One line for the tenant: a rank's own error when it printed one (the worker writes
        # mistakes as one "aiaas_lab.worker: ..." paragraph); the executor logs the rest.
        reason = _last_worker_error(directory / "worker.log")
        send({"error": f"the distributed job's processes exited ({process.returncode}) without finishing"
                       + (f": {reason}" if reason else "")})
        return 0
    if ended["status"] == "completed":
        if output.exists():
            send({"model": _model_info(output)})
        else:
            ended = {**ended, "status": "failed", "error": "the workers finished without writing the trained weights"}
    send({"event": ended})
    return 0


# A rank that ended well prints "rank R: <status> after N steps with seed S (reason)" last; when
# another rank failed, that line is often the log's last and would hide the failure's reason.
_FINE = re.compile(r"rank \d+: (completed|stopped) after \d+ steps with seed ")


def _last_worker_error(log: Path) -> str:
    try:
        lines = log.read_bytes()[-20000:].decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if "aiaas_lab.worker: " in line:
            said = line.split("aiaas_lab.worker: ", 1)[1].strip()
            if not _FINE.match(said):
                return said
    return ""


def _loopback_stores() -> None:
    """Make every TCPStore this process hosts listen on 127.0.0.1 only (see the module docstring).
    A subclass, so torch's isinstance checks still hold; it hands TCPStore a socket already bound
    to loopback (`master_listen_fd`, torch's own way to supply the listening socket)."""
    import datetime

    import torch.distributed as dist

    base = dist.TCPStore

    class LoopbackTCPStore(base):  # type: ignore[misc, valid-type]
        def __init__(self, host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
                     timeout: datetime.timedelta = datetime.timedelta(seconds=300), wait_for_workers: bool = True,
                     multi_tenant: bool = False, master_listen_fd: int | None = None, use_libuv: bool = True) -> None:
            if is_master and master_listen_fd is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", int(port)))
                sock.listen(512)
                port, master_listen_fd = sock.getsockname()[1], sock.detach()
            super().__init__(host_name, port, world_size, is_master, timeout, wait_for_workers,
                             multi_tenant, master_listen_fd, use_libuv)

    dist.TCPStore = LoopbackTCPStore  # before torch.distributed.run imports the rendezvous backends


def main(argv: list[str] | None = None) -> None:
    """torchrun, with its stores on loopback; its ranks learn its pid to watch."""
    _loopback_stores()
    os.environ[_procs.LAUNCHER_PID_ENV] = str(os.getpid())
    from torch.distributed.run import main as torchrun

    torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
