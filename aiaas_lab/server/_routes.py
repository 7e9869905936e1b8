"""The /v1 endpoints: blobs, training jobs, their events (paged or as Server-Sent Events), models."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

from ._blobs import check_sha256
from ._http import ApiError, json_response, read_json, whole_number
from ..engine.job import draw_seed
from ._jobs import TERMINAL, render_job, validate_request
from ._ledger import create_job_row
from ._registry import model_entry

__all__ = ["v1_routes"]

_PAGE = 100
_MAX_PAGE = 1000


def _state(request: Request) -> Any:
    return request.app.state


def _tenant_job(request: Request) -> Any:
    job = _state(request).store.one("SELECT * FROM jobs WHERE id = ? AND tenant = ?",
                                    (request.path_params["job_id"], request.state.tenant))
    if job is None:  # another tenant's job is as unknown as a job that never existed
        raise ApiError(404, f"no job {request.path_params['job_id'][:80]!r}.")
    return job


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    number = whole_number(raw)
    if number is None or not low <= number <= high:
        raise ApiError(400, f"{name}: expected a whole number from {low} to {high}, but found {raw[:20]!r}.")
    return number


# ---------------------------------------------------------------- blobs

async def put_blob(request: Request) -> Response:
    sha = check_sha256(request.path_params["sha256"])
    try:
        size, created = await _state(request).blobs.put(request.state.tenant, sha, request.stream())
    except ClientDisconnect:  # a truncated upload: nothing was stored, and nobody is listening
        return Response(status_code=400)
    return json_response({"sha256": sha, "size": size}, 201 if created else 200)


async def head_blob(request: Request) -> Response:
    sha = check_sha256(request.path_params["sha256"])
    path = _state(request).blobs.find(request.state.tenant, sha)
    if path is None:
        return Response(status_code=404)
    return Response(status_code=200, headers={"Content-Length": str(path.stat().st_size)})


# ---------------------------------------------------------------- jobs

async def create_job(request: Request) -> Response:
    state = _state(request)
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= 255:
        raise ApiError(400, "Idempotency-Key: expected 1 to 255 characters.")
    body = await read_json(request)
    # Validation reads uploads (a safetensors header, a whole export graph): off the event loop.
    job_request = await anyio.to_thread.run_sync(validate_request, body, state.blobs, request.state.tenant,
                                                 state.config.allow_code)
    # An Idempotency-Key matches the same request however its JSON was spelled (key order, defaults).
    digest = hashlib.sha256(orjson.dumps(job_request, option=orjson.OPT_SORT_KEYS)).hexdigest()
    if job_request["hyperparameters"]["seed"] is None:  # drawn once and recorded: a resumed run reshuffles alike
        job_request["hyperparameters"]["seed"] = draw_seed()
    job, created = await state.store.write(create_job_row, request.state.tenant, job_request, key, digest, time.time())
    if created:
        state.executor.wake()
    return json_response(render_job(job), 201 if created else 200)


async def list_jobs(request: Request) -> Response:
    limit = _int_param(request, "limit", _PAGE, 1, _MAX_PAGE)
    rows = _state(request).store.all("SELECT * FROM jobs WHERE tenant = ? ORDER BY created_at DESC, id DESC LIMIT ?",
                                     (request.state.tenant, limit))
    return json_response({"object": "list", "data": [render_job(r) for r in rows]})


async def get_job(request: Request) -> Response:
    return json_response(render_job(_tenant_job(request)))


async def cancel_job(request: Request) -> Response:
    state = _state(request)
    job = _tenant_job(request)
    if job["status"] not in TERMINAL:
        waiter = state.signals.waiter(job["id"])
        await state.executor.cancel(job["id"])
        # The engine stops at its next step; wait briefly so the answer usually says "cancelled".
        deadline = time.monotonic() + 5
        while (job := _tenant_job(request))["status"] not in TERMINAL and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(waiter.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            waiter = state.signals.waiter(job["id"])
    return json_response(render_job(job))


# ---------------------------------------------------------------- events

def _after(request: Request) -> int:
    last = request.headers.get("last-event-id")
    if last is not None:  # a reconnecting EventSource resumes where it left off
        number = whole_number(last)
        if number is None:
            raise ApiError(400, f"Last-Event-ID: expected an event id (a whole number), but found {last[:20]!r}.")
        return number
    return _int_param(request, "after", 0, 0, 2**62)


def _events(store: Any, job_id: str, after: int, limit: int) -> list[Any]:
    return store.all("SELECT seq, type, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                     (job_id, after, limit))


async def job_events(request: Request) -> Response:
    job = _tenant_job(request)
    after = _after(request)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(_stream(request, job["id"], after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    limit = _int_param(request, "limit", _PAGE, 1, _MAX_PAGE)
    rows = _events(_state(request).store, job["id"], after, limit + 1)
    # The stored text is the event's JSON already: splice it in rather than parse and re-encode.
    items = b",".join(b'{"id":%d,"event":%s}' % (r["seq"], r["data"].encode()) for r in rows[:limit])
    body = b'{"object":"list","data":[%s],"has_more":%s}' % (items, b"true" if len(rows) > limit else b"false")
    return Response(body, media_type="application/json")


async def _stream(request: Request, job_id: str, after: int) -> AsyncIterator[bytes]:
    state = _state(request)
    keepalive = state.config.keepalive_s
    while True:
        waiter = state.signals.waiter(job_id)
        # Status first, then events: a terminal status read here means its last event is committed.
        status = state.store.one("SELECT status FROM jobs WHERE id = ?", (job_id,))["status"]
        rows = _events(state.store, job_id, after, _MAX_PAGE)
        if rows:
            yield b"".join(b"id: %d\nevent: %s\ndata: %s\n\n" % (r["seq"], r["type"].encode(), r["data"].encode())
                           for r in rows)
            after = rows[-1]["seq"]
            continue
        if status in TERMINAL:
            state.signals.fire(job_id)  # drops the waiter: nothing about this job changes any more
            return
        try:
            await asyncio.wait_for(waiter.wait(), keepalive)
        except asyncio.TimeoutError:
            yield b": keep-alive\n\n"


# ---------------------------------------------------------------- models

async def list_models(request: Request) -> Response:
    rows = _state(request).store.all("SELECT * FROM models WHERE tenant = ? ORDER BY created_at DESC, name, version DESC",
                                     (request.state.tenant,))
    return json_response({"object": "list", "data": [model_entry(r) for r in rows]})


async def model_weights(request: Request) -> Response:
    state = _state(request)
    version = request.query_params.get("version")
    row = state.registry.row(request.state.tenant, request.path_params["name"], version)
    path = state.jobs_dir / row["job_id"] / "model.safetensors"
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"{row['name']}-v{row['version']}.safetensors")


def v1_routes() -> list[Route]:
    return [
        Route("/v1/data/{sha256}", put_blob, methods=["PUT"]),
        Route("/v1/data/{sha256}", head_blob, methods=["HEAD"]),
        Route("/v1/jobs", create_job, methods=["POST"]),
        Route("/v1/jobs", list_jobs, methods=["GET"]),
        Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name}/weights", model_weights, methods=["GET"]),
    ]
