"""JSON responses and the one error shape every endpoint uses: `{"error": "one clear sentence"}`."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["ApiError", "json_response", "error_response", "read_json", "whole_number"]


class ApiError(Exception):
    """Raised anywhere in a handler; the app turns it into a 4xx `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def whole_number(text: str) -> int | None:
    """`text` as a non-negative int when it is plain ASCII digits; None otherwise (int() would
    also take "²"-like or other scripts' digits, or fail on them)."""
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return None


async def read_json(request: Request, what: str = "the request body") -> Any:
    body = await request.body()
    if not body:
        raise ApiError(400, f"{what} is empty; expected a JSON object.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"{what} is not valid JSON ({exc}).") from None
