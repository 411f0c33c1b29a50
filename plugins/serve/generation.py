"""The one generation path of the server: a chat turn or a completion runs on the API's worker,
its events come back to the event loop through ``JobStream``, and ``generate`` answers with
them, streamed or whole. Both watch for the client leaving: a generation nobody reads stops
within one step."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request

from superlinear.api.worker import JobCancelled
from superlinear.errors import UserError

from . import progress, sse

END = object()  # the job's last item: the generation is over


class ClientGone(UserError):
    """The client disconnected (nginx's 499): nobody reads this answer."""

    http_status = 499
    code = "client_closed_request"


class JobStream:
    """A worker job's events on the event loop: ``submit(request, emit)`` queues the job (a
    ``LocalApi.submit_*``), ``next()`` awaits its next event (``END`` when it is over; an error
    raised on the worker is raised here)."""

    def __init__(self, submit, request):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(self.queue.put_nowait, item)

        self.job = submit(request, put)
        self.job.future.add_done_callback(lambda _f: put(END))  # after every event: same thread

    async def next(self):
        item = await self.queue.get()
        if item is END:
            exc = self.job.future.exception()
            if isinstance(exc, JobCancelled):
                raise ClientGone("the client went away before its generation started") from exc
            if exc is not None:
                raise exc
        return item

    async def events(self, first) -> AsyncIterator:
        event = first
        while event is not END:
            yield event
            event = await self.next()


async def generate(request: Request, stream: JobStream, *, streamed: bool,
                   chunks: Callable[[object], AsyncIterator[dict]], collect: Callable[[object], Awaitable],
                   ping_s: float | None = progress.DEFAULT_PING_S):
    """Answer a generation. Nothing is sent before its first event: what fails before (a prompt
    too long, the memory budget, a bad template) gets its own HTTP status."""
    watcher = asyncio.create_task(_watch_disconnect(request, stream.job))
    try:
        first = await stream.next()
    except BaseException:
        watcher.cancel()
        stream.job.cancel()
        raise
    if streamed:  # the stream's end tells: sse.response's on_close cancels the job
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        return sse.response(chunks(first), on_close=stream.job.cancel, ping_s=ping_s)
    try:
        return await collect(first)
    finally:
        watcher.cancel()
        stream.job.cancel()  # no-op when finished; stops the generation if this task was cancelled


async def _watch_disconnect(request: Request, job) -> None:
    """Cancel ``job`` when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return
