"""Serving the digits MLP: aiaas-lab's server against MLServer, side by side in one run.

    .venv/bin/python bench/serve.py [--seconds 4] [--rounds 3] [--clients 1,8,32] [--jobs 5] [--gap 10]
        [--baseline GIT_REV] [--no-mlserver]

1. Starts `aiaas-lab serve` pinned to core 0 and trains the built-in MLP on digits through the
   client; measures the time from `POST /v1/jobs` to the job's first event and first step event
   (target < 1 s), over a few jobs.
2. Serves the trained weights (fetched from the server, so the very same model) with MLServer 1.7
   (its own environment, see tests/mlserver_env.py), also pinned to core 0.
3. Loads each server in turn from core 1 with a raw-socket HTTP/1.1 keep-alive load generator (one
   row per V2 infer request, JSON): an httpx load generator costs 2-7 ms of CPU per request here
   and would measure itself. Prints requests/s and p50/p99 latency at 1, 8 and 32 concurrent
   clients, and the ratios ours / MLServer.

`--baseline REV` also serves the same weights with aiaas-lab as of that git revision (its files
from `git archive`, on this environment), so a change to the server is measured before/after in
one run, the servers alternating; `--no-mlserver` leaves MLServer out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mlserver_env import free_port, start_mlserver, stop, write_repository  # noqa: E402

from aiaas_lab.client.client import Client  # noqa: E402
from aiaas_lab.engine.datasets import load_builtin_dataset  # noqa: E402
from aiaas_lab.engine.events import RunStarted, StepEnd  # noqa: E402

SERVER_CPU, CLIENT_CPU = "0", 1


def start_ours(data_dir: Path, port: int, token: str, source: Path | None = None) -> subprocess.Popen[bytes]:
    command = ["taskset", "-c", SERVER_CPU, sys.executable, "-m", "aiaas_lab", "serve", "--port", str(port),
               "--token", token, "--data-dir", str(data_dir), "--max-jobs", "1"]
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - open for the process's lifetime
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None  # another revision's package first
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=source)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((data_dir / "server.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("aiaas-lab serve did not become ready in 60 s")


def time_to_first_events(client: Client, jobs: int, epochs: int, gap: float) -> tuple[list[float], list[float], str]:
    """Seconds from POST /v1/jobs to the first event and to the first step event, per job. Jobs
    are `gap` seconds apart: the server keeps a warm worker process for the next job, and a job
    that arrives before it has started (torch takes seconds to import) waits for it."""
    first_event, first_step, name = [], [], "digits-mlp"
    for i in range(jobs):
        time.sleep(gap if i else 0)
        body = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "val": 0.2,
                "hyperparameters": {"epochs": epochs, "seed": i, "normalize": True}, "name": name}
        t0 = time.perf_counter()
        job = client.create_job(body)
        t_event = t_step = None
        for _, event in client.stream_events(job["id"]):
            now = time.perf_counter() - t0
            if t_event is None and isinstance(event, RunStarted):
                t_event = now
            if t_step is None and isinstance(event, StepEnd):
                t_step = now
        final = client.get_job(job["id"])
        if final["status"] != "succeeded":
            raise RuntimeError(f"training job failed: {final.get('error')}")
        first_event.append(t_event or float("nan"))
        first_step.append(t_step or float("nan"))
    return first_event, first_step, name


def _request(path: str, host: str, port: int, body: bytes, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _worker(port: int, request: bytes, until: float, warm_until: float, latencies: list[float],
                  errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= until:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = None
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError("response without Content-Length: " + head[:200].decode(errors="replace"))
            await reader.readexactly(length)
            if head[9:12] != b"200":
                errors.append(int(head[9:12]))
            if t0 >= warm_until:
                latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def _load(port: int, request: bytes, clients: int, seconds: float, warmup: float) -> tuple[float, float, float, int]:
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    warm_until, until = start + warmup, start + warmup + seconds
    await asyncio.gather(*(_worker(port, request, until, warm_until, latencies, errors) for _ in range(clients)))
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1e3
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3
    return len(latencies) / seconds, p50, p99, len(errors)


def infer_once(url: str, path: str, body: bytes, token: str | None) -> list[float]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    response = httpx.post(url + path, content=body, headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()["outputs"][0]["data"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per point, servers alternating")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--jobs", type=int, default=5, help="training jobs timed to their first event")
    parser.add_argument("--gap", type=float, default=10.0, help="seconds between those jobs")
    parser.add_argument("--baseline", metavar="GIT_REV", help="also serve with aiaas-lab as of this revision")
    parser.add_argument("--no-mlserver", action="store_true", help="leave MLServer out")
    opts = parser.parse_args()
    concurrency = [int(c) for c in opts.clients.split(",")]

    os.sched_setaffinity(0, {CLIENT_CPU})  # this process is the client; the servers get core 0
    workdir = Path(tempfile.mkdtemp(prefix="aiaas-bench-serve-"))
    token = secrets.token_urlsafe(24)
    ours_port, ml_port = free_port(), free_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        (workdir / "data").mkdir()
        processes.append(start_ours(workdir / "data", ours_port, token))
        ours = f"http://127.0.0.1:{ours_port}"
        with Client(ours, token) as client:
            first_event, first_step, name = time_to_first_events(client, opts.jobs, epochs=3, gap=opts.gap)
        weights = httpx.get(f"{ours}/v1/models/{name}/weights", headers={"Authorization": f"Bearer {token}"},
                            timeout=30).raise_for_status().content
        later = first_event[1:] or first_event
        print(f"POST /v1/jobs -> first event (run_started), ms: first job after start {first_event[0] * 1e3:.0f}; "
              f"then, {opts.gap:g} s apart: median {statistics.median(later) * 1e3:.0f}, max {max(later) * 1e3:.0f} "
              f"(target < 1000)")
        print(f"POST /v1/jobs -> first step event, ms: {', '.join(f'{t * 1e3:.0f}' for t in first_step)}")

        targets = {"aiaas-lab": (ours_port, f"/v2/models/{name}/infer", token)}
        if not opts.no_mlserver:
            write_repository(workdir / "mlserver", {name: weights}, port=ml_port)
            processes.append(start_mlserver(workdir / "mlserver", ml_port, [name], cpu=SERVER_CPU))
            targets["MLServer"] = (ml_port, f"/v2/models/{name}/infer", None)
        if opts.baseline:
            source, base_port = workdir / "baseline", free_port()
            source.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", opts.baseline], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
            (workdir / "data-baseline").mkdir()
            processes.append(start_ours(workdir / "data-baseline", base_port, token, source))
            with Client(f"http://127.0.0.1:{base_port}", token) as client:
                time_to_first_events(client, 1, epochs=3, gap=0)
            targets[opts.baseline[:10]] = (base_port, f"/v2/models/{name}/infer", token)

        X, _ = load_builtin_dataset("digits")
        row = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": X[0].tolist()}]}
        body = json.dumps(row).encode()
        answers = {k: infer_once(f"http://127.0.0.1:{p}", path, body, t) for k, (p, path, t) in targets.items()}
        if "MLServer" in answers:
            diff = max(abs(a - b) for a, b in zip(answers["aiaas-lab"], answers["MLServer"]))
            print(f"same model on both servers: max |difference| of the outputs {diff:.2e}")

        print(f"\nV2 infer, 1 row per request, JSON; servers on core {SERVER_CPU}, load generator on core {CLIENT_CPU}; "
              f"{opts.seconds:g} s per point after {opts.warmup:g} s warm-up; {opts.rounds} rounds, the servers "
              "alternating, median of the rounds shown")
        print(f"{'clients':>7}  {'server':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for clients in concurrency:
            runs: dict[str, list[tuple[float, float, float, int]]] = {label: [] for label in targets}
            for _ in range(opts.rounds):
                for label, (port, path, tok) in targets.items():
                    request = _request(path, "127.0.0.1", port, body, tok)
                    runs[label].append(asyncio.run(_load(port, request, clients, opts.seconds, opts.warmup)))
            medians = {label: [statistics.median(r[i] for r in rounds) for i in range(3)] + [sum(r[3] for r in rounds)]
                       for label, rounds in runs.items()}
            for label, (rps, p50, p99, errors) in medians.items():
                print(f"{clients:>7}  {label:<10.10} {rps:>8.0f} {p50:>8.2f} {p99:>8.2f} {errors:>6}")
            ours_r = medians["aiaas-lab"]
            for other in [label for label in medians if label != "aiaas-lab"]:
                ml_r = medians[other]
                print(f"{'':>7}  ours/{other}: throughput {ours_r[0] / ml_r[0]:.2f}x, p50 {ours_r[1] / ml_r[1]:.2f}x, "
                      f"p99 {ours_r[2] / ml_r[2]:.2f}x")
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
