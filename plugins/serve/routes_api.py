"""The routes of the API's operations, registered from their declarations (``superlinear.protocol``):
for each operation the server serves, its method and route; path fields from the path, the others
from the query or a JSON body checked against a model made of the command's fields and their
bounds (``body_model``); the call on the in-process API (``LocalApi``: what touches a cache runs on
its worker) and the encoding of its answer in a thread, never on the event loop; the declared
status. The bounds the docs list come from the same declaration (``declare``)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import typing

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, create_model

from superlinear import protocol

from . import bounds
from .runtime import Runtime
from .schemas import MAX_JSON_DEPTH

_FORBID = ConfigDict(extra="forbid")


def add_routes(app: FastAPI, rt: Runtime) -> None:
    for op in SERVED:
        _add_route(app, rt, op)


def declare(op: type[protocol.ApiCommand]) -> bounds.Bounds:
    """The bounds of ``op``'s route, as its declaration (``Http``) gives them."""
    http = op.http
    has_body = http.upload is not None or op.sends_body()
    depth = _resolve(http.depth) if http.depth is not None else MAX_JSON_DEPTH if has_body else None
    size = http.body_bytes if http.body_bytes is not None else bounds.SMALL_BODY_BYTES if has_body else 0
    return bounds.declare(http.method, http.route, body_bytes=size, depth=depth, items=_resolve(http.items),
                          reply=http.reply, body=http.upload or body_model(op))


@functools.cache
def body_model(op: type[protocol.ApiCommand]) -> type[BaseModel] | None:
    """The JSON body of ``op`` as a pydantic model (None: it has none): its wire fields, typed as
    the command types them (bools strict, tuples as lists) and bounded as it bounds them; a field
    it does not have is refused."""
    if not op.sends_body():
        return None
    types = op.field_types()
    fields = {wire: (_wire_type(types[f.name]), Field(... if f.default is dataclasses.MISSING else f.default,
                                                      ge=f.metadata.get("ge"), le=f.metadata.get("le")))
              for wire, f in op.wire_fields().items()}
    return create_model(op.__name__, __config__=_FORBID, **fields)


def _add_route(app: FastAPI, rt: Runtime, op: type[protocol.ApiCommand]) -> None:
    http, limit, model = op.http, BOUNDS[op].body_bytes, body_model(op)
    path = http.path_fields()
    names = {wire: f.name for wire, f in op.wire_fields().items()}
    required = model is not None and any(f.is_required() for f in model.model_fields.values())
    allow_empty = http.method != "PATCH" and not required  # a PATCH must say what it changes

    async def endpoint(request: Request, **params):
        values = {names.get(key, key): value for key, value in params.items()}
        if model is not None:
            body = await bounds.parse_request(request, model, limit=limit, allow_empty=allow_empty)
            values.update({names[k]: tuple(v) if isinstance(v, list) else v
                           for k, v in body.model_dump(exclude_unset=True).items()})
        command, api = op(**values), rt.ready_api()
        content = await asyncio.to_thread(lambda: bounds.encode_json(command.respond(api)))
        return Response(content, status_code=http.status, media_type="application/json")

    # FastAPI reads the path fields and the query from the signature, and documents them
    endpoint.__signature__ = inspect.Signature(
        [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str) for name in path]
        + [_query_parameter(op, wire, f) for wire, f in op.wire_fields().items() if http.query])
    app.add_api_route(http.route, endpoint, methods=[http.method], name=op.name, status_code=http.status)


def _query_parameter(op, wire: str, f: dataclasses.Field) -> inspect.Parameter:
    bounded = Query(f.default, ge=f.metadata.get("ge"), le=f.metadata.get("le"))
    return inspect.Parameter(wire, inspect.Parameter.KEYWORD_ONLY, default=bounded,
                             annotation=op.field_types()[f.name])


def _wire_type(annotation):
    """The type a JSON body gives a field: a bool must be one (not 1 or "true"), a tuple is a list."""
    if annotation is bool:
        return StrictBool
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return list[_wire_type(args[0])]
    if args and typing.get_origin(annotation) in (typing.Union, type(int | None)):
        return typing.Union[tuple(_wire_type(a) for a in args)]  # noqa: UP007 - built from parts
    return annotation


def _resolve(bound):
    return bound() if callable(bound) else bound


SERVED = [op for op in protocol.OPERATIONS if op.http.served]
BOUNDS = {op: declare(op) for op in SERVED}
