"""`aiaas_lab.Client` and `AsyncClient` against the real `aiaas-lab serve` process: blobs, jobs,
events (paged, and streamed with SSE and resumed after a dropped connection), models, V2 infer in
JSON and binary, retries, and errors that say what went wrong without ever showing the token.

Connection failures are real too: a TCP proxy between client and server cuts live connections,
refuses new ones, or answers 503 as an overloaded front end would.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
import torch

from aiaas_lab import AiaasError, AsyncClient, Client
from aiaas_lab.client.client import RemoteError
from aiaas_lab.engine.data import Normalizer
from aiaas_lab.engine.datasets import load_builtin_dataset
from aiaas_lab.engine.events import EpochEnd, RunEnded, RunStarted, StepEnd
from aiaas_lab.engine.models import build_model

from server_fixtures import ServerProcess, aiaas_server  # noqa: F401 - the fixture

DIGITS_JOB = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "val": 0.2,
              "hyperparameters": {"epochs": 2, "seed": 0, "normalize": True}}


class Proxy:
    """A TCP proxy to `port` on 127.0.0.1 that can cut every open connection (`drop()`), close
    the next connections at once (`refuse`), or answer them with 503 (`busy`)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.refuse = 0
        self.busy = 0
        self.connections = 0
        self.upstream_bytes = 0
        self.requests: list[bytes] = []  # the first bytes of each forwarded connection
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                if self.refuse:
                    self.refuse -= 1
                    conn.close()
                    continue
                if self.busy:
                    self.busy -= 1
                    threading.Thread(target=self._answer_503, args=(conn,), daemon=True).start()
                    continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._open += [conn, upstream]
            threading.Thread(target=self._pipe, args=(conn, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, conn, False), daemon=True).start()

    def _answer_503(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 0\r\n"
                     b"Connection: close\r\n\r\n")
        conn.close()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        first = True
        try:
            while chunk := source.recv(65536):
                if upstream:
                    with self._lock:
                        self.upstream_bytes += len(chunk)
                        if first:
                            self.requests.append(chunk[:2000])
                first = False
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drop(self) -> None:
        """Cut every open connection, as a restarting load balancer or a flaky network would."""
        with self._lock:
            sockets, self._open = self._open, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.drop()


@pytest.fixture
def proxy(aiaas_server: ServerProcess):  # noqa: F811
    p = Proxy(aiaas_server.port)
    yield p
    p.close()


@pytest.fixture(scope="module")
def client(aiaas_server: ServerProcess):  # noqa: F811
    with Client(aiaas_server.url, aiaas_server.token) as c:
        yield c


@pytest.fixture(scope="module")
def finished_job(client: Client) -> dict[str, Any]:
    job = client.create_job({**DIGITS_JOB, "name": "digits-client"})
    events = list(client.stream_events(job["id"]))
    return {"job": client.get_job(job["id"]), "events": events}


def test_the_token_is_in_no_repr_and_no_error(aiaas_server: ServerProcess) -> None:  # noqa: F811
    token = aiaas_server.token
    client = Client(aiaas_server.url, token)
    assert token not in repr(client) and "<set>" in repr(client)
    with Client(aiaas_server.url, token + "-wrong") as wrong, pytest.raises(RemoteError) as info:
        wrong.list_jobs()
    assert info.value.status == 401 and "rejected the token" in str(info.value)
    assert token not in str(info.value)
    with Client(aiaas_server.url, token, retries=0) as c, pytest.raises(RemoteError) as info:
        c.get_job(token)  # even a server echoing what it was sent cannot leak the token
    assert info.value.status == 404 and token not in str(info.value)
    client.close()


