"""Long prefills people (and proxies) can watch: progress chunks and SSE keep-alives.

Both follow llama.cpp's server. A streamed request with ``"return_progress": true`` gets, while
its prompt is prefilled, chunks carrying ``prompt_progress: {total, cache, processed, time_ms}``
(overall progress ``processed/total``; the timed part ``(processed-cache)/(total-cache)``).
Every stream gets a ``: keep-alive`` comment line after ``sse_ping_interval`` seconds of silence
(``DEFAULT_PING_S``; ``<= 0`` turns them off), so a proxy or a client read timeout never cuts a
prefill that is still running. SSE clients skip comment lines.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

KEEPALIVE = b": keep-alive\n\n"
DEFAULT_PING_S = 5.0  # well under the 30-60 s idle limits of common proxies and load balancers


def prompt_progress(event) -> dict[str, int]:
    """llama.cpp's ``prompt_progress`` object of a ``PrefillProgress`` event."""
    return {"total": int(event.total), "cache": int(event.cached), "processed": int(event.done),
            "time_ms": int(event.elapsed_s * 1000)}


def progress_chunk(base: dict[str, Any], event) -> dict[str, Any]:
    """A ``chat.completion.chunk`` (``base``: id, object, created, model and spl's extras) that
    carries the progress, shaped as llama.cpp sends it: an empty assistant delta (``content``
    null, so OpenAI clients add no text) and ``prompt_progress`` at the top level."""
    return {**base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": None},
                         "finish_reason": None, "logprobs": None}],
            "prompt_progress": prompt_progress(event)}


def ping_interval(requested: float | None) -> float | None:
    """The keep-alive interval of a request: its ``sse_ping_interval``, else the default;
    ``None`` when it turned them off."""
    interval = DEFAULT_PING_S if requested is None else float(requested)
    return interval if interval > 0 else None


async def _next(it: AsyncIterator[bytes]) -> bytes:
    return await anext(it)


async def with_keepalive(stream: AsyncIterator[bytes], interval: float | None) -> AsyncIterator[bytes]:
    """``stream``'s parts, with ``KEEPALIVE`` whenever it stays silent ``interval`` seconds.

    The pending read is never cancelled by a ping (the stream does not notice them); when the
    consumer goes away, it is cancelled and the stream closed, so its own cleanup runs."""
    if interval is None:
        async for part in stream:
            yield part
        return
    it = aiter(stream)
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(it))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            try:
                part = pending.result()
            except StopAsyncIteration:
                pending = None
                return
            pending = None
            yield part
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
