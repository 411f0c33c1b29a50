"""The FastAPI application: errors in OpenAI's shape, auth, body limits, and the routes of
each resource (``routes_*.py``) plus those of plugins."""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from superlinear.errors import BodyTooLarge, InvalidRequest, NotFound, Unauthorized, UserError

from . import bounds, routes_chat, routes_models, routes_sessions, routes_snapshots, routes_text
from .http import MAX_BODY_BYTES, error_response, import_limit
from .runtime import Runtime

log = logging.getLogger("spl.serve")
# Outside /v1 but still behind the API key (llama.cpp's and vLLM's paths for them).
_KEYED_PATHS = ("/tokenize", "/detokenize")

def _bug_response(exc: BaseException) -> JSONResponse:
    """The answer to an exception no route turned into a ``UserError``: a disk that is full or
    read-only is the storage's state (503), anything else a bug (500, logged with its traceback)."""
    from superlinear.sessions.manifest import DISK_ERRNOS, disk_error

    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        log.error("spl: storage error: %s", exc)
        return error_response(disk_error("the server cannot write its files", exc))
    log.exception("spl: internal error: %s", exc)
    return JSONResponse(routes_chat.internal_error_body(exc), status_code=500)


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
        limit, why = import_limit() if path == "/v1/snapshots/import" else (MAX_BODY_BYTES, "the limit")
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
            await _bug_response(exc)(scope, receive, tracking_send)
        finally:
            if self.metrics is not None:  # by route template: session ids must not become labels
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.request(scope.get("method", ""), route, status)


def create_app(runtime: Runtime) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start_loading()
        retrier = asyncio.create_task(runtime.retry_persists_forever())
        yield
        retrier.cancel()
        await asyncio.to_thread(runtime.shutdown)

    app = FastAPI(title="spl", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.add_middleware(GuardMiddleware, api_key=runtime.options.api_key, metrics=runtime.metrics)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query"))
        return error_response(InvalidRequest(f"{loc or 'request'}: {first.get('msg', 'invalid')}",
                                             param=loc or None, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err: UserError = NotFound(f"no route {request.method} {request.url.path}", code="unknown_route")
        elif exc.status_code == 405:
            err = InvalidRequest(f"method {request.method} is not allowed on {request.url.path}",
                                 code="method_not_allowed")
            resp = error_response(err)
            resp.status_code = 405
            return resp
        else:
            err = UserError(str(exc.detail))
            err.http_status = exc.status_code
        return error_response(err)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return _bug_response(exc)

    for routes in (routes_models, routes_chat, routes_sessions, routes_snapshots, routes_text):
        routes.add_routes(app, runtime)

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            app.openapi_schema = bounds.document_bodies(get_openapi(title=app.title, version=app.version,
                                                                    routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi
    from superlinear.pluginloader import collect

    for plugin, args, kwargs in collect("register_routes"):
        try:
            app.include_router(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the server down
            log.warning("spl: plugin %r: routes skipped: %s", plugin, exc)
    return app


def _version() -> str:
    from superlinear.version import __version__

    return __version__


