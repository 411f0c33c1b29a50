"""What every route module shares: request bodies with a size limit and OpenAI-style errors."""

from __future__ import annotations

import os
import tempfile

from fastapi import Request
from fastapi.responses import JSONResponse

from superlinear.errors import BodyTooLarge, UserError

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
