"""What the routes work on: the in-process API (``superlinear.api.LocalApi``: the model, its
sessions and snapshots, and the worker thread that runs whatever touches them) and what it says
of its model (``model``), and the server's own state (loading, health, metrics). Everything the
server reads of the model and its sessions goes through that API.

The model is loaded in a background thread after the socket is bound, so ``/health`` answers
(``"status": "loading"``) while it loads and ``spl server start`` can show progress. Listings
and ``/health`` read plain bookkeeping and never wait for the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import Any

from superlinear.api.types import ModelInfo, SessionListing
from superlinear.api.worker import Worker
from superlinear.defaults import TEMPERATURE
from superlinear.errors import Unavailable
from superlinear.settings.options import ServeOptions
from superlinear.settings.threads import default_threads, use_threads

from .metrics import ServerMetrics

log = logging.getLogger("spl.serve")
# A prefill of fewer tokens is dominated by fixed costs: its speed says little about a long one.
MEASURED_PREFILL_TOKENS = 256
# A session whose persist failed (disk full, read-only) is written again when the disk may have
# recovered: on /health at most this often, and in the background (``retry_persists_forever``).
PERSIST_RETRY_S = 2.0
PERSIST_RETRY_BACKGROUND_S = 30.0


class Runtime:
    def __init__(self, options: ServeOptions):
        self.options = options
        # the metrics' scheduler block observes every step and every job's queue time
        self.worker = Worker(max_queued=options.max_concurrency, max_step_tokens=options.max_step_tokens,
                             on_step=lambda *step: self.metrics.scheduler.step(*step),
                             on_start=lambda job: self.metrics.scheduler.started(job))
        self.status = "loading"  # loading | ok | error | stopping
        self.progress = f"loading model {options.model}"
        self.error: str | None = None
        self.failed_step: str | None = None  # what was being done when the start-up failed
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.api = None  # the LocalApi every route calls, once the model is loaded
        self.model: ModelInfo | None = None  # its model, as it was when loaded
        self.metrics = ServerMetrics(self)
        self._load_started = time.monotonic()
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "generations": 0, "cancelled": 0, "errors": 0}
        self.prefill_speed: dict | None = None  # the last measured prefill (``note_prefill``)
        self.on_load_error = None  # called (from the loader thread) when the model cannot be loaded
        self.threads: int | None = None  # torch's CPU threads on the worker, once set
        self.conversion: dict | None = None  # {"step", "steps", "what"} while the default model is converted
        self._next_persist_retry = 0.0
        self._persist_retry = None  # the retry job on the worker, while it runs

    # -- lifecycle -----------------------------------------------------------------------
    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="spl-model-loader", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._open()
        except BaseException as exc:  # noqa: BLE001 - reported by /health and the log
            self.status = "error"
            self.failed_step = self.progress
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            self.error = message.splitlines()[0] if message.strip() else type(exc).__name__
            log.error("spl: loading the model failed: %s", self.error)
            if os.environ.get("SPL_TRACE") == "1":
                log.exception("traceback")
            if self.on_load_error is not None:
                self.on_load_error(self.error)
            return
        self.status = "ok"
        self.ready_at = time.time()
        log.info("spl: model %s ready in %.1fs; %d session(s) known", self.model_name,
                 time.monotonic() - self._load_started, self.api.list_sessions()["count"])

    def _open(self) -> None:
        from superlinear import connect
        from superlinear.pluginloader import model_loaders

        o = self.options
        # on the worker thread, which runs every model call
        self.threads = use_threads(o.threads or default_threads())
        if o.model == "default":
            from superlinear.model.default import ensure_default

            ensure_default(progress=self._conversion_step)  # once per machine: say how far it is
            self.conversion = None

        def progress(line: str) -> None:
            self.progress = line

        self.api = connect("local", worker=self.worker, progress=progress, model=o.model,
                           served_model_name=o.served_model_name, device=o.device,
                           memory_budget=o.memory_budget or "auto", persist=o.persist, max_seq_len=o.max_seq_len,
                           chunk_size=o.chunk_size, loaders=tuple(model_loaders()))
        self.model = self.api.get_model()

    def _conversion_step(self, index: int, what: str) -> None:
        from superlinear.model.default import CONVERSION_STEPS

        self.conversion = {"step": index + 1, "steps": len(CONVERSION_STEPS), "what": what}
        self.progress = f"converting the default model, once (step {index + 1}/{len(CONVERSION_STEPS)}: {what})"

    @property
    def defaults(self) -> dict:
        """Sampling defaults for requests that leave them out."""
        return {"temperature": TEMPERATURE}

    def loading_progress(self) -> str:
        return f"{self.progress} ({time.monotonic() - self._load_started:.0f}s)"

    def ready_api(self):
        """The API the routes call, once the model is loaded (else ``Unavailable``)."""
        self.require_ready()
        return self.api

    def require_ready(self) -> None:
        if self.status == "ok":
            return
        if self.status == "error":
            raise Unavailable(f"the server failed to start ({self.failed_step}): {self.error}")
        if self.status == "stopping":
            raise Unavailable("the server is shutting down")
        raise Unavailable(f"the model is still loading: {self.loading_progress()}; retry shortly",
                          code="model_loading")

    def shutdown(self) -> int:
        """Cancel queued/running work, snapshot open sessions (persist_all), stop the worker."""
        was_ok = self.status == "ok"
        self.status = "stopping"
        self.worker.cancel_all()
        saved = 0
        if was_ok and self.api is not None:
            try:  # brings every session's journal up to date on the worker, then stops it
                saved = len(self.api.close(timeout=600))
            except BaseException as exc:  # noqa: BLE001 - logged; shutdown goes on
                log.error("spl: saving sessions at shutdown failed: %s", exc)
        self.worker.stop(timeout=30.0 if was_ok else 1.0)
        log.info("spl: stopped; %d session(s) saved", saved)
        return saved

    # -- durability ------------------------------------------------------------------------
    async def retry_failed_persists(self, wait_s: float = 2.0) -> None:
        """Persist again every session whose last persist failed, on the worker (waiting up to
        ``wait_s`` for it): a session left idle after a failure has no next turn to retry it, so
        without this /health would report the failure long after the disk recovered."""
        if (self.status != "ok" or time.monotonic() < self._next_persist_retry
                or (self._persist_retry is not None and not self._persist_retry.future.done())
                or not self.persist_errors(self.api.list_sessions())):
            return  # one retry at a time: a long turn on the worker must not pile them up
        self._next_persist_retry = time.monotonic() + PERSIST_RETRY_S
        self._persist_retry = self.api.persist_failed()
        with contextlib.suppress(Exception):  # noqa: BLE001 - timed out (it goes on) or failed: /health answers
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._persist_retry.future)), wait_s)

    async def retry_persists_forever(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_RETRY_BACKGROUND_S)
            with contextlib.suppress(Exception):  # noqa: BLE001 - a retry must not end the loop
                await self.retry_failed_persists()

    # -- read-only views (safe off the worker) -------------------------------------------
    @property
    def model_name(self) -> str:
        if self.model is not None:
            return self.model["id"]
        return self.options.served_model_name or self.options.model

    def health(self) -> dict:
        h: dict[str, Any] = {
            "status": self.status,
            "model": self.model_name,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "queued": self.worker.generations,
            "busy": self.worker.current is not None or self.worker.running() > 0,
            "scheduler": self.scheduler_state(),
            "threads": self.threads,
        }
        if self.status == "loading":
            h["progress"] = self.loading_progress()
            if self.conversion is not None:
                h["conversion"] = self.conversion
        if self.error:
            h["error"] = self.error
        if self.status == "ok":
            h["prefill"] = self.prefill_speed
            try:
                listing = self.api.list_sessions()
                h["sessions"] = listing["count"]
                h["memory"] = self.memory_info(listing)
                h["persist"] = self.persist_info(listing)
                skipped = self.api.skipped_snapshots()  # as of the last listing: never reads the store
                if skipped:
                    h["snapshots_skipped"] = skipped
            except Exception:  # noqa: BLE001 - /health must answer
                h.setdefault("sessions", None)
            from superlinear.version import __version__

            h["version"] = __version__
        return h

    def scheduler_state(self) -> dict:
        """What the engine's scheduler does now (``/health``, ``spl server status``)."""
        worker = self.worker
        sched = worker.scheduler
        stats = sched.stats
        step_tokens = sched.step_tokens(self.api.model) if self.api is not None else self.options.max_step_tokens
        return {"running": worker.running(), "decoding": stats.decoding, "prefilling": stats.prefilling,
                "waiting": max(0, worker.generations - worker.running()), "batch": stats.last_batch,
                "steps": stats.steps, "max_step_tokens": step_tokens}

    def finished(self, done, *, session_id: str | None, persisted: bool | None, queued_s: float | None) -> None:
        """A generation ended: count it, remember its prefill speed, record its metrics."""
        self.stats["generations"] += 1
        self.note_prefill(done.usage, done.timings)
        self.metrics.turn(done, session_id=session_id, queued_s=queued_s, persisted=persisted)

    def note_prefill(self, usage: dict, timings: dict) -> None:
        """Remember the speed of the last prefill long enough to measure (clients estimate the
        time of the next long one from it, before it starts)."""
        tokens, seconds = usage.get("prefill_tokens") or 0, timings.get("prefill_s") or 0
        if tokens >= MEASURED_PREFILL_TOKENS and seconds > 0:
            self.prefill_speed = {"tokens": int(tokens), "seconds": round(float(seconds), 3),
                                  "tokens_per_s": round(tokens / seconds, 1)}

    def memory_info(self, listing: SessionListing) -> dict:
        """The session memory budget: ``{"budget", "used", "free", "max_seq_len_limit", "eviction"}``."""
        budget, used, model = listing["memory_budget"], listing["bytes"], self.api.get_model()
        return {"budget": budget, "used": used, "free": None if budget is None else budget - used,
                "max_seq_len_limit": model["max_seq_len_limit"], "default_max_seq_len": model["default_max_seq_len"],
                "eviction": listing["evict_to_disk"]}

    def persist_info(self, listing: SessionListing) -> dict:
        """Durability at a glance: ``ok`` is False while some session's last persist failed
        (disk full, read-only): its journal holds an older state than the answers gave."""
        failing = self.persist_errors(listing)
        return {"mode": self.options.persist, "ok": not failing, "failing_sessions": sorted(failing),
                "error": next(iter(failing.values()), None)}

    @staticmethod
    def persist_errors(listing: SessionListing) -> dict[str, str]:
        """``{session id: why its last persist failed}``."""
        return {s["id"]: s["persist_error"] for s in listing["sessions"] if s["persist_error"]}


