"""`workers > 1` jobs on the server: launched through torchrun and `aiaas_lab.worker`, the same
entry point a cluster runs, with rank 0's events relayed into the job's stream."""

from __future__ import annotations

import time

import psutil
import torch
from server_fixtures import (  # noqa: F401
    ServerProcess,
    aiaas_server,
    all_events,
    infer_json,
    sse_frames,
    wait_for,
)

from aiaas_lab.engine.datasets import load_builtin_dataset


def test_a_two_worker_job_trains_registers_and_serves(aiaas_server: ServerProcess) -> None:
    body = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "val": 0.2, "name": "ddp-mlp",
            "hyperparameters": {"epochs": 3, "normalize": True, "seed": 1, "workers": 2, "batch_size": 32}}
    with aiaas_server.client() as client:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job = wait_for(client, response.json()["id"], timeout=180)
        assert job["status"] == "succeeded", (job, aiaas_server.log())
        assert job["hyperparameters"]["workers"] == 2 and job["model"] == {"name": "ddp-mlp", "version": 1}
        events = all_events(client, job["id"])
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))
        kinds = [e["event"]["type"] for e in events]
        assert kinds[0] == "run_started" and kinds[-1] == "run_ended" and kinds.count("epoch_end") == 3
        started = events[0]["event"]
        # Global numbers, not one rank's shard: every training sample is counted once.
        assert started["train_samples"] + started["val_samples"] == 1797
        assert job["metrics"]["val_accuracy"] > 0.8
        X, y = load_builtin_dataset("digits")
        out = infer_json(client, "ddp-mlp", X[:50])
        assert out.status_code == 200, out.text
        predicted = torch.tensor(out.json()["outputs"][0]["data"]).reshape(50, 10).argmax(1)
        assert (predicted == y[:50]).float().mean() > 0.8


def test_cancel_reaches_every_rank_and_leaves_no_process(aiaas_server: ServerProcess) -> None:
    body = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
            "hyperparameters": {"epochs": 500, "batch_size": 16, "workers": 2}}
    with aiaas_server.client() as client:
        job = client.post("/v1/jobs", json=body).json()
        for frame in sse_frames(client, job["id"], timeout=180):
            if frame["event"] == "epoch_end":
                break
        started = [p for p in _descendants(aiaas_server) if "aiaas_lab.worker" in p.cmdline()[:4]]
        assert len(started) == 2, [p.cmdline() for p in started]
        t0 = time.monotonic()
        client.post(f"/v1/jobs/{job['id']}/cancel")
        final = wait_for(client, job["id"], timeout=60)
        assert final["status"] == "cancelled" and time.monotonic() - t0 < 30
        ended = all_events(client, job["id"])[-1]["event"]
        assert ended["type"] == "run_ended" and ended["status"] == "stopped"
    deadline = time.monotonic() + 20
    while (left := [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [p.cmdline() for p in left]


def _descendants(server: ServerProcess) -> list[psutil.Process]:
    """What the server started, from its pid: never a scan of the machine's processes."""
    return psutil.Process(server.process.pid).children(recursive=True)


def test_the_rendezvous_and_every_port_of_a_job_listen_on_loopback_only(aiaas_server: ServerProcess) -> None:
    import socket

    body = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
            "hyperparameters": {"epochs": 500, "batch_size": 16, "workers": 2}}
    with aiaas_server.client() as client:
        job = client.post("/v1/jobs", json=body).json()
        for frame in sse_frames(client, job["id"], timeout=180):
            if frame["event"] == "step":
                break
        listening = []
        for proc in _descendants(aiaas_server):
            try:
                listening += [(proc.cmdline()[2:4], c.laddr) for c in proc.net_connections("inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                pass
        client.post(f"/v1/jobs/{job['id']}/cancel")
        assert wait_for(client, job["id"], timeout=60)["status"] == "cancelled"
    agent = [addr for cmd, addr in listening if "_distributed_runner" in " ".join(cmd)]
    assert len(agent) >= 1, listening  # torchrun's rendezvous store (and the store it shares with the ranks)
    assert all(addr.ip in ("127.0.0.1", "::1") for _, addr in listening), listening
    # Not reachable through any other address of this machine either.
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for ip in others[:2]:
        for port in {addr.port for addr in agent}:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((ip, port)) != 0, (ip, port)


def test_the_reason_a_distributed_job_failed_is_not_hidden_by_another_rank_s_summary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Rank 1 often writes its summary after rank 0's error: the error is the reason told."""
    from aiaas_lab.server._distributed_runner import _last_worker_error

    log = tmp_path / "worker.log"
    log.write_text("[rank0]: Traceback (most recent call last):\n"
                   "aiaas_lab.worker: rank 0: model.export.weights: expected a tensor named 'lin.bias', but found none\n"
                   "aiaas_lab.worker: rank 1: stopped after 3 steps with seed 7 (another rank failed)\n"
                   "aiaas_lab.worker: rank 2: completed after 9 steps with seed 7\n"
                   "W torchrun: sending SIGTERM\n")
    assert _last_worker_error(log) == "rank 0: model.export.weights: expected a tensor named 'lin.bias', but found none"
    log.write_text("aiaas_lab.worker: rank 1: stopped after 3 steps with seed 7 (stop file)\n")
    assert _last_worker_error(log) == ""
