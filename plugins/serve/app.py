"""The FastAPI application: the guard every request passes (``http.GuardMiddleware``: auth, body
limits), errors in OpenAI's shape, and the routes of each resource (``routes_*.py``) plus those
of plugins."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from superlinear.errors import InvalidRequest, NotFound, UserError

from . import bounds, routes_api, routes_chat, routes_models, routes_snapshots, routes_text
from .http import GuardMiddleware, bug_response, error_response
from .runtime import Runtime

log = logging.getLogger("spl.serve")


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
        return bug_response(exc)

    for routes in (routes_models, routes_chat, routes_api, routes_snapshots, routes_text):
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


