"""Errors of the HTTP API, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Messages name the bad field and its (shortened) value; they never carry a traceback, a file path,
an address or an actor id: `scrub` removes those from any text that reaches a client, and the
full traceback goes to the server log under the request id that the client also gets.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

# status -> OpenAI error type (the `type` the openai client and vLLM use)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client with `status` (raised anywhere inside a request)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = scrub(message)
        self.param = param
        self.code = code
        self.headers = {"retry-after": "1"} if status in (429, 503) else None  # clients back off and retry

    def body(self, request_id: str | None = None) -> dict:
        return error_body(self.status, self.message, self.param, self.code, request_id)


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    """A 400 about `param`."""
    return APIError(400, message, param, code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None, request_id: str | None = None) -> dict:
    err: dict[str, Any] = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    if request_id:
        err["request_id"] = request_id
    return {"error": err}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
    headers: dict | None = None,
    clean: bool = True,
) -> JSONResponse:
    """The JSON error response (`clean`: scrub the message; the `x-request-id` header is set by the gate)."""
    body = error_body(status, scrub(message) if clean else message, param, code, request_id)
    return JSONResponse(body, status_code=status, headers=headers)


def shorten(value: Any, limit: int = 40) -> str:
    """`repr` of a value cut to `limit` characters (a bad value is named, never echoed whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "…" + text[-3:]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]+){2,}/?")  # two or more path segments
_ADDR = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")
_HEXID = re.compile(r"\b[0-9a-fA-F]{24,}\b")
_PID = re.compile(r"\bpid=\d+", re.IGNORECASE)


def scrub(message: str, limit: int = 500) -> str:
    """A message safe to show a client: first line only when it looks like a traceback, no ANSI
    codes, paths, addresses, pids or long hex ids, at most `limit` characters."""
    text = _ANSI.sub("", str(message))
    if "Traceback (most recent call last)" in text:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
        text = lines[-1] if lines else "internal error"
    text = " ".join(text.split())
    text = _PATH.sub("<path>", text)
    text = _ADDR.sub("<address>", text)
    text = _HEXID.sub("<id>", text)
    text = _PID.sub("pid=<pid>", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def root_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from `RayTaskError`/`RayServeException` wrappers."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        break
    return exc
