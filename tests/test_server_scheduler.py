"""Continuous batching on a real server (default model, CPU, one thread: conftest's
``one_thread_server``): a short chat gets its first token while a long prompt is being
prefilled, parallel chats run together instead of queueing, and /health and /metrics show the
scheduler."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_helpers import user

pytestmark = pytest.mark.slow

LONG_REPEATS = 300  # ~1.8K tokens: seconds to prefill on one thread (the assertion is relative to it)


@pytest.fixture(scope="module")
def server(one_thread_server):
    return one_thread_server


def long_prompt(tag: str) -> str:
    return f"{tag}: " + " ".join("the river runs to the sea" for _ in range(LONG_REPEATS))


def test_a_short_chat_is_answered_while_a_long_prompt_is_prefilled(server):
    with server.http(timeout=300) as c:
        long_result: dict = {}

        def ingest():
            with server.http(timeout=300) as c2:
                long_result["r"] = c2.post("/v1/completions", json={"prompt": long_prompt("busy"), "max_tokens": 1})
                long_result["end"] = time.perf_counter()

        thread = threading.Thread(target=ingest)
        thread.start()
        deadline = time.monotonic() + 30
        while c.get("/health").json()["scheduler"]["prefilling"] < 1:  # the ingest is under way
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.perf_counter()
        r = c.post("/v1/chat/completions", json={"messages": [user("Hi")], "max_tokens": 1, "temperature": 0})
        short_end = time.perf_counter()
        thread.join(300)
    assert r.status_code == 200 and long_result["r"].status_code == 200, long_result["r"].text
    ingest = long_result["r"].json()
    prefill_s = ingest["timings"]["prefill_s"]
    assert ingest["usage"]["prompt_tokens"] > 1500
    assert short_end < long_result["end"]  # answered before the ingest finished
    # its first (only) token came in a small part of the ingest's own prefill time
    assert short_end - t0 < 0.35 * prefill_s, (short_end - t0, prefill_s)


def test_parallel_chats_run_together(server):
    def body(i: int) -> dict:
        return {"messages": [user(f"Client {i}: name three rivers.")], "max_tokens": 12, "temperature": 0}

    with server.http(timeout=300) as c:
        c.post("/v1/chat/completions", json=body(99))  # warm
        results: list = [None] * 4

        def one(i: int):
            with server.http(timeout=300) as c2:
                t0 = time.perf_counter()
                results[i] = (c2.post("/v1/chat/completions", json=body(i)).json(), time.perf_counter() - t0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        queued = [r["timings"]["queued_s"] for r, _ in results]
        walls = [w for _, w in results]
        # none waited for another to finish: every one started before the quickest one ended
        assert max(queued) < min(walls) * 0.5, (queued, walls)
        health = c.get("/health").json()
        assert health["scheduler"]["steps"] > 0 and health["scheduler"]["max_step_tokens"] == 256
        metrics = httpx.get(server.url + "/metrics").text
        batch_counts = [line for line in metrics.splitlines() if line.startswith("spl_scheduler_batch_size_bucket")]
        assert batch_counts and "spl_request_queue_time_seconds_count" in metrics
        # some steps decoded more than one sequence: the le="1.0" bucket holds fewer than all
        le1 = next(float(line.split()[-1]) for line in batch_counts if 'le="1.0"' in line)
        total = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("spl_scheduler_batch_size_count"))
        assert le1 < total
