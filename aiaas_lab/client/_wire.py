"""What every request of the client is made of: the URL rules, the timeouts, a request as a value
(`_Call`), an operation as a plan of such requests (`Plan`), and the error a server answers with.

Values only, no I/O: the blocking and the async client both send these, so the two share every
decision about what to send and differ only in how they wait.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from .._errors import AiaasError, BadArgument

__all__ = ["RemoteError", "TERMINAL_STATUSES", "DEFAULT_TIMEOUT"]

T = TypeVar("T")

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# The server sends a keep-alive comment every 15 s, so a stream silent for longer than this is dead.
STREAM_READ_TIMEOUT = 45.0
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


class RemoteError(AiaasError):
    """The server answered with an error; `status` is the HTTP status code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] | None = None
    ok: tuple[int, ...] = (200, 201)  # statuses the plan reads itself; any other is an error


# An operation: a generator that yields the requests it needs and receives their responses.
Plan = Generator[_Call, httpx.Response, T]


def _normalize_url(url: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise BadArgument("--backend", "an http:// or https:// URL", repr(url))
    return url.rstrip("/")


def _quote(name: str) -> str:
    return quote(str(name), safe="")


def _model_path(name: str, version: int | str | None) -> str:
    path = f"/v2/models/{_quote(name)}"
    return path + (f"/versions/{_quote(str(version))}" if version is not None else "")
