"""Records spl keeps on disk or takes as uploads (snapshot manifests, server.json), read through
one strict path: a size cap before anything is parsed, a nesting cap before anything is used,
then a pydantic model in strict mode (no coercion: ``"5"`` is not an int). What fails is a
``InvalidRequest`` naming the first bad field, so a hostile record is refused, not accepted and
then a crash wherever its value is first used.
"""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from superlinear.errors import InvalidRequest

MAX_DEPTH = 32  # our records nest 4 deep; a transcript's tool arguments a few more

M = TypeVar("M", bound=BaseModel)


class BadRecord(InvalidRequest):
    """A record does not match its schema; ``param`` names the field."""

    code = "invalid_record"


def depth(data) -> int:
    """How deep parsed JSON nests (walked without recursion)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, level)
        stack.extend((v, level + 1) for v in value if isinstance(v, (dict, list)))
    return deepest


def field_of(error: ValidationError) -> str:
    """The dotted path of the first bad field (``session.position``), or the record itself."""
    loc = error.errors()[0].get("loc", ()) if error.errors() else ()
    return ".".join(str(part) for part in loc) or "record"


def checked_json(raw: bytes | str, schema: type[BaseModel], *, what: str, max_bytes: int,
                 max_depth: int = MAX_DEPTH):
    """The JSON value of ``raw``, once it is known to match ``schema`` (plain dicts and lists, as
    callers use them); ``what`` names the record in messages."""
    if len(raw) > max_bytes:
        raise BadRecord(f"{what} is {len(raw)} bytes; at most {max_bytes} are allowed", param=what)
    too_deep = BadRecord(f"{what} is nested too deeply (at most {max_depth} levels)", param=what)
    try:
        data = json.loads(raw)  # the C parser: past ~1000 levels a RecursionError, not a crash
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRecord(f"{what} is not valid JSON ({exc})", param=what) from None
    if depth(data) > max_depth:
        raise too_deep
    validate(data, schema, what=what)
    return data


def validate(data, schema: type[M], *, what: str) -> M:
    try:
        return schema.model_validate(data, strict=True)
    except ValidationError as exc:
        field = field_of(exc)
        detail = exc.errors()[0].get("msg", "invalid") if exc.errors() else "invalid"
        raise BadRecord(f"{what}: field {field!r} is invalid ({detail})", param=field) from None
