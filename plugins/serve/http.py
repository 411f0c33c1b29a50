"""What every request passes through: the guard (API key, body size, the last answer to a bug),
request bodies read with a size limit, and errors in OpenAI's shape."""

from __future__ import annotations

import hmac
import logging
import os
import tempfile

from fastapi import Request
from fastapi.responses import JSONResponse

from superlinear import protocol
from superlinear.errors import BodyTooLarge, InvalidRequest, Unauthorized, UserError

log = logging.getLogger("spl.serve")

MAX_BODY_BYTES = int(os.environ.get("SPL_MAX_BODY_BYTES", 256 << 20))  # ~50M tokens of text
MAX_IMPORT_BYTES = int(os.environ.get("SPL_MAX_IMPORT_BYTES", 1 << 40))


def import_limit() -> tuple[int, str]:
    """The most bytes a snapshot upload may have, and why: ``MAX_IMPORT_BYTES``, or less when
    the disk that holds uploads has less room (its free space less ``$SPL_STORE_RESERVE_BYTES``):
    an upload that cannot fit is refused before it fills the disk other sessions persist to."""
    from superlinear.sessions.snapshots import RESERVE_ENV, room

    directory = tempfile.gettempdir()
    try:
        free = max(0, room(directory))
    except OSError:
        free = MAX_IMPORT_BYTES
    if free < MAX_IMPORT_BYTES:
        return free, f"the free space in {directory} less ${RESERVE_ENV}"
    return MAX_IMPORT_BYTES, "the upload limit"


def error_response(exc: UserError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.http_status in (429, 503) else None
    return JSONResponse(exc.to_openai(), status_code=exc.http_status, headers=headers)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(part)
    return b"".join(chunks)


# Outside /v1 but still behind the API key (llama.cpp's and vLLM's paths for them).
_KEYED_PATHS = (protocol.Tokenize.http.route, protocol.Detokenize.http.route)


def internal_error_body(exc: BaseException) -> dict:
    """The OpenAI error body of a bug (a 500, or the last event of a stream that had begun)."""
    return {"error": {"message": f"internal error: {type(exc).__name__}: {exc}".splitlines()[0],
                      "type": "server_error", "param": None, "code": "internal_error"}}


def bug_response(exc: BaseException) -> JSONResponse:
    """The answer to an exception no route turned into a ``UserError``: a disk that is full or
    read-only is the storage's state (503), anything else a bug (500, logged with its traceback)."""
    from superlinear.sessions.manifest import DISK_ERRNOS, disk_error

    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        log.error("spl: storage error: %s", exc)
        return error_response(disk_error("the server cannot write its files", exc))
    log.exception("spl: internal error: %s", exc)
    return JSONResponse(internal_error_body(exc), status_code=500)


class GuardMiddleware:
    """Pure ASGI (streaming and disconnects pass through untouched): API key on /v1 routes,
    body-size limit from Content-Length, and any uncaught exception answered as a 500 body."""

    def __init__(self, app, api_key: str | None, metrics=None):
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and (path == "/v1" or path.startswith("/v1/") or path in _KEYED_PATHS):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                msg = ("missing API key: send `Authorization: Bearer KEY` (spl commands: set SPL_API_KEY=KEY, "
                       "or `spl server connect URL --api-key KEY`)" if not auth
                       else "invalid API key (spl commands send $SPL_API_KEY, else the key of "
                       "`spl server connect URL --api-key KEY`)")
                return await error_response(Unauthorized(msg))(scope, receive, send)
        length = headers.get("content-length")
        limit, why = import_limit() if path == protocol.ImportSnapshot.http.route else (MAX_BODY_BYTES, "the limit")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await error_response(InvalidRequest("bad Content-Length"))(scope, receive, send)
            if too_big:
                return await error_response(
                    BodyTooLarge(f"request body is {length} bytes; {why} is {limit}")
                )(scope, receive, send)
        started, status = False, 500

        async def tracking_send(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: still an OpenAI body
            if started:
                raise
            await bug_response(exc)(scope, receive, tracking_send)
        finally:
            if self.metrics is not None:  # by route template: session ids must not become labels
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.request(scope.get("method", ""), route, status)
