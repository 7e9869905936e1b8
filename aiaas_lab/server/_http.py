"""JSON responses and the one error shape every endpoint uses: `{"error": "one clear sentence"}`."""

from __future__ import annotations

from typing import Any

import reprlib

import orjson
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["ApiError", "json_response", "error_response", "read_json", "parse_json", "whole_number",
           "brief", "MAX_JSON_DEPTH"]

# Deeper JSON is refused as it is parsed: the handlers, repr() in their error messages and
# orjson.dumps (limit 255) all recurse, and a 1,000-deep value raised RecursionError (a 500) in
# each. Real requests nest a few levels (an infer body's data at most as deep as its shape).
MAX_JSON_DEPTH = 64
_LEAVES = frozenset({str, int, float, bool, type(None)})


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


_BRIEF = reprlib.Repr()  # keyword arguments only from Python 3.12
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 8, 4, 40, 40, 40


def brief(value: Any) -> str:
    """A short repr of a client's value for an error message: bounded in length and depth,
    whatever was sent (repr() of a large or deep value is slow, or raises RecursionError)."""
    return _BRIEF.repr(value)


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests lists and objects more than `limit` levels, found without
    recursion. A list of plain values is skipped at C speed (an infer body's long data list)."""
    stack = [(value, 1)] if type(value) in (list, dict) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if type(item) is dict else item
        if _LEAVES.issuperset(map(type, children)):
            continue
        stack.extend((child, depth + 1) for child in children if type(child) in (list, dict))
    return False


def parse_json(body: bytes, what: str = "the request body") -> Any:
    """`body` parsed, or ApiError(400) naming `what`: invalid JSON, or nested too deep."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # orjson itself stops at 1,024 levels, as invalid JSON
        raise ApiError(400, f"{what} is not valid JSON ({exc}).") from None
    if too_deep(value):
        raise ApiError(400, f"{what}: expected JSON nested at most {MAX_JSON_DEPTH} levels deep, "
                            "but found deeper nesting.")
    return value


async def read_json(request: Request, what: str = "the request body") -> Any:
    body = await request.body()
    if not body:
        raise ApiError(400, f"{what} is empty; expected a JSON object.")
    return parse_json(body, what)
