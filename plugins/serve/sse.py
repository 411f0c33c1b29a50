"""Server-sent events: the one place that frames them and ends a stream.

A stream is a sequence of JSON chunks, then ``data: [DONE]``. An error after the response has
started cannot change its status any more: it goes into the stream as an OpenAI error body,
followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from superlinear.errors import UserError

from . import progress

log = logging.getLogger("spl.serve")
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def frame(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def internal_error_body(exc: BaseException) -> dict:
    return {"error": {"message": f"internal error: {type(exc).__name__}: {exc}".splitlines()[0],
                      "type": "server_error", "param": None, "code": "internal_error"}}


def response(chunks: AsyncIterator[dict], on_close: Callable[[], None],
             ping_s: float | None = progress.DEFAULT_PING_S) -> StreamingResponse:
    """Stream ``chunks`` as SSE. ``on_close`` runs however the stream ends (finished, failed, or
    the client went away), e.g. to stop the work that feeds it. A ``: keep-alive`` comment goes
    out after ``ping_s`` seconds of silence (None: never), so proxies keep a long prefill's stream."""

    async def body():
        try:
            async for chunk in chunks:
                yield frame(chunk)
            yield frame("[DONE]")
        except UserError as exc:
            yield frame(exc.to_openai())
            yield frame("[DONE]")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug mid-stream: report it in the stream
            log.exception("spl: error while streaming")
            yield frame(internal_error_body(exc))
            yield frame("[DONE]")
        finally:
            on_close()

    return StreamingResponse(progress.with_keepalive(body(), ping_s), media_type="text/event-stream",
                             headers=HEADERS)
