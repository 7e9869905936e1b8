"""The server app in-process (httpx's ASGITransport, no sockets): auth, tenants, size limits,
blobs, request validation, idempotency and error shapes. Jobs are accepted but not run here
(max_jobs=0); tests/test_server.py runs them in the real server process."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save

from aiaas_lab.server import ServerConfig, create_app

pytestmark = pytest.mark.anyio

ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def serving(data_dir: Path, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    config = ServerConfig(data_dir=data_dir, tokens={ALICE: "alice", BOB: "bob"}, max_jobs=0, **options)
    app = create_app(config)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://aiaas.test",
                                     headers={"Authorization": f"Bearer {ALICE}"}) as client:
            yield client


def as_bob() -> dict[str, str]:
    return {"Authorization": f"Bearer {BOB}"}


def tensors_blob(n: int = 20, features: int = 4) -> tuple[str, bytes]:
    X = torch.randn(n, features)
    data = save({"X": X, "y": (X[:, 0] > 0).long()})
    return hashlib.sha256(data).hexdigest(), data


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


async def test_every_endpoint_but_health_needs_a_valid_token(tmp_path: Path) -> None:
    async with serving(tmp_path) as client:
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert (await client.get(path, headers={"Authorization": ""})).status_code == 200
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/models"), ("GET", "/v2"),
                             ("HEAD", "/v1/data/" + "0" * 64), ("GET", "/v2/models/m"), ("GET", "/nowhere")):
            for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ALICE}"},
                            {"Authorization": f"Bearer {ALICE}x"}):
                response = await client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    assert "token" in response.json()["error"] or "Authorization" in response.json()["error"]
        assert (await client.get("/v2")).json() == {"name": "aiaas-lab", "version": "0.1.0",
                                                     "extensions": ["binary_tensor_data"]}
        assert (await client.get("/v1/jobs", headers=as_bob())).status_code == 200


async def test_insecure_server_takes_requests_without_a_token(tmp_path: Path) -> None:
    app = create_app(ServerConfig(data_dir=tmp_path, tokens={}, max_jobs=0))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://aiaas.test") as client:
            assert (await client.get("/v1/jobs")).json() == {"object": "list", "data": []}


async def test_blobs_are_checked_and_belong_to_their_tenant(tmp_path: Path) -> None:
    sha, data = tensors_blob()
    async with serving(tmp_path) as client:
        assert (await client.head(f"/v1/data/{sha}")).status_code == 404
        response = await client.put(f"/v1/data/{sha}", content=data)
        assert response.status_code == 201 and response.json() == {"sha256": sha, "size": len(data)}
        assert (await client.put(f"/v1/data/{sha}", content=data)).status_code == 200
        head = await client.head(f"/v1/data/{sha}")
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
        # Another tenant does not see it, even knowing the hash, and stores its own copy.
        assert (await client.head(f"/v1/data/{sha}", headers=as_bob())).status_code == 404
        assert (await client.put(f"/v1/data/{sha}", content=data, headers=as_bob())).status_code == 201

        other = hashlib.sha256(b"something else").hexdigest()
        assert_error(await client.put(f"/v1/data/{other}", content=data), 400, "sha256", "not stored")
        assert (await client.head(f"/v1/data/{other}")).status_code == 404
        assert_error(await client.put("/v1/data/not-a-hash", content=data), 400, "64 hex digits")
        assert list((tmp_path / "blobs").rglob("*.part")) == []  # nothing half-written is left behind


async def test_request_bodies_over_the_limit_get_413(tmp_path: Path) -> None:
    async with serving(tmp_path, max_upload_mb=0.01) as client:
        big = b"x" * 20_000
        sha = hashlib.sha256(big).hexdigest()
        assert_error(await client.put(f"/v1/data/{sha}", content=big), 413, "--max-upload-mb")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(20):
                yield b"x" * 1000

        assert_error(await client.put(f"/v1/data/{sha}", content=chunks()), 413, "limit")
        assert (await client.head(f"/v1/data/{sha}")).status_code == 404
        assert_error(await client.post("/v1/jobs", content=b"{" + b" " * 20_000 + b"}"), 413)
        small = b"y" * 5000
        assert (await client.put(f"/v1/data/{hashlib.sha256(small).hexdigest()}", content=small)).status_code == 201


JOB = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "hyperparameters": {"epochs": 2}}


@pytest.mark.parametrize("body, words", [
    (b"", ["empty"]),
    (b"{not json", ["not valid JSON"]),
    (b"[1, 2]", ["JSON object", "list"]),
    (json.dumps({**JOB, "extra": 1}).encode(), ["the request body", "unknown field 'extra'"]),
    (json.dumps({"data": {"builtin": "digits"}}).encode(), ["the request body", "'model' field"]),
    (json.dumps({**JOB, "model": {"builtin": "resnet"}}).encode(), ["model.builtin", "mlp", "'resnet'"]),
    (json.dumps({**JOB, "model": "mlp"}).encode(), ["model", "builtin"]),
    (json.dumps({**JOB, "model": {"builtin": "mlp", "config": {"hidden": [0]}}}).encode(), ["model.config.hidden"]),
    (json.dumps({**JOB, "model": {"builtin": "cnn", "config": {"hidden": [8]}}}).encode(), ["only the mlp"]),
    (json.dumps({**JOB, "model": {"builtin": "mlp", "config": {"input_shape": 5}}}).encode(), ["model.config.input_shape", "5"]),
    (json.dumps({**JOB, "data": {"builtin": "mnist"}}).encode(), ["data.builtin", "digits"]),
    (json.dumps({**JOB, "data": {"tensors": "0" * 64}}).encode(), ["data.tensors", "has not been uploaded"]),
    (json.dumps({**JOB, "data": {"tensors": "xyz"}}).encode(), ["64 hex digits"]),
    (json.dumps({**JOB, "val": 1.5}).encode(), ["val", "fraction"]),
    (json.dumps({**JOB, "val": "some"}).encode(), ["val"]),
    (json.dumps({**JOB, "name": "bad name!"}).encode(), ["name"]),
    (json.dumps({**JOB, "hyperparameters": {"epochs": 0}}).encode(), ["--epochs", "positive whole number", "0"]),
    (json.dumps({**JOB, "hyperparameters": {"epochs": "5"}}).encode(), ["--epochs", "'5'"]),
    (json.dumps({**JOB, "hyperparameters": {"epochs": True}}).encode(), ["--epochs", "True"]),
    (json.dumps({**JOB, "hyperparameters": {"epochs": 2.5}}).encode(), ["--epochs", "2.5"]),
    (json.dumps({**JOB, "hyperparameters": {"lr": -1}}).encode(), ["--lr", "positive number", "-1"]),
    (json.dumps({**JOB, "hyperparameters": {"optimizer": "adamm"}}).encode(), ["--optimizer", "adam", "Did you mean"]),
    (json.dumps({**JOB, "hyperparameters": {"normalize": 1}}).encode(), ["--normalize", "true or false"]),
    (json.dumps({**JOB, "hyperparameters": {"epoch": 5}}).encode(), ["--epoch", "unknown", "Did you mean '--epochs'"]),
    (json.dumps({**JOB, "hyperparameters": [1]}).encode(), ["hyperparameters", "object"]),
    (json.dumps({**JOB, "hyperparameters": {"patience": 2}}).encode(), ["patience", "validation"]),
    (json.dumps({**JOB, "hyperparameters": {"workers": 64}}).encode(), ["--workers", "from 1 to 16", "64"]),
    (json.dumps({**JOB, "hyperparameters": {"shard": True}}).encode(), ["--shard", "--workers 2 or more"]),
    (json.dumps({**JOB, "model": {"pickle": "0" * 64}}).encode(), ["--allow-code"]),
    (json.dumps({**JOB, "model": {"export": {"graph": "0" * 64}}}).encode(), ["model.export"]),
])
async def test_bad_job_requests_get_400_naming_the_problem(tmp_path: Path, body: bytes, words: list[str]) -> None:
    async with serving(tmp_path) as client:
        assert_error(await client.post("/v1/jobs", content=body), 400, *words)
        assert (await client.get("/v1/jobs")).json()["data"] == []


async def test_data_blobs_must_be_safetensors_with_X_and_y(tmp_path: Path) -> None:
    async with serving(tmp_path) as client:
        for data, words in ((b"plain bytes, not safetensors", ["not one"]),
                            (save({"features": torch.zeros(3, 2)}), ["X and y", "features"]),
                            (save({"X": torch.zeros(3, 2), "y": torch.zeros(4)}), ["same number of rows"])):
            sha = hashlib.sha256(data).hexdigest()
            await client.put(f"/v1/data/{sha}", content=data)
            assert_error(await client.post("/v1/jobs", json={**JOB, "data": {"tensors": sha}}), 400, *words)
        sha, data = tensors_blob()
        await client.put(f"/v1/data/{sha}", content=data, headers=as_bob())  # bob's, not alice's
        assert_error(await client.post("/v1/jobs", json={**JOB, "data": {"tensors": sha}}), 400, "has not been uploaded")


async def test_jobs_are_created_listed_newest_first_and_private(tmp_path: Path) -> None:
    sha, data = tensors_blob()
    async with serving(tmp_path) as client:
        await client.put(f"/v1/data/{sha}", content=data)
        first = await client.post("/v1/jobs", json={**JOB, "data": {"tensors": sha}, "val": 0.25, "name": "m.v1"})
        assert first.status_code == 201
        job = first.json()
        assert job["object"] == "training.job" and job["status"] == "queued" and job["id"].startswith("job-")
        assert job["started_at"] is None and job["finished_at"] is None and job["error"] is None
        assert job["metrics"] == {} and job["model"] is None and isinstance(job["created_at"], float)
        # Every option of the one job schema, as the request gave it (None: the documented default,
        # resolved when the job runs); the seed is drawn once and recorded, as train() does.
        from aiaas_lab.engine.job import Hyperparameters

        recorded = dict(job["hyperparameters"])
        assert isinstance(recorded.pop("seed"), int)
        expected = Hyperparameters(epochs=2).to_dict()
        expected.pop("seed")
        assert recorded == expected
        second = (await client.post("/v1/jobs", json={**JOB, "hyperparameters": {"seed": None}})).json()
        assert isinstance(second["hyperparameters"]["seed"], int)  # drawn once, recorded for resumes
        listed = (await client.get("/v1/jobs")).json()
        assert listed["object"] == "list" and [j["id"] for j in listed["data"]] == [second["id"], job["id"]]
        assert (await client.get(f"/v1/jobs/{job['id']}")).json() == job

        assert (await client.get("/v1/jobs", headers=as_bob())).json()["data"] == []
        for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}/cancel"),
                             ("GET", f"/v1/jobs/{job['id']}/events")):
            assert_error(await client.request(method, path, headers=as_bob()), 404, "no job")
        assert_error(await client.get("/v1/jobs/job-nope"), 404, "no job")


async def test_idempotency_key_returns_the_same_job(tmp_path: Path) -> None:
    async with serving(tmp_path) as client:
        key = {"Idempotency-Key": "submit-1"}
        body = {**JOB, "hyperparameters": {"epochs": 2, "seed": None}}
        first = await client.post("/v1/jobs", json=body, headers=key)
        # The same request spelled differently (key order, an explicit default) is the same job.
        again = await client.post("/v1/jobs", headers=key, json={"hyperparameters": {"seed": None, "epochs": 2, "lr": None},
                                                                "data": JOB["data"], "model": JOB["model"]})
        assert first.status_code == 201 and again.status_code == 200 and again.json() == first.json()
        assert_error(await client.post("/v1/jobs", json={**JOB, "hyperparameters": {"epochs": 3}}, headers=key),
                     409, "Idempotency-Key")
        # Keys are per tenant.
        assert (await client.post("/v1/jobs", json=body, headers={**key, **as_bob()})).status_code == 201
        assert len((await client.get("/v1/jobs")).json()["data"]) == 1
        assert_error(await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k" * 300}), 400)


async def test_cancel_of_a_queued_job_ends_it_with_a_run_ended_event(tmp_path: Path) -> None:
    async with serving(tmp_path) as client:
        job = (await client.post("/v1/jobs", json=JOB)).json()
        cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["finished_at"] is not None
        again = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert again.json() == cancelled.json()  # idempotent: a terminal state never changes
        events = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
        assert events["has_more"] is False and [e["id"] for e in events["data"]] == [1]
        ended = events["data"][0]["event"]
        assert ended["type"] == "run_ended" and ended["status"] == "stopped"
        stream = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"})
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.text.startswith("id: 1\nevent: run_ended\ndata: {") and stream.text.endswith("}\n\n")


async def test_unknown_paths_methods_and_parameters_get_json_errors(tmp_path: Path) -> None:
    async with serving(tmp_path) as client:
        assert_error(await client.get("/v1/nothing"), 404, "no endpoint")
        assert_error(await client.delete("/v1/jobs"), 405, "DELETE")
        assert_error(await client.get("/v1/jobs", params={"limit": "lots"}), 400, "limit")
        job = (await client.post("/v1/jobs", json=JOB)).json()
        assert_error(await client.get(f"/v1/jobs/{job['id']}/events", params={"after": "-1"}), 400, "after")
        for odd in ("x", "²", "--5", "٣", "9" * 40):
            header = {"Last-Event-ID": odd.encode()}  # header bytes: latin-1 or UTF-8, as clients send them
            assert_error(await client.get(f"/v1/jobs/{job['id']}/events", headers=header), 400, "Last-Event-ID")
            assert_error(await client.get(f"/v1/jobs/{job['id']}/events", params={"after": odd}), 400, "after")
            assert_error(await client.get(f"/v2/models/none/versions/{odd}"), 400, "version")
        assert_error(await client.get("/v1/models/none/weights"), 404, "no model named 'none'")
        assert (await client.get("/v1/models")).json() == {"object": "list", "data": []}
        for path in ("/v2/models/none", "/v2/models/none/ready", "/v2/models/none/versions/1"):
            assert_error(await client.get(path), 404, "no model")
        assert_error(await client.post("/v2/models/none/infer", json={}), 404, "no model")
        assert_error(await client.get("/v2/models/none/versions/x"), 400, "version")


async def test_live_stream_sends_keepalives_then_ends_with_the_job(tmp_path: Path) -> None:
    import anyio

    app = create_app(ServerConfig(data_dir=tmp_path, tokens={ALICE: "alice"}, max_jobs=0, keepalive_s=0.1))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://aiaas.test",
                                     headers={"Authorization": f"Bearer {ALICE}"}) as client:
            job = (await client.post("/v1/jobs", json=JOB)).json()
            chunks: list[bytes] = []
            finished = anyio.Event()

            async def receive() -> dict[str, Any]:
                await finished.wait()  # the client stays connected until the stream ends
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.body":
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        finished.set()

            path = f"/v1/jobs/{job['id']}/events"
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                     "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                     "headers": [(b"host", b"aiaas.test"), (b"authorization", f"Bearer {ALICE}".encode()),
                                 (b"accept", b"text/event-stream")],
                     "client": ("127.0.0.1", 1), "server": ("aiaas.test", 80)}
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(app, scope, receive, send)
                    while sum(c == b": keep-alive\n\n" for c in chunks) < 2:  # a queued job: nothing but keep-alives
                        await anyio.sleep(0.02)
                    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).json()["status"] == "cancelled"
                    await finished.wait()
            frames = [c for c in chunks if c and not c.startswith(b":")]
            assert len(frames) == 1 and frames[0].startswith(b"id: 1\nevent: run_ended\ndata: ")


def test_serve_refuses_to_run_without_a_token_or_with_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aiaas_lab.server import serve_main

    for argv, words in ((["--data-dir", str(tmp_path)], "--insecure"),
                        (["--tokens-file", str(tmp_path / "missing.txt")], "--tokens-file"),
                        (["--token", "t", "--max-jobs", "0"], "--max-jobs"),
                        (["--token", "t", "--max-upload-mb", "-1"], "--max-upload-mb"),
                        (["--token", ""], "empty")):
        with pytest.raises(SystemExit) as exit_info:
            serve_main(argv)
        assert exit_info.value.code == 2
        assert words in capsys.readouterr().err
    bad = tmp_path / "tokens.txt"
    bad.write_text("token-without-tenant\n")
    with pytest.raises(SystemExit):
        serve_main(["--tokens-file", str(bad)])
    assert "line 1: expected 'TOKEN TENANT'" in capsys.readouterr().err


def test_one_server_per_data_dir(tmp_path: Path) -> None:
    from aiaas_lab._errors import AiaasError

    app = create_app(ServerConfig(data_dir=tmp_path, tokens={ALICE: "alice"}, max_jobs=0))
    with pytest.raises(AiaasError, match="in use by another aiaas-lab serve"):
        create_app(ServerConfig(data_dir=tmp_path, tokens={ALICE: "alice"}, max_jobs=0))
    app.state.lock.close()
    create_app(ServerConfig(data_dir=tmp_path, tokens={ALICE: "alice"}, max_jobs=0)).state.lock.close()


def _mutations(seed: int, count: int) -> list[Any]:
    """Valid-looking job and infer bodies with one part replaced by something odd."""
    import random

    rng = random.Random(seed)
    odd: list[Any] = [None, True, -1, 0, 2**70, 1e308, -0.0, "", "x" * 300, [], {}, [None], {"a": {"b": []}},
                      "digits", "mlp", "0" * 64, [1, "2"], {"builtin": None}, {"tensors": []}, "\u0000", "²"]
    bases: list[Any] = [
        dict(JOB, val=0.2, name="n"),
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}],
         "outputs": [{"name": "output", "parameters": {"binary_data": False}}]},
    ]
    out = []
    for _ in range(count):
        body = json.loads(json.dumps(rng.choice(bases)))
        node = body
        while True:  # walk to a random container and replace one of its items
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = rng.choice(keys)
            if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.6:
                node = node[key]
                continue
            node[key] = rng.choice(odd)
            break
        out.append(body)
    return out


async def test_odd_bodies_get_4xx_never_500(tmp_path: Path) -> None:
    async with serving(tmp_path) as client:
        for body in _mutations(seed=7, count=300):
            for method, path in (("POST", "/v1/jobs"), ("POST", "/v2/models/none/infer")):
                response = await client.request(method, path, content=json.dumps(body).encode())
                assert 200 <= response.status_code < 500, (path, body, response.text)
                if response.status_code >= 400:
                    assert response.json()["error"]
