"""What the server counts: Prometheus metrics (`GET /metrics`) and one structured log line per turn.

Counters move as requests and turns finish; gauges (queue, sessions, memory) are read from the
runtime when `/metrics` is scraped, so they are never stale. Each server has its own registry:
two servers in one process (tests) do not share numbers. Every series carries a `model_name`
label (the served model's name, as vLLM's do), so dashboards written for several servers can
tell them apart; docs/server.md maps each series to vLLM's and llama.cpp's names, and
docs/grafana/spl.json is a dashboard on them.
"""

from __future__ import annotations

import json
import logging
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("spl.turn")
# No `*_created` series beside every counter and histogram: dashboards do not read them
# (vLLM and llama.cpp publish none), and they double the scrape.
disable_created_metrics()

# Turn phases last from milliseconds (a cached prompt) to minutes (a 1M-token prefill).
_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Time per output token: a few ms on a GPU to seconds on a loaded CPU.
_TOKEN_SECONDS_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
# Tokens per request, 1-2-5 steps as vLLM's, up to the longest contexts spl serves.
_TOKEN_COUNT_BUCKETS = tuple(m * 10 ** e for e in range(7) for m in (1, 2, 5))
MODEL = ["model_name"]  # the label every series has


class ServerMetrics:
    def __init__(self, runtime):
        self.runtime = runtime
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("spl_requests", "HTTP requests answered", MODEL + ["method", "route", "status"],
                                registry=r)
        self.turns = Counter("spl_turns", "Chat turns finished, by finish reason", MODEL + ["finish"], registry=r)
        self.prompt_tokens = Counter("spl_prompt_tokens", "Prompt tokens of finished turns", MODEL, registry=r)
        self.completion_tokens = Counter("spl_completion_tokens", "Tokens generated", MODEL, registry=r)
        self.cached_tokens = Counter("spl_cached_tokens",
                                     "Prompt tokens reused from the cache (not prefilled again)", MODEL, registry=r)
        self.prefill_tokens = Counter("spl_prefill_tokens", "Prompt tokens prefilled", MODEL, registry=r)
        self.prefill_seconds = Histogram("spl_prefill_seconds", "Prefill time per turn", MODEL, registry=r,
                                         buckets=_SECONDS_BUCKETS)
        self.decode_seconds = Histogram("spl_decode_seconds", "Decode time per turn", MODEL, registry=r,
                                        buckets=_SECONDS_BUCKETS)
        # the latencies vLLM's and llama.cpp's dashboards read (docs/server.md maps the names)
        self.time_to_first_token = Histogram(
            "spl_time_to_first_token_seconds", "From the request's arrival at the model worker's queue to its "
            "first token (queue wait + prefill)", MODEL, registry=r, buckets=_SECONDS_BUCKETS)
        self.time_per_output_token = Histogram(
            "spl_time_per_output_token_seconds", "Mean time per generated token of a request (decode time / "
            "tokens)", MODEL, registry=r, buckets=_TOKEN_SECONDS_BUCKETS)
        self.e2e_latency = Histogram(
            "spl_e2e_request_latency_seconds", "From the request's arrival at the model worker's queue to its "
            "last token (queue wait + prefill + decode)", MODEL, registry=r, buckets=_SECONDS_BUCKETS)
        self.request_prompt_tokens = Histogram(
            "spl_request_prompt_tokens", "Prompt tokens per request", MODEL, registry=r,
            buckets=_TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = Histogram(
            "spl_request_generation_tokens", "Generated tokens per request", MODEL, registry=r,
            buckets=_TOKEN_COUNT_BUCKETS)
        self.prefill_rate = Gauge("spl_prefill_tokens_per_second", "Prefill tokens/s of the last turn", MODEL,
                                  registry=r)
        self.decode_rate = Gauge("spl_decode_tokens_per_second", "Decode tokens/s of the last turn", MODEL,
                                 registry=r)
        self._per_model = (self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.prefill_tokens,
                           self.prefill_seconds, self.decode_seconds, self.time_to_first_token,
                           self.time_per_output_token, self.e2e_latency,
                           self.request_prompt_tokens, self.request_generation_tokens, self.prefill_rate,
                           self.decode_rate)
        self._named: str | None = None
        r.register(_RuntimeGauges(runtime))
        self.scheduler = SchedulerMetrics(runtime, r)

    @property
    def model_name(self) -> str:
        """The ``model_name`` label: the served model's name. Its series exist from the first
        scrape (zero), so a dashboard's queries resolve before the first request."""
        name = self.runtime.model_name
        if name != self._named:
            for metric in self._per_model + self.scheduler.per_model:
                metric.labels(name)
            self._named = name
        return name

    def request(self, method: str, route: str, status: int) -> None:
        self.requests.labels(self.model_name, method, route, str(status)).inc()

    def turn(self, done, *, session_id: str | None, queued_s: float | None, persisted: bool | None) -> None:
        """Count a finished turn (an engine ``Done``) and log it as one JSON line."""
        usage, timings, name = done.usage, done.timings, self.model_name
        self.turns.labels(name, done.finish_reason).inc()
        self.prompt_tokens.labels(name).inc(usage.get("prompt_tokens") or 0)
        self.completion_tokens.labels(name).inc(usage.get("completion_tokens") or 0)
        self.cached_tokens.labels(name).inc(usage.get("cached_tokens") or 0)
        self.prefill_tokens.labels(name).inc(usage.get("prefill_tokens") or 0)
        self.request_prompt_tokens.labels(name).observe(usage.get("prompt_tokens") or 0)
        self.request_generation_tokens.labels(name).observe(usage.get("completion_tokens") or 0)
        if timings.get("prefill_s") is not None:
            self.prefill_seconds.labels(name).observe(timings["prefill_s"])
        if timings.get("decode_s") is not None:
            self.decode_seconds.labels(name).observe(timings["decode_s"])
        self._latencies(name, usage, timings, queued_s or 0.0)
        if timings.get("prefill_tokens_per_s"):
            self.prefill_rate.labels(name).set(timings["prefill_tokens_per_s"])
        if timings.get("decode_tokens_per_s"):
            self.decode_rate.labels(name).set(timings["decode_tokens_per_s"])
        log.info(json.dumps({
            "event": "turn", "session": session_id, "finish": done.finish_reason,
            "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": usage.get("cached_tokens"),
            "prefill_tokens": usage.get("prefill_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "queued_s": round(queued_s, 4) if queued_s is not None else None,
            "prefill_s": timings.get("prefill_s"), "prefill_tok_s": timings.get("prefill_tokens_per_s"),
            "decode_s": timings.get("decode_s"), "decode_tok_s": timings.get("decode_tokens_per_s"),
            "persisted": persisted,
        }, separators=(",", ":")))

    def _latencies(self, name: str, usage: dict, timings: dict, queued_s: float) -> None:
        prefill_s, decode_s = timings.get("prefill_s"), timings.get("decode_s")
        if prefill_s is None or decode_s is None:  # a turn cancelled before its first token
            return
        self.time_to_first_token.labels(name).observe(queued_s + prefill_s)
        self.e2e_latency.labels(name).observe(queued_s + prefill_s + decode_s)
        tokens = usage.get("completion_tokens") or 0
        if tokens:
            self.time_per_output_token.labels(name).observe(decode_s / tokens)

    def render(self) -> tuple[bytes, str]:
        _ = self.model_name  # the series of a model loaded since the last scrape
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RuntimeGauges:
    """Gauges read from the running server at scrape time."""

    def __init__(self, runtime):
        self.runtime = runtime

    def describe(self):
        return []  # not known before the first scrape (the model may still be loading)

    def collect(self):
        rt = self.runtime
        name = rt.model_name
        worker = rt.worker
        yield _gauge("spl_queue_depth", "Jobs waiting for the model worker", worker.queued(), name)
        yield _gauge("spl_generations", "Generations waiting or running", worker.generations, name)
        running = worker.running()
        yield _gauge("spl_requests_running", "Generations running on the model (batched by the scheduler)", running,
                     name)
        yield _gauge("spl_requests_waiting", "Generations waiting for the model", max(0, worker.generations - running),
                     name)
        if rt.api is not None:
            listing = rt.api.list_sessions()
            sessions = GaugeMetricFamily("spl_sessions", "Open sessions", labels=MODEL + ["state"])
            sessions.add_metric([name, "resident"], listing["resident"])
            sessions.add_metric([name, "on_disk"], listing["count"] - listing["resident"])
            yield sessions
            used, budget = listing["bytes"], listing["memory_budget"]
            yield _gauge("spl_session_memory_bytes", "Bytes resident sessions hold", used, name)
            if budget is not None:
                yield _gauge("spl_session_memory_budget_bytes", "The session memory budget", budget, name)
                yield _gauge("spl_cache_usage_ratio", "Share of the session memory budget the caches hold (0..1)",
                             min(1.0, used / budget) if budget else 0.0, name)
        yield _gauge("spl_process_resident_memory_bytes", "Resident memory of the server process", _rss(), name)
        device = _device_memory()
        if device is not None:
            yield _gauge("spl_device_memory_allocated_bytes", "GPU memory allocated by torch", device, name)


# -- the engine's scheduler (continuous batching) ---------------------------------------------------
# Its own block: a step is one batched decode of the running sequences plus prefill chunks.
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class SchedulerMetrics:
    """Step time, decode batch size and queue time as histograms (observed on the model's worker
    as they happen); running / waiting / batch gauges read at scrape time."""

    def __init__(self, runtime, registry: CollectorRegistry):
        r = registry
        self.runtime = runtime
        self.step_seconds = Histogram("spl_scheduler_step_seconds", "Time of one scheduler step (a batched "
                                      "decode plus prefill chunks)", MODEL, registry=r, buckets=_STEP_SECONDS_BUCKETS)
        self.batch_size = Histogram("spl_scheduler_batch_size", "Sequences decoded together in a step",
                                    MODEL, registry=r, buckets=_BATCH_BUCKETS)
        self.prefill_tokens = Counter("spl_scheduler_prefill_tokens", "Prompt tokens prefilled by scheduler "
                                      "steps", MODEL, registry=r)
        self.queue_seconds = Histogram("spl_request_queue_time_seconds", "Time a generation waited before the "
                                       "scheduler started it", MODEL, registry=r, buckets=_SECONDS_BUCKETS)
        self.per_model = (self.step_seconds, self.batch_size, self.prefill_tokens, self.queue_seconds)
        r.register(_SchedulerGauges(runtime))

    def step(self, batch: int, prefill_tokens: int, seconds: float) -> None:
        name = self.runtime.model_name
        self.step_seconds.labels(name).observe(seconds)
        if batch:
            self.batch_size.labels(name).observe(batch)
        if prefill_tokens:
            self.prefill_tokens.labels(name).inc(prefill_tokens)

    def started(self, job) -> None:
        if job.kind == "generation":
            self.queue_seconds.labels(self.runtime.model_name).observe(job.queued_s)


class _SchedulerGauges:
    def __init__(self, runtime):
        self.runtime = runtime

    def describe(self):
        return []

    def collect(self):
        state, name = self.runtime.scheduler_state(), self.runtime.model_name
        yield _gauge("spl_scheduler_running", "Sequences in the scheduler (decoding or prefilling)", state["running"],
                     name)
        yield _gauge("spl_scheduler_decoding", "Sequences decoding (the next step's batch)", state["decoding"], name)
        yield _gauge("spl_scheduler_prefilling", "Sequences whose prompt is being prefilled", state["prefilling"], name)
        yield _gauge("spl_scheduler_waiting", "Generations waiting to start", state["waiting"], name)
        yield _gauge("spl_scheduler_last_batch_size", "Sequences decoded in the last step", state["batch"], name)
        if state["max_step_tokens"]:
            yield _gauge("spl_scheduler_max_step_tokens", "Prompt tokens prefilled per step at most",
                         state["max_step_tokens"], name)


def _gauge(metric: str, doc: str, value, model_name: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(metric, doc, labels=MODEL)
    family.add_metric([model_name], float(value))
    return family


def _rss() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def _device_memory() -> int | None:
    import sys

    torch = sys.modules.get("torch")  # never import torch for this: the model imported it if used
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.memory_allocated())
