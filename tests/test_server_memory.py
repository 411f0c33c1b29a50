"""The session memory budget on a real server: hundreds of empty sessions never get the server
killed (the budget refuses with an OpenAI-style 429, or evicts idle sessions to disk), a
max_seq_len the budget can never hold is a 400 that allocates nothing, and the default budget
is a fraction of the free memory."""

from __future__ import annotations

import os

import pytest
from server_helpers import SHUTDOWN_BUDGET, TINY_BUDGET, openai_error

pytestmark = pytest.mark.slow

BUDGET = SHUTDOWN_BUDGET  # conftest's ``persist_shutdown_server``: past its budget it refuses


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def refusing_server(persist_shutdown_server):
    """--persist shutdown: eviction would write whole sessions, so past the budget it refuses."""
    return persist_shutdown_server


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's RSS from /proc")
def test_hundreds_of_empty_sessions_are_refused_past_the_budget(refusing_server):
    """Past the budget a new session gets 429 memory_budget_exceeded; the server's memory stays
    near the budget and it keeps answering."""
    server = refusing_server
    with server.http(timeout=60) as c:
        before = rss(server.proc.pid)
        codes = []
        for _ in range(300):
            r = c.post("/v1/sessions", json={})
            codes.append(r.status_code)
            if r.status_code != 201:
                err = openai_error(r, 429, "memory_budget_exceeded")
                assert err["type"] == "rate_limit_error" and "budget" in err["message"]
        grown = rss(server.proc.pid) - before
        listing = c.get("/v1/sessions").json()
        assert server.proc.poll() is None and c.get("/health").status_code == 200
    created = codes.count(201)
    assert 1 <= created < 300 and codes[created:] == [429] * (300 - created), codes  # refused once full
    assert listing["count"] == created and listing["bytes"] <= listing["memory_budget"] == BUDGET
    assert grown < BUDGET + (64 << 20), f"the server grew by {grown >> 20} MiB for a {BUDGET >> 20} MiB budget"
    with server.http(timeout=60) as c:  # the budget free again for the server's other tests
        for session in listing["data"]:
            assert c.delete(f"/v1/sessions/{session['id']}").status_code == 200


def test_sessions_past_the_budget_evict_idle_ones(tiny_server):
    """--persist turn (the default): each session's journal is current, so the least recently
    used idle one is dropped from memory instead; it comes back on use, with its turn."""
    with tiny_server.http(timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                 "session_id": "evict-first", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["persisted"] is True, r.text
        per_session = c.get("/v1/sessions/evict-first").json()["bytes"]
        start = c.get("/v1/sessions").json()["count"]
        added = TINY_BUDGET // per_session + 5  # more than fit
        for _ in range(added):
            assert c.post("/v1/sessions", json={}).status_code == 201
            listing = c.get("/v1/sessions").json()
            assert listing["bytes"] <= TINY_BUDGET
        assert listing["count"] == start + added and listing["resident"] < listing["count"]
        assert not c.get("/v1/sessions/evict-first").json()["resident"]  # evicted, still listed
        history = c.get("/v1/sessions/evict-first/history").json()["messages"]
        assert [m["role"] for m in history] == ["user", "assistant"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "More"}],
                                                 "session_id": "evict-first", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["session_update"] == "append"
        assert len(c.get("/v1/sessions/evict-first/history").json()["messages"]) == 4


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's RSS from /proc")
def test_max_seq_len_beyond_the_budget_is_400_and_allocates_nothing(refusing_server):
    with refusing_server.http(timeout=60) as c:
        health = c.get("/health").json()
        limit = health["memory"]["max_seq_len_limit"]
        assert 0 < limit < 1_000_000
        before = rss(refusing_server.proc.pid)
        for body in ({"max_seq_len": 10_000_000}, {"max_seq_len": limit + 1}):
            err = openai_error(c.post("/v1/sessions", json=body), 400)
            assert err["code"] == "context_length_exceeded"
            assert f"at most {limit} tokens" in err["message"]
        openai_error(c.post("/v1/sessions", json={"max_seq_len": 2**70}), 400)
        assert rss(refusing_server.proc.pid) - before < 16 << 20


def test_default_budget_is_a_fraction_of_free_memory(default_model, tmp_path):
    from superlinear.sessions import SessionManager, SnapshotStore
    from superlinear.sessions.memory import HOST_FRACTION, default_budget, host_available_bytes

    manager = SessionManager(default_model, SnapshotStore(tmp_path))
    free = host_available_bytes()
    assert free and manager.memory_budget is not None
    assert 0.8 * HOST_FRACTION * free <= manager.memory_budget <= 1.2 * HOST_FRACTION * free
    assert manager.memory_budget < free
    assert abs(default_budget(default_model.device) - manager.memory_budget) < 0.2 * manager.memory_budget
    # ...and the longest session is what a full cache fits in it
    per_token = default_model.layout.kv_bytes_per_token(default_model.dtype)
    assert manager.max_seq_len_limit() <= manager.memory_budget // per_token
    assert SessionManager(default_model, SnapshotStore(tmp_path), memory_budget=None).memory_budget is None