def test_token_from_the_environment_and_a_missing_token(aiaas_server: ServerProcess,  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIAAS_TOKEN", aiaas_server.token)
    with Client(aiaas_server.url) as c:
        assert c.server_info()["name"] == "aiaas-lab"
    monkeypatch.delenv("AIAAS_TOKEN")
    with Client(aiaas_server.url) as c, pytest.raises(RemoteError) as info:
        c.server_info()
    assert info.value.status == 401
    assert str(info.value) == (f"The server at {aiaas_server.url} needs a token: pass token=..., set the AIAAS_TOKEN "
                               f"environment variable, or run %aiaas connect {aiaas_server.url} --token TOKEN.")
    with Client(aiaas_server.url) as c:
        assert c.ready() is True  # health needs no token


def test_unreachable_server_is_one_clear_error_after_backoff() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with Client(f"http://127.0.0.1:{port}", "t", retries=2) as c:
        t0 = time.monotonic()
        with pytest.raises(AiaasError) as info:
            c.list_jobs()
        elapsed = time.monotonic() - t0
    assert str(info.value) == (f"Cannot reach the server at http://127.0.0.1:{port} after 3 attempts: connection "
                               "refused. Is it running (aiaas-lab serve), and is the URL right?")
    assert 0.1 < elapsed < 5  # it backed off between attempts, briefly


def test_a_bad_url_names_the_argument() -> None:
    with pytest.raises(AiaasError, match=r"^--backend: expected an http:// or https:// URL, but found 'localhost:8000'\.$"):
        Client("localhost:8000")


def test_upload_sends_only_what_the_server_lacks(client: Client, proxy: Proxy, aiaas_server: ServerProcess) -> None:  # noqa: F811
    X = torch.randn(2000, 32)
    y = torch.randint(0, 3, (2000,))
    with Client(proxy.url, aiaas_server.token) as c:
        first = c.upload_tensors({"X": X, "y": y})
        sent = proxy.upstream_bytes
        second = c.upload_tensors({"X": X.clone(), "y": y.clone()})
        again = proxy.upstream_bytes - sent
    assert first.uploaded and not second.uploaded and first.sha256 == second.sha256
    assert sent > first.size > 2000 * 32 * 4
    assert again < 1000  # one HEAD request, no body


def test_job_lifecycle_events_and_model(client: Client, finished_job: dict[str, Any]) -> None:
    job, events = finished_job["job"], finished_job["events"]
    assert job["status"] == "succeeded" and job["model"] == {"name": "digits-client", "version": 1}
    ids = [i for i, _ in events]
    assert ids == list(range(1, len(ids) + 1))  # consecutive, none lost or repeated
    kinds = [e for _, e in events]
    assert isinstance(kinds[0], RunStarted) and isinstance(kinds[-1], RunEnded) and kinds[-1].status == "completed"
    assert [e.epoch for e in kinds if isinstance(e, EpochEnd)] == [1, 2]
    assert any(isinstance(e, StepEnd) for e in kinds)
    # paged history, three at a time, gives exactly the streamed events
    assert client.events(job["id"], limit=3) == events
    assert client.events(job["id"], after=len(events) - 1) == events[-1:]
    assert job["id"] in [j["id"] for j in client.list_jobs()]
    assert any(m["name"] == "digits-client" for m in client.models())


def test_idempotency_key_returns_the_same_job(client: Client) -> None:
    body = {**DIGITS_JOB, "hyperparameters": {"epochs": 1, "seed": 1}}
    a = client.create_job(body, idempotency_key="same-key-1")
    b = client.create_job(body, idempotency_key="same-key-1")
    c = client.create_job(body)
    assert a["id"] == b["id"] != c["id"]
    for job_id in (a["id"], c["id"]):
        client.cancel_job(job_id)


def test_weights_rebuild_the_model_and_infer_matches_in_json_and_binary(client: Client,
                                                                        finished_job: dict[str, Any]) -> None:
    weights = client.model_weights("digits-client", 1)
    assert weights.info["spec"]["name"] == "mlp" and weights.info["normalizer"] is not None
    net = build_model(weights.info["spec"])
    net.load_state_dict(weights.state_dict)
    norm = Normalizer(torch.tensor(weights.info["normalizer"]["mean"]), torch.tensor(weights.info["normalizer"]["std"]))
    X, _ = load_builtin_dataset("digits")
    with torch.no_grad():
        local = net.eval()(norm(X[:64]))
    as_json = client.infer("digits-client", X[:64], binary=False)
    as_binary = client.infer("digits-client", X[:64], binary=True)
    chosen = client.infer("digits-client", X[:64], version=1)  # the server advertises binary
    assert "binary_tensor_data" in client.server_info()["extensions"]
    torch.testing.assert_close(as_json, local, atol=1e-5, rtol=1e-5)
    assert torch.equal(as_binary, chosen)
    torch.testing.assert_close(as_binary, local, atol=1e-5, rtol=1e-5)
    meta = client.model_metadata("digits-client")
    assert meta["inputs"][0]["shape"] == [-1, 64] and meta["outputs"][0]["shape"] == [-1, 10]


def test_unknown_job_and_model_are_404_errors(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.get_job("job-does-not-exist")
    assert info.value.status == 404 and "GET /v1/jobs/job-does-not-exist (404)" in str(info.value)
    with pytest.raises(RemoteError) as info:
        client.infer("no-such-model", torch.zeros(1, 64))
    assert info.value.status == 404


def test_event_stream_resumes_after_a_dropped_connection_and_cancel_stops_the_job(proxy: Proxy, aiaas_server: ServerProcess,  # noqa: F811
                                                         client: Client) -> None:
    job = client.create_job({"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
                             "hyperparameters": {"epochs": 300, "seed": 2}})
    received: list[tuple[int, Any]] = []
    drops = 0
    with Client(proxy.url, aiaas_server.token) as through_proxy:
        for frame in through_proxy.stream_events(job["id"]):
            received.append(frame)
            epochs = sum(isinstance(e, EpochEnd) for _, e in received)
            if epochs in (1, 2) and drops < epochs:
                drops += 1
                proxy.drop()  # mid-stream, while the job runs
            if epochs == 3 and not any(isinstance(e, RunEnded) for _, e in received):
                client.cancel_job(job["id"])
    ids = [i for i, _ in received]
    assert drops == 2
    assert ids == list(range(1, len(ids) + 1))  # resumed exactly after the last id seen
    assert received == client.events(job["id"])
    assert isinstance(received[-1][1], RunEnded) and received[-1][1].status == "stopped"
    resumed = [r for r in proxy.requests if b"GET /v1/jobs/" in r and b"last-event-id:" in r.lower()]
    assert len(resumed) >= 2
    final = client.get_job(job["id"])
    assert final["status"] == "cancelled" and final["model"] is None  # a cancelled job registers no model
    assert client.cancel_job(job["id"])["status"] == "cancelled"  # cancel is idempotent


def test_retries_dropped_connections_and_503(proxy: Proxy, aiaas_server: ServerProcess) -> None:  # noqa: F811
    with Client(proxy.url, aiaas_server.token, retries=3) as c:
        proxy.refuse = 2
        assert c.server_info()["name"] == "aiaas-lab"
        assert proxy.connections == 3
        proxy.busy = 2
        proxy.drop()  # the kept-alive connection dies too
        assert isinstance(c.list_jobs(), list)
        assert proxy.connections == 6
        proxy.busy = 4  # more 503s than retries: the last answer stands
        proxy.drop()
        with pytest.raises(RemoteError) as info:
            c.list_jobs()
        assert info.value.status == 503 and proxy.connections == 10


def test_async_client_does_the_same(aiaas_server: ServerProcess, finished_job: dict[str, Any]) -> None:  # noqa: F811
    X, _ = load_builtin_dataset("digits")

    async def run() -> tuple[list[Any], list[torch.Tensor], dict[str, Any]]:
        async with AsyncClient(aiaas_server.url, aiaas_server.token) as c:
            assert repr(c).startswith("AsyncClient(") and aiaas_server.token not in repr(c)
            job = await c.create_job({**DIGITS_JOB, "hyperparameters": {"epochs": 1, "seed": 4}})
            events = [frame async for frame in c.stream_events(job["id"])]
            outputs = await asyncio.gather(*(c.infer("digits-client", X[i:i + 10], binary=b)
                                             for i, b in ((0, True), (10, False), (20, True))))
            return events, list(outputs), await c.get_job(job["id"])

    events, outputs, job = asyncio.run(run())
    assert job["status"] == "succeeded"
    assert [i for i, _ in events] == list(range(1, len(events) + 1)) and isinstance(events[-1][1], RunEnded)
    with Client(aiaas_server.url, aiaas_server.token) as c:
        torch.testing.assert_close(torch.cat(outputs), c.infer("digits-client", X[:30]))
