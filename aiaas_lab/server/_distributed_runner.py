"""A `workers > 1` job: the runner hands it to torchrun, through the same entry point a user
runs on a cluster (`torchrun ... -m aiaas_lab.worker JOB.json`), and relays what rank 0 reports.

The runner stays the one process the executor knows: it speaks the same line protocol on its
channel ({"event"}, {"model"}, {"error"}), turns the executor's cancel (its stop flag) into the
worker's stop file, and reads rank 0's events from the JSON-lines file the worker appends to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_distributed_job", "worker_job"]

_POLL_SECONDS = 0.05  # how often the events file is read: well under the widget's 10 updates/s


def worker_job(job: dict[str, Any]) -> dict[str, Any]:
    """The `aiaas_lab.worker` job description (its module docstring) for a server job."""
    h = job["hyperparameters"]
    model_ref = job["model"]
    if "builtin" in model_ref:
        model: dict[str, Any] = {"name": model_ref["builtin"], **({"config": model_ref["config"]} if model_ref.get("config") else {})}
    elif "export" in model_ref:
        model = {"export": dict(model_ref["export"])}
    else:
        if not job.get("allow_code"):
            raise PermissionError("model.pickle: this server does not run models sent as code.")
        model = {"pickle": model_ref["pickle"]}
    data = job["data"]
    val = job["val"]
    config = {key: h[key] for key in ("epochs", "batch_size", "lr", "optimizer", "loss", "weight_decay",
                                      "grad_accum", "clip", "patience", "seed")}
    # A sharded model checkpoints per rank; the worker refuses it, so a sharded job restarts from scratch.
    if not h["shard"]:
        config.update(checkpoint="checkpoint", resume=True)
    return {
        "run_id": job["job_id"],
        "model": model,
        "data": data["builtin"] if "builtin" in data else data["tensors"],
        "val": val["tensors"] if isinstance(val, dict) else val,
        "normalize": h["normalize"],
        "config": config,
        "shard": h["shard"],
        "threads": int(job.get("threads", 1)),
        "events": {"file": "events.jsonl"},
        "output": "model.safetensors",
        "stop_file": "STOP",
    }


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
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc-per-node", str(workers), "-m", "aiaas_lab.worker", "worker-job.json"],
        cwd=directory, stdin=subprocess.DEVNULL, stdout=sys.stdout, stderr=sys.stderr)
    ended: dict[str, Any] | None = None
    pending = b""
    stop_written = False
    try:
        while True:
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
        if process.poll() is None:
            process.kill()
            process.wait()
    output = directory / "model.safetensors"
    if ended is None:
        from ._executor import _log_tail

        tail = _log_tail(directory / "worker.log")
        send({"error": f"the distributed job's processes exited ({process.returncode}) without finishing{tail}"})
        return 0
    if ended["status"] == "completed":
        if output.exists():
            send({"model": _model_info(output)})
        else:
            ended = {**ended, "status": "failed", "error": "the workers finished without writing the trained weights"}
    send({"event": ended})
    return 0
