"""Every change to a job: the transactions the store's one writer runs.

A job's row, its events and the model it registers change only here, each function one
transaction (`Store.write`), so the rules hold everywhere: event ids are consecutive from 1,
nothing is appended after the terminal event, a terminal status never changes, and the last
event, the terminal status and the model are committed together.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..engine.events import RunEnded
from ._http import ApiError
from ._jobs import TERMINAL, new_job_id

__all__ = ["create_job_row", "insert_event", "insert_events", "finish", "claim", "request_cancel", "synthetic_end"]

_STATUS = {"completed": "succeeded", "stopped": "cancelled", "failed": "failed"}


def create_job_row(conn: Any, tenant: str, request: dict[str, Any], key: str | None, digest: str,
                   now: float) -> tuple[dict[str, Any], bool]:
    """A new queued job, or the one this Idempotency-Key created before; (row, created)."""
    if key is not None:
        existing = conn.execute("SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?", (tenant, key)).fetchone()
        if existing is not None:
            if existing["request_hash"] != digest:
                raise ApiError(409, "Idempotency-Key was already used for a different job request; "
                                    "use a new key for a new job.")
            return dict(existing), False
    job_id = new_job_id()
    hyperparameters = orjson.dumps(request["hyperparameters"]).decode()
    conn.execute("INSERT INTO jobs (id, tenant, status, created_at, request, hyperparameters, idempotency_key, "
                 "request_hash) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                 (job_id, tenant, now, orjson.dumps(request).decode(), hyperparameters, key, digest))
    return dict(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()), True


def insert_event(conn: Any, job_id: str, event: dict[str, Any]) -> int | None:
    """Append the job's next event; None (nothing stored) once the job is terminal."""
    row = conn.execute("UPDATE jobs SET last_event = last_event + 1 WHERE id = ? AND status NOT IN "
                       "('succeeded', 'failed', 'cancelled') RETURNING last_event", (job_id,)).fetchone()
    if row is None:
        return None
    seq = row[0]
    conn.execute("INSERT INTO events (job_id, seq, type, data) VALUES (?, ?, ?, ?)",
                 (job_id, seq, event["type"], orjson.dumps(event).decode()))
    if event["type"] == "epoch_end":
        conn.execute("UPDATE jobs SET metrics = ? WHERE id = ?", (orjson.dumps(event["metrics"]).decode(), job_id))
    return seq


def insert_events(conn: Any, job_id: str, events: list[dict[str, Any]]) -> int | None:
    """Append several events in order; the last id, or None once the job is terminal."""
    seq = None
    for event in events:
        seq = insert_event(conn, job_id, event)
        if seq is None:
            return None
    return seq


def finish(conn: Any, job_id: str, ended: dict[str, Any], model: dict[str, Any] | None,
            now: float) -> tuple[str, str] | None:
    """The last event, the terminal status and the model, together. Returns (tenant, model name)
    when a model was registered."""
    job = conn.execute("SELECT tenant, status, request FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if job is None or job["status"] in TERMINAL:
        return None
    status = _STATUS[ended["status"]]
    insert_event(conn, job_id, ended)
    name = version = None
    if status == "succeeded" and model is not None:
        name = orjson.loads(job["request"])["name"] or job_id
        version = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE tenant = ? AND name = ?",
                               (job["tenant"], name)).fetchone()[0]
        conn.execute("INSERT INTO models (tenant, name, version, job_id, created_at, info) VALUES (?, ?, ?, ?, ?, ?)",
                     (job["tenant"], name, version, job_id, now, orjson.dumps(model).decode()))
    error = ended.get("error") if status == "failed" else None
    conn.execute("UPDATE jobs SET status = ?, finished_at = ?, error = ?, model_name = ?, model_version = ? WHERE id = ?",
                 (status, now, error, name, version, job_id))
    return (job["tenant"], name) if name is not None else None


def claim(conn: Any, job_id: str, now: float) -> dict[str, Any] | None:
    """Mark the job running for one more launch; None when it is terminal or out of launches."""
    job = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if job is None or job["status"] in TERMINAL:
        return None
    conn.execute("UPDATE jobs SET status = 'running', attempts = attempts + 1, "
                 "started_at = COALESCE(started_at, ?) WHERE id = ?", (now, job_id))
    return dict(job) | {"attempts": job["attempts"] + 1}


def synthetic_end(status: str, reason: str = "", error: str | None = None) -> dict[str, Any]:
    """A run_ended event for a job the engine never finished, so every event stream ends with one."""
    return RunEnded(status=status, epochs_completed=0, steps=0, seconds=0.0, reason=reason,  # type: ignore[arg-type]
                    error=error, time=time.time()).to_dict()


def request_cancel(conn: Any, job_id: str) -> str | None:
    """Record the cancel (a restarted server honours it too); the status it found, None if terminal."""
    row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or row["status"] in TERMINAL:
        return None
    conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
    return row["status"]
