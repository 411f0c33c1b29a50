"""One worker thread per model runs all work that touches it: the scheduler's steps
(``superlinear.engine.scheduler``: every running generation advances each step, batched) and,
between steps, the other jobs (session admin, loading).

A caller on any thread submits a job and waits on its future (``concurrent.futures``; an
asyncio caller wraps it with ``asyncio.wrap_future``); a streaming job hands each event to the
``emit`` callback it was given. Generations that wait or run are counted; past ``max_queued`` a
new one is refused with ``Busy``. Every job carries a cancel flag: a job cancelled while waiting
is skipped, a running one sees it through ``job.cancel_event`` (the engine checks it between
prefill chunks and decode steps).

Order: jobs of one session (``session=``) run one at a time, in arrival order, so a session's
turn, fork, rollback, resize or save never sees another's half turn. A job of no session runs
at once: generations (they use conversations of their own) beside the others, an admin job
alone, once every running generation ended (and nothing behind it starts before it).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from superlinear.engine.scheduler import Scheduler
from superlinear.errors import Busy


class JobCancelled(Exception):
    """The job was cancelled before it started."""


class Job:
    def __init__(self, fn: Callable[[Job], Any], kind: str, emit: Callable[[Any], None] | None = None,
                 session: Hashable | None = None):
        self.fn = fn
        self.kind = kind
        self.session = session
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
    def __init__(self, max_queued: int = 16, name: str = "spl-model-worker", *, max_step_tokens: int | None = None,
                 on_step: Callable[[int, int, float], None] | None = None,
                 on_start: Callable[[Job], None] | None = None):
        self.max_queued = max_queued
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._generations = 0  # waiting or running
        self._waiting: list[Job] = []  # taken from the queue, not started (their session is busy)
        self._running: dict[int, Job] = {}  # id(live sequence) -> its generation job
        self._stopping = False
        self._admitting = False  # jobs are being started: a sequence is not alone then
        self.current: Job | None = None  # the admin job running now
        self.on_start = on_start  # (job) when a job starts: its queue time is known
        self.scheduler = Scheduler(max_step_tokens, arrivals=self._arrivals, on_step=on_step)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def generations(self) -> int:
        return self._generations

    def queued(self) -> int:
        """Jobs waiting for the worker."""
        return self._queue.qsize() + len(self._waiting)

    def running(self) -> int:
        """Generations running now (in the scheduler's batch or prefilling)."""
        return len(self._running)

    def _arrivals(self) -> bool:
        return self._admitting or not self._queue.empty()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[[Job], Any], *, kind: str = "admin",
               emit: Callable[[Any], None] | None = None, session: Hashable | None = None) -> Job:
        """Queue ``fn(job)`` (from any thread). ``kind="generation"`` counts against the limit;
        ``session``: what the job works on (jobs of one session run one at a time, in order)."""
        job = Job(fn, kind, emit, session)
        with self._lock:
            if kind == "generation":
                if self._generations >= self.max_queued:
                    raise Busy(f"busy: {self._generations} generation(s) are running or queued (at most "
                               f"{self.max_queued}); retry later")
                self._generations += 1
        self._queue.put(job)
        return job

    def call(self, fn: Callable[[], Any], timeout: float | None = None, *, session: Hashable | None = None) -> Any:
        """Run ``fn`` on the worker and wait for its result (run directly when already on it)."""
        if self.on_thread():
            return fn()
        job = self.submit(lambda _job: fn(), session=session)
        try:
            return job.future.result(timeout)
        except concurrent.futures.TimeoutError:
            job.cancel()
            raise TimeoutError("the model worker did not answer in time") from None

    # -- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._take(block=not self.scheduler.live and not self._waiting)
            self._admit()
            if self.scheduler.live:
                self.scheduler.step()
            elif self._stopping and not self._waiting:
                return

    def _take(self, block: bool) -> None:
        """Move what arrived from the queue to ``_waiting`` (waiting for the first if ``block``)."""
        while True:
            try:
                job = self._queue.get(block=block and not self._stopping)
            except queue.Empty:
                return
            block = False
            if job is None:
                self._stopping = True
            else:
                self._waiting.append(job)

    def _admit(self) -> None:
        """Start, in arrival order, every waiting job whose session is free."""
        busy = {job.session for job in self._running.values() if job.session is not None}
        still: list[Job] = []
        self._admitting = True
        try:
            self._admit_each(busy, still)
        finally:
            self._admitting = False
        self._waiting[:] = still

    def _admit_each(self, busy: set, still: list[Job]) -> None:
        barrier = False  # an admin job of no session waits for the running ones: nothing passes it
        for job in list(self._waiting):
            if job.cancelled() or job.future.cancelled():
                self._skip(job)
                continue
            alone = job.kind != "generation" and job.session is None
            if barrier or (alone and self.scheduler.live) or (job.session is not None and job.session in busy):
                still.append(job)
                barrier = barrier or alone
                if job.session is not None:
                    busy.add(job.session)
                continue
            if not job.future.set_running_or_notify_cancel():
                self._finished(job)
                continue
            job.started = time.monotonic()
            if self.on_start is not None:
                self.on_start(job)
            if job.kind == "generation":
                self._start_generation(job)
                if job.session is not None and id(job) in self._running:  # still running
                    busy.add(job.session)
            else:
                self._run_now(job)

    def _skip(self, job: Job) -> None:
        if not job.future.cancelled():
            job.future.set_exception(JobCancelled("cancelled before it started"))
        self._finished(job)

    def _run_now(self, job: Job) -> None:
        self.current = job
        try:
            result = job.fn(job)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        finally:
            self.current = None
            self._finished(job)

    def _start_generation(self, job: Job) -> None:
        out: dict = {}

        def ended(error: BaseException | None) -> None:
            self._running.pop(key, None)
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(out.get("result"))
            self._finished(job)

        key = id(job)
        self._running[key] = job
        self.scheduler.start(lambda: out.__setitem__("result", job.fn(job)), on_end=ended)

    def _finished(self, job: Job) -> None:
        if job.kind == "generation":
            with self._lock:
                self._generations -= 1

    def cancel_all(self) -> None:
        """Cancel every waiting job and the running ones (shutdown)."""
        with self._queue.mutex:
            pending = list(self._queue.queue)
        for job in pending + list(self._waiting) + list(self._running.values()) + [self.current]:
            if job is not None:
                job.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
