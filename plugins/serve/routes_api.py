"""The routes of the API's operations that need nothing but their declaration
(``superlinear.protocol``: the sessions' and snapshots'), registered from it: each takes its
fields from the path, then from a JSON body or the query (type-checked and bounded as declared,
an unknown field refused), dispatches the operation on the server's API (``LocalApi``: what
touches a cache runs on its worker) in a thread, never on the event loop, and answers
``command.answer(result)``."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, create_model

from superlinear.bus import Context, dispatch
from superlinear.protocol import OPERATIONS, ApiCommand

from . import bounds
from .runtime import Runtime
from .schemas import validation_error


@functools.cache
def request_model(op: type[ApiCommand]) -> type[BaseModel]:
    """The pydantic model of an operation's body (or query), by wire names, from its fields."""
    hints = op.field_types()
    fields: dict[str, Any] = {}
    for wire_name, f in op.wire_fields().items():
        kind = hints[f.name]
        if kind is bool and not op.http.query:  # JSON: true/false only; a query string says "true"
            kind = StrictBool
        default = ... if f.default is dataclasses.MISSING else f.default
        fields[wire_name] = (kind, Field(default, ge=f.metadata.get("ge"), le=f.metadata.get("le")))
    return create_model(f"{op.__name__}Request", __config__=ConfigDict(extra="forbid"), **fields)


def _field_names(op: type[ApiCommand]) -> dict[str, str]:
    return {wire_name: f.name for wire_name, f in op.wire_fields().items()}


def add_routes(app: FastAPI, rt: Runtime) -> None:
    for op in OPERATIONS:
        if op.http.served:
            app.add_api_route(op.http.route, _endpoint(op, rt), methods=[op.http.method], name=op.name)


def _endpoint(op: type[ApiCommand], rt: Runtime):
    model = request_model(op)
    names = _field_names(op)
    # a POST whose fields are all optional may come without a body; a PATCH must say what changes
    optional = op.http.method == "POST" and all(not f.is_required() for f in model.model_fields.values())

    async def endpoint(request: Request):
        if op.http.query:
            query = dict(request.query_params)
            try:
                body = model.model_validate({k: v for k, v in query.items() if k in model.model_fields})
            except ValidationError as exc:
                raise validation_error(exc, query) from exc
        elif op.http.method in ("POST", "PATCH", "PUT"):
            body = await bounds.parse_request(request, model, allow_empty=optional)
        else:
            body = None
        rt.require_ready()
        given = body.model_dump(exclude_unset=True) if body is not None else {}
        command = op(**request.path_params, **{names[k]: v for k, v in given.items()})
        result = await asyncio.to_thread(dispatch, command, Context(api=rt.api))
        return JSONResponse(command.answer(result), status_code=op.http.status)

    endpoint.__name__ = op.name.replace(".", "_")
    return endpoint
