"""Validation of the ids users give to sessions and snapshots.

An id becomes a directory name in the snapshot store and a path segment in URLs, so only a
small, safe alphabet is accepted: letters, digits, '.', '_' and '-', starting with a letter or
digit, at most 128 characters, and never '..'. That rules out path traversal ('../x', '/x',
'a/b'), hidden or temporary names ('.tmp-…'), empty ids and anything a shell or URL would
need to quote.
"""

from __future__ import annotations

import re
import secrets
import time

from superlinear.errors import InvalidRequest

MAX_ID_LEN = 128
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_id(value: object, kind: str = "id", param: str | None = None) -> str:
    """Return ``value`` if it is a safe id, else raise ``InvalidRequest`` saying why."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{kind} must be a string, got {type(value).__name__}", param=param)
    if not value:
        raise InvalidRequest(f"{kind} must not be empty", param=param)
    if len(value) > MAX_ID_LEN:
        raise InvalidRequest(f"{kind} is {len(value)} characters long; at most {MAX_ID_LEN} are allowed",
                             param=param)
    if not _ID_RE.fullmatch(value) or ".." in value:
        raise InvalidRequest(
            f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (no '/', no '..')",
            param=param,
        )
    return value


def new_id(prefix: str) -> str:
    """A fresh id like ``snap-20261125-013000-3f9a1c``: sortable by time, unique in practice."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
