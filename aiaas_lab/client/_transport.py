"""The client's connection policy, written once for the blocking and the async client: the token,
the error wording, and when to retry.

Retrying is safe because every request this client makes is idempotent (a job is created with an
`Idempotency-Key`, blobs are content-addressed, cancel and infer have no cumulative effect).
httpx's own transport retries cover only failed connects, not a dropped answer or a 503 with
Retry-After, hence the policy here.

The token lives in one private attribute. It is sent in the Authorization header and nowhere
else: it is absent from every repr, and every error message is scrubbed of it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Generator
from typing import Any

import httpx

from .._errors import AiaasError
from ._wire import DEFAULT_TIMEOUT, STREAM_READ_TIMEOUT, Plan, RemoteError, T, _Call, _normalize_url

# What `_Transport._exchanges` yields: a request, and how long to wait before sending it; what it
# is answered with: the response, or the transport error that sending raised.
Exchanges = Generator[tuple[_Call, float], "httpx.Response | httpx.TransportError | None", T]


class _Transport:
    """URL, token, timeouts, error wording and the retry policy shared by both clients."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retries: int = 3) -> None:
        self.url = _normalize_url(url)
        token = token if token is not None else os.environ.get("AIAAS_TOKEN")
        self._token = token.strip() if token and token.strip() else None
        self.retries = int(retries)
        if not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout, connect=min(5.0, timeout))
        self.timeout = timeout
        self._info: dict[str, Any] | None = None
        self._metadata: dict[tuple[str, str | None], dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, token={'<set>' if self._token else None})"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _stream_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout.connect, read=STREAM_READ_TIMEOUT, write=self.timeout.write,
                             pool=self.timeout.pool)

    # -- error wording ----------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        # A very short token would turn every occurrence of its letters into stars, and showing
        # a 't' in a message reveals nothing.
        return text.replace(self._token, "***") if self._token and len(self._token) >= 8 else text

    def _error_for(self, call: _Call, response: httpx.Response) -> AiaasError:
        status = response.status_code
        if status == 401:
            if self._token is None:
                message = (f"The server at {self.url} needs a token: pass token=..., set the AIAAS_TOKEN "
                           f"environment variable, or run %aiaas connect {self.url} --token TOKEN.")
            else:
                message = (f"The server at {self.url} rejected the token (401 Unauthorized): check the token "
                           "given as token=..., in AIAAS_TOKEN or to %aiaas connect.")
            return RemoteError(message, status)
        text = ""
        try:
            body = response.json()
            if isinstance(body, dict):
                text = str(body.get("error") or body.get("detail") or "")
        except (ValueError, UnicodeDecodeError):
            text = response.text[:300].strip() if call.method != "HEAD" else ""
        text = text or response.reason_phrase or "no details"
        verb = "refused" if status < 500 else "failed on"
        return RemoteError(self._redact(f"The server at {self.url} {verb} {call.method} {call.path} "
                                        f"({status}): {text}"), status)

    def _unreachable(self, exc: BaseException | None, tries: int) -> AiaasError:
        if isinstance(exc, httpx.ConnectTimeout):
            reason = f"no connection within {self.timeout.connect:g} s"
        elif isinstance(exc, httpx.TimeoutException):
            reason = "no answer in time"
        elif isinstance(exc, httpx.ConnectError):
            reason = "connection refused" if "refused" in str(exc).lower() else str(exc) or "cannot connect"
        elif exc is not None:
            reason = f"the connection dropped ({type(exc).__name__})"
        else:
            reason = "the connection dropped"
        attempts = f" after {tries} attempts" if tries > 1 else ""
        return AiaasError(self._redact(f"Cannot reach the server at {self.url}{attempts}: {reason}. "
                                       "Is it running (aiaas-lab serve), and is the URL right?"))

    # -- sending ----------------------------------------------------------------------------

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after:
            try:
                return min(float(retry_after), 10.0)
            except ValueError:
                pass
        # Exponential backoff with jitter, so clients that failed together do not retry together.
        return min(0.2 * 2 ** attempt, 4.0) * (0.5 + random.random() / 2)

    def _request_args(self, call: _Call) -> dict[str, Any]:
        headers = self._headers()
        headers.update(call.headers or {})
        args: dict[str, Any] = {"params": call.params, "headers": headers}
        if call.json is not None:
            args["json"] = call.json
        if call.content is not None:
            args["content"] = call.content
        return args

    def _exchanges(self, plan: Plan[T]) -> Exchanges[T]:
        """`plan` under the retry policy: a dropped connection or a 503 is retried after a backoff
        (up to `retries` times); any status the plan does not read itself becomes the error. The
        clients only send what this yields and answer with what came back."""
        try:
            call = next(plan)
            while True:
                wait = 0.0
                for attempt in range(self.retries + 1):
                    outcome = yield call, wait
                    if isinstance(outcome, httpx.Response) and (outcome.status_code != 503 or attempt == self.retries):
                        break
                    if attempt == self.retries:
                        raise self._unreachable(outcome, attempt + 1) from None
                    wait = self._delay(attempt, outcome if isinstance(outcome, httpx.Response) else None)
                assert isinstance(outcome, httpx.Response)
                if outcome.status_code not in call.ok:
                    raise self._error_for(call, outcome)
                call = plan.send(outcome)
        except StopIteration as done:
            return done.value
