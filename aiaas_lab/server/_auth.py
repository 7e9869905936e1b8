"""Bearer-token authentication as ASGI middleware: every request but the V2 health probes.

Tokens map to tenants. The presented token is hashed and compared with every known token's
hash in constant time, without stopping at the first match, so the response time says nothing
about which token (or how much of one) was right.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from ._http import error_response

__all__ = ["AuthMiddleware", "load_tokens_file", "DEFAULT_TENANT"]

DEFAULT_TENANT = "default"
_OPEN_PATHS = ("/v2/health/",)


def load_tokens_file(path: str | Path) -> dict[str, str]:
    """`TOKEN TENANT` per line; blank lines and lines starting with # are skipped."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}, line {number}: expected 'TOKEN TENANT', found {len(parts)} fields")
        token, tenant = parts
        if token in tokens and tokens[token] != tenant:
            raise ValueError(f"{path}, line {number}: the same token is given to two tenants")
        tokens[token] = tenant
    return tokens


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class AuthMiddleware:
    """Puts the tenant in `scope["state"]["tenant"]`; answers 401 for a missing or wrong token.

    With no tokens at all (`--insecure`) every request belongs to the default tenant.
    """

    def __init__(self, app: ASGIApp, tokens: dict[str, str] | Iterable[tuple[str, str]]) -> None:
        self.app = app
        items = tokens.items() if isinstance(tokens, dict) else tokens
        self._known = [(_digest(token), tenant) for token, tenant in items]

    def _tenant(self, authorization: bytes | None) -> str | None:
        if authorization is None or not authorization[:7].lower() == b"bearer ":
            return None
        presented = _digest(authorization[7:].strip())
        found = None
        for digest, tenant in self._known:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._known:
            tenant: str | None = DEFAULT_TENANT
        elif scope["path"].startswith(_OPEN_PATHS):
            tenant = None
        else:
            authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            tenant = self._tenant(authorization)
            if tenant is None:
                message = ("missing Authorization header; send 'Authorization: Bearer TOKEN'"
                           if authorization is None else "the bearer token is not valid for this server")
                response = error_response(401, message, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)
