"""One worker thread per model runs all work that touches it, first come first served.

A caller on any thread submits a job and waits on its future (``concurrent.futures``; an
asyncio caller wraps it with ``asyncio.wrap_future``); a streaming job hands each event to the
``emit`` callback it was given, on the worker thread. Generations that wait or run are counted;
past ``max_queued`` a new one is refused with ``Busy``. Every job carries a cancel flag: a job
cancelled while waiting is skipped, a running one sees it through ``job.cancel_event`` (the
engine checks it between prefill chunks and decode steps).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from superlinear.errors import Busy


class JobCancelled(Exception):
    """The job was cancelled before it started."""


class Job:
    def __init__(self, fn: Callable[[Job], Any], kind: str, emit: Callable[[Any], None] | None = None):
        self.fn = fn
        self.kind = kind
        self.emit = emit or (lambda _item: None)
        self.cancel_event = threading.Event()
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted = time.monotonic()
        self.started: float | None = None

    @property
    def queued_s(self) -> float:
        """Seconds the job waited before the worker started it (so far, if it has not)."""
        return (self.started or time.monotonic()) - self.submitted

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        self.cancel_event.set()


class Worker:
    def __init__(self, max_queued: int = 16, name: str = "spl-model-worker"):
        self.max_queued = max_queued
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._generations = 0  # waiting or running
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def generations(self) -> int:
        return self._generations

    def queued(self) -> int:
        """Jobs waiting for the worker."""
        return self._queue.qsize()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[[Job], Any], *, kind: str = "admin",
               emit: Callable[[Any], None] | None = None) -> Job:
        """Queue ``fn(job)`` (from any thread). ``kind="generation"`` counts against the limit."""
        job = Job(fn, kind, emit)
        with self._lock:
            if kind == "generation":
                if self._generations >= self.max_queued:
                    raise Busy(f"busy: {self._generations} generation(s) are running or queued (at most "
                               f"{self.max_queued}); retry later")
                self._generations += 1
        self._queue.put(job)
        return job

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the worker and wait for its result (run directly when already on it)."""
        if self.on_thread():
            return fn()
        job = self.submit(lambda _job: fn())
        try:
            return job.future.result(timeout)
        except concurrent.futures.TimeoutError:
            job.cancel()
            raise TimeoutError("the model worker did not answer in time") from None

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job.cancelled():
                    job.future.set_exception(JobCancelled("cancelled before it started"))
                    continue
                if not job.future.set_running_or_notify_cancel():  # its future was cancelled
                    continue
                self.current = job
                job.started = time.monotonic()
                try:
                    result = job.fn(job)
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    job.future.set_exception(exc)
                else:
                    job.future.set_result(result)
            finally:
                self.current = None
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
        current = self.current
        if current is not None:
            current.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
