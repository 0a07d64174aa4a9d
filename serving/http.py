"""What both apps (`cascade serve`, `cascade llm serve`) share at the HTTP edge: one error shape,
API keys on every route but the probes, a request-body byte limit, and a 503 for work while
the models still load.

Every 4xx/5xx body is

    {"error": {"message": "texts[1]: lone surrogate U+D800 at character 3; ...",
               "type": "invalid_request_error", "code": "invalid_unicode", "param": "texts[1]"}}

`type` is OpenAI's family (so the official client raises the right exception), `code` is
machine-readable and stable, `param` is the field path (`texts[1]`, `messages[0].content`) or
null. Auth and the body limit are plain ASGI middleware, so they cover every route, the docs and
the OpenAPI schema included, before any body is parsed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error answer: raise it anywhere in a route; the handler writes the one shape."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers


class ErrorDetail(BaseModel):
    message: str = Field(description="what was wrong, naming the field")
    type: str = Field(description="OpenAI's error family: invalid_request_error, rate_limit_error, ...")
    code: str = Field(description="machine-readable reason, e.g. invalid_unicode, text_too_long, overloaded")
    param: str | None = Field(default=None, description="the field path, e.g. texts[1]; null when none")


class ErrorBody(BaseModel):
    error: ErrorDetail


# For the OpenAPI schema: the error statuses every route may answer, with the one body.
ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (401, 413, 422, 429, 503)}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "code": code, "param": param}}


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)


def field_path(loc: tuple | list) -> str:
    """pydantic's ('body', 'texts', 1) -> 'texts[1]'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0]
        if first.get("type") == "json_invalid":  # loc is ('body', character offset): name the body
            return error_response(422, "invalid_json", f"body: not valid JSON ({first.get('msg')}, at character "
                                                       f"{first['loc'][-1]})", "body")
        msgs = "; ".join(f"{field_path(e['loc'])}: {e['msg']}" for e in errors[:5])
        return error_response(422, "invalid_" + str(first.get("type", "value")).split(".")[0], msgs,
                              field_path(first["loc"]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405 from routing
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, in the one shape
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


class LoopLag:
    """How far behind the event loop runs: a task asks to wake every `interval` and records
    how late it woke (smoothed). When the process is short of CPU, requests wait in the socket
    and the loop before any handler sees them; this is the one place that wait shows."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.lag = 0.0
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(self.interval)
            late = max(0.0, time.monotonic() - t0 - self.interval)
            self.lag = 0.7 * self.lag + 0.3 * late

    def behind(self, limit_s: float) -> str | None:
        """Why new work should be refused now (the loop is more than `limit_s` behind), or None."""
        if self.lag > limit_s:
            return f"the server is {1000 * self.lag:.0f} ms behind (limit {1000 * limit_s:.0f} ms)"
        return None

    async def stop(self) -> None:
        await cancel_task(self.task)


async def cancel_task(task: asyncio.Task | None) -> None:
    """Cancel a background task and wait for it to end."""
    if task is not None:
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: S110  the cancellation we asked for
            pass


def api_keys_from_env(name: str) -> frozenset[str]:
    return frozenset(k.strip() for k in os.environ.get(name, "").split(",") if k.strip())


def key_matches(given: str, keys: frozenset[str]) -> bool:
    """Constant-time against every key (no early exit that would time which one came close)."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode("utf-8", "surrogatepass"), key.encode("utf-8"))
    return ok


async def _send_error(send, status: int, code: str, message: str, param: str | None = None,
                      headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, code, message, param)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class EdgeMiddleware:
    """API keys (when any are set) on every path not in `public_paths`, then the body limit.

    Keys come as `Authorization: Bearer KEY` or `X-API-Key: KEY`. A 401 carries
    `WWW-Authenticate: Bearer`. A body over `max_body_bytes` is refused with 413 as soon as its
    Content-Length (or the bytes read so far) says so; under it, the body is handed on whole."""

    def __init__(self, app, keys: frozenset[str], public_paths: list[str], max_body_bytes: int, shed=None,
                 retry_after_s: int = 1, unavailable=None):
        self.app, self.keys, self.public = app, keys, frozenset(public_paths)
        self.max_body_bytes = max_body_bytes
        self.shed = shed  # (scope) -> reason | None: refuse work (429) before reading its body
        self.unavailable = unavailable  # (scope) -> reason | None: not ready for it (503), e.g. still loading
        self.retry_after_s = retry_after_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.keys and scope["path"] not in self.public:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not given or not key_matches(given, self.keys):
                return await _send_error(send, 401, "invalid_api_key",
                                         "missing or unknown API key (Authorization: Bearer KEY)", "authorization",
                                         {"WWW-Authenticate": 'Bearer realm="cascade"'})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, 413, "body_too_large", f"body: {length} bytes, the limit is "
                                                                  f"{self.max_body_bytes}", "body")
        if self.unavailable is not None and (why := self.unavailable(scope)):
            return await _send_error(send, 503, "not_ready", f"not ready: {why}; retry later", None,
                                     {"Retry-After": str(self.retry_after_s)})
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        if self.shed is not None and (why := self.shed(scope)):
            return await _send_error(send, 429, "overloaded", f"overloaded: {why}; retry later", None,
                                     {"Retry-After": str(self.retry_after_s)})
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _send_error(send, 413, "body_too_large",
                                         f"body: more than {self.max_body_bytes} bytes (the limit)", "body")
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
