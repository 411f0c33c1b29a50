"""One worker thread per device runs all model work, first come first served.

The event loop never touches the model: it submits a job and awaits its future (or reads its
event queue, for streamed chat). Generations that wait or run are counted; past
``max_queued`` a new one is refused with ``Busy`` (HTTP 429). Every job carries a cancel flag:
a job cancelled while waiting is skipped, a running one is told through ``job.cancelled()``
(the engine checks it between prefill chunks and decode steps).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from superlinear.errors import Busy


class JobCancelled(Exception):
    pass


class Job:
    def __init__(self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop, kind: str,
                 events: asyncio.Queue | None = None):
        self.fn = fn
        self.loop = loop
        self.kind = kind
        self.cancel_event = threading.Event()
        self.future: asyncio.Future = loop.create_future()
        self.events = events
        self.submitted = time.monotonic()
        self.started: float | None = None

    @property
    def queued_s(self) -> float:
        """Seconds the job waited before the worker started it (so far, if it has not)."""
        return (self.started or self.submitted) - self.submitted

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        self.cancel_event.set()

    def emit(self, item: Any) -> None:
        """From the worker thread: hand one event to the awaiting coroutine."""
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def _resolve(self, result: Any = None, exc: BaseException | None = None) -> None:
        def settle():
            if self.future.done():
                return
            if exc is not None:
                self.future.set_exception(exc)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # loop closed (shutdown)
            pass


class Worker:
    def __init__(self, max_queued: int = 16, name: str = "spl-model-worker"):
        self.max_queued = max_queued
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._generations = 0  # waiting or running
        self.current: Job | None = None
        self.completed = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def generations(self) -> int:
        return self._generations

    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, fn: Callable[[Job], Any], *, kind: str = "admin", stream: bool = False) -> Job:
        """Queue ``fn(job)`` (call from the event loop). ``kind="generation"`` counts against the limit."""
        loop = asyncio.get_running_loop()
        job = Job(fn, loop, kind, events=asyncio.Queue() if stream else None)
        with self._lock:
            if kind == "generation":
                if self._generations >= self.max_queued:
                    raise Busy(f"the server is busy: {self._generations} generation(s) are running or queued "
                               f"(--max-concurrency {self.max_queued}); retry later")
                self._generations += 1
        self._queue.put(job)
        return job

    async def run(self, fn: Callable[[Job], Any], *, kind: str = "admin") -> Any:
        """Submit and await the result; cancelling the awaiting task cancels the job."""
        job = self.submit(fn, kind=kind)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancel()
            raise

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job.cancelled():
                    job._resolve(exc=JobCancelled("cancelled before it started"))
                    continue
                self.current = job
                job.started = time.monotonic()
                try:
                    result = job.fn(job)
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                    job._resolve(exc=exc)
                else:
                    job._resolve(result)
            finally:
                self.current = None
                self.completed += 1
                if job.kind == "generation":
                    with self._lock:
                        self._generations -= 1

    def cancel_all(self) -> None:
        """Cancel every waiting job and the running one (shutdown)."""
        with self._queue.mutex:
            pending = list(self._queue.queue)
        for job in pending:
            if job is not None:
                job.cancel()
        if self.current is not None:
            self.current.cancel()

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """From a plain thread (not the loop): run ``fn`` on the worker and wait for it."""
        done = threading.Event()
        box: dict = {}

        class _Direct(Job):
            def __init__(self):  # no loop needed
                self.kind = "admin"
                self.cancel_event = threading.Event()
                self.events = None
                self.started = None

            def _resolve(self, result=None, exc=None):
                box["result"], box["exc"] = result, exc
                done.set()

        job = _Direct()
        job.fn = lambda _job: fn()
        self._queue.put(job)
        if not done.wait(timeout):
            raise TimeoutError("the model worker did not answer in time")
        if box.get("exc") is not None:
            raise box["exc"]
        return box.get("result")

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
