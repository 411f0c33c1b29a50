"""Every route over httpx, malformed bodies (always 400, never 500), auth, 429, non-blocking."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_helpers import openai_error, user

pytestmark = pytest.mark.slow


def test_health_needs_no_key(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == "default"
    memory = r.json()["memory"]  # no --memory-budget: the default, a fraction of the free memory
    assert isinstance(memory["budget"], int) and 0 <= memory["used"] <= memory["budget"]
    assert r.json()["persist"] == {"mode": "turn", "ok": True, "failing_sessions": [], "error": None}


def test_answers_say_whether_the_turn_is_persisted(http):
    body = {"messages": [user("Hi")], "session_id": "durable", "max_tokens": 2, "temperature": 0}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["persisted"] is True and r.headers["X-Spl-Persisted"] == "true"
    info = http.get("/v1/sessions/durable").json()
    assert info["persisted_position"] == info["position"] > 0 and info["persist_error"] is None
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: {")]
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["persisted"] is True
    info = http.get("/v1/sessions/durable").json()
    assert info["persisted_position"] == info["position"]
    r = http.post("/v1/chat/completions", json={"messages": [user("Hi")], "max_tokens": 2, "temperature": 0})
    assert "persisted" not in r.json()  # no session: nothing is kept, nothing to say


def test_a_live_session_journal_is_protected(server, http):
    """Deleting, changing, exporting or replacing (import) a live session's own journal from
    outside would leave the session naming files it lost: 409, and the session goes on."""
    r = http.post("/v1/chat/completions", json={"messages": [user("Hi")], "session_id": "guarded",
                                                "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200
    journal = http.get("/v1/sessions/guarded").json()["state_snapshot"]
    assert journal
    for method, path, kwargs in (("DELETE", f"/v1/snapshots/{journal}", {}),
                                 ("PATCH", f"/v1/snapshots/{journal}", {"json": {"title": "x"}}),
                                 ("GET", f"/v1/snapshots/{journal}/export", {})):
        err = openai_error(http.request(method, path, **kwargs), 409)
        assert "guarded" in err["message"]
    snap = http.post("/v1/sessions/guarded/save", json={}).json()["id"]
    export = http.get(f"/v1/snapshots/{snap}/export").content
    r = http.post("/v1/snapshots/import", params={"snapshot_id": journal, "replace": "true"}, content=export)
    openai_error(r, 409)
    for tags in (["spl:session-state"], ["spl:x"]):
        openai_error(http.post("/v1/sessions/guarded/save", json={"tags": tags}), 400)
        openai_error(http.patch(f"/v1/snapshots/{snap}", json={"tags": tags}), 400)
    r = http.post("/v1/chat/completions", json={"messages": [user("Again")], "session_id": "guarded",
                                                "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["persisted"] is True
    assert len(http.get("/v1/sessions/guarded/history").json()["messages"]) == 4
    assert http.delete("/v1/sessions/guarded").status_code == 200
    assert http.get(f"/v1/snapshots/{journal}").status_code == 404  # deleted with its session


def test_a_failed_export_leaves_no_temporary_files(server, http):
    http.post("/v1/sessions", json={"session_id": "leak"})
    snap = http.post("/v1/sessions/leak/save", json={}).json()["id"]
    tensors = server.tmp / "snapshots" / snap / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-1] + b"\x00")  # damaged on disk
    for _ in range(3):
        err = openai_error(http.get(f"/v1/snapshots/{snap}/export"), 400)
        assert err["code"] == "snapshot_corrupted"
    assert [p.name for p in (server.tmp / "tmp").iterdir() if p.name.startswith("spl-")] == []


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                    {"Authorization": f"Bearer {server.api_key}x"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/sessions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/v1/snapshots"), ("DELETE", "/v1/sessions/x")):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            err = openai_error(r, 401)
            assert err["type"] == "authentication_error"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {server.api_key}"})
    assert r.status_code == 200


BAD_CHAT_BODIES = [
    b"", b"not json", b"[1, 2]", b'"a string"', b"null", b"{", b"\xff\xfe",
    b'{"messages": "hi"}', b'{"messages": []}', b'{"messages": [1]}', b'{"messages": [{"content": "x"}]}',
    b'{"messages": [{"role": "user", "content": 5}]}', b'{"messages": [{"role": "user", "content": [{"x": 1}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
    b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes please"}',
    b'{"messages": [{"role": "user", "content": "x"}], "stop": 5}',
    b'{"messages": [{"role": "user", "content": "x"}], "n": 3}',
    b'{"messages": [{"role": "user", "content": "x"}], "tools": "none"}',
    b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}',
    b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}',
    b'{"messages": [{"role": "user", "content": "x"}], "session_id": "../etc"}',
    b'{"messages": [{"role": "user", "content": "x"}], "session_id": 7}',
    b'{"messages": [{"role": "user", "content": "x"}], "reasoning_budget": -5}',
    b'{"messages": [{"role": "user", "content": "x"}], "repetition_detection": "on"}',
    b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": [1]}',
    b'{"messages": [{"role": "user", "content": "x"}], "stream_options": 3}',
    b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}',
]


@pytest.mark.parametrize("body", BAD_CHAT_BODIES)
def test_bad_chat_bodies_are_400(http, body):
    r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    openai_error(r, 400)


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/sessions", b"[]"), ("POST", "/v1/sessions", b'{"max_seq_len": "big"}'),
    ("POST", "/v1/sessions", b'{"session_id": "a/b"}'), ("POST", "/v1/sessions", b'{"bogus": 1}'),
    ("POST", "/v1/sessions", b'{"max_seq_len": 0}'),
    ("POST", "/v1/sessions/http-a/rollback", b"{}"), ("POST", "/v1/sessions/http-a/rollback", b'{"n_messages": "x"}'),
    ("POST", "/v1/sessions/http-a/resize", b'{"max_seq_len": -1}'), ("POST", "/v1/sessions/http-a/resize", b"nope"),
    ("POST", "/v1/sessions/http-a/fork", b'{"new_session_id": 3}'),
    ("POST", "/v1/sessions/http-a/save", b'{"tags": "x"}'),
    ("PATCH", "/v1/snapshots/whatever", b'{"title": 5}'), ("PATCH", "/v1/snapshots/whatever", b""),
    ("POST", "/v1/snapshots/whatever/load", b'{"force": "maybe"}'),
])
def test_bad_admin_bodies_are_400(http, method, path, body):
    http.post("/v1/sessions", json={"session_id": "http-a"})  # may already exist (409): fine
    r = http.request(method, path, content=body)
    openai_error(r, 400)


def test_unknown_things_are_404(http):
    for method, path in (("GET", "/v1/sessions/nope"), ("DELETE", "/v1/sessions/nope"),
                         ("GET", "/v1/sessions/nope/history"), ("GET", "/v1/snapshots/nope"),
                         ("DELETE", "/v1/snapshots/nope"), ("GET", "/v1/snapshots/nope/export"),
                         ("GET", "/v1/nothing-here")):
        openai_error(http.request(method, path), 404)
    for method, path, body in (("POST", "/v1/sessions/nope/fork", {}), ("POST", "/v1/sessions/nope/rollback",
                               {"n_messages": 0}), ("POST", "/v1/sessions/nope/resize", {"max_seq_len": 64}),
                               ("POST", "/v1/sessions/nope/save", {}), ("POST", "/v1/snapshots/nope/load", {})):
        openai_error(http.request(method, path, json=body), 404)
    openai_error(http.get("/v1/sessions/bad..id"), 400)


def test_every_session_and_snapshot_route(http, tmp_path):
    r = http.post("/v1/sessions", json={"session_id": "routes", "max_seq_len": 512})
    assert r.status_code == 201 and r.json()["id"] == "routes" and r.json()["max_seq_len"] == 512
    openai_error(http.post("/v1/sessions", json={"session_id": "routes"}), 409)
    auto = http.post("/v1/sessions").json()["id"]
    assert auto and http.delete(f"/v1/sessions/{auto}").json()["deleted"]

    r = http.post("/v1/chat/completions", json={"messages": [user("Hello!")], "session_id": "routes",
                                                "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    info = http.get("/v1/sessions/routes").json()
    assert info["message_count"] == 2 and info["position"] > 0
    assert any(s["id"] == "routes" for s in http.get("/v1/sessions").json()["data"])
    history = http.get("/v1/sessions/routes/history").json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"]

    fork = http.post("/v1/sessions/routes/fork", json={"new_session_id": "routes-fork"})
    assert fork.status_code == 201 and fork.json()["position"] == info["position"]
    assert http.get("/v1/sessions/routes-fork/history").json()["messages"] == history
    openai_error(http.post("/v1/sessions/routes/fork", json={"new_session_id": "routes-fork"}), 409)

    rb = http.post("/v1/sessions/routes-fork/rollback", json={"n_messages": 1}).json()
    assert rb["message_count"] == 1 and rb["position"] < info["position"]
    openai_error(http.post("/v1/sessions/routes-fork/rollback", json={"n_messages": 9}), 400)
    rs = http.post("/v1/sessions/routes-fork/resize", json={"max_seq_len": 1024}).json()
    assert rs["max_seq_len"] == 1024 and rs["message_count"] == 1
    openai_error(http.post("/v1/sessions/routes-fork/resize", json={"max_seq_len": 2}), 400)

    snap = http.post("/v1/sessions/routes/save", json={"title": "routes test", "tags": ["t1"]})
    assert snap.status_code == 201, snap.text
    sid = snap.json()["id"]
    assert snap.json()["title"] == "routes test" and snap.json()["tags"] == ["t1"]
    assert any(s["id"] == sid for s in http.get("/v1/snapshots").json()["data"])
    assert http.get(f"/v1/snapshots/{sid}").json()["session"]["position"] == info["position"]
    patched = http.patch(f"/v1/snapshots/{sid}", json={"title": "renamed", "tags": ["t1", "t2"]}).json()
    assert patched["title"] == "renamed" and patched["tags"] == ["t1", "t2"]

    loaded = http.post(f"/v1/snapshots/{sid}/load", json={"session_id": "routes-loaded"})
    assert loaded.status_code == 201 and loaded.json()["position"] == info["position"]
    assert http.get("/v1/sessions/routes-loaded/history").json()["messages"] == history
    openai_error(http.post(f"/v1/snapshots/{sid}/load", json={"session_id": "routes-loaded"}), 409)
    forced = http.post(f"/v1/snapshots/{sid}/load", json={"session_id": "routes-fork", "force": True})
    assert forced.status_code == 201 and forced.json()["message_count"] == 2

    export = http.get(f"/v1/snapshots/{sid}/export")
    assert export.status_code == 200 and len(export.content) > 1000
    openai_error(http.post("/v1/snapshots/import", content=export.content), 409)  # same id exists
    imported = http.post("/v1/snapshots/import", params={"snapshot_id": "routes-imported"}, content=export.content)
    assert imported.status_code == 201 and imported.json()["id"] == "routes-imported"
    openai_error(http.post("/v1/snapshots/import", params={"snapshot_id": "x2"}, content=b"garbage"), 400)
    openai_error(http.post("/v1/snapshots/import", content=b""), 400)

    for s in ("routes-imported", sid):
        assert http.delete(f"/v1/snapshots/{s}").json()["deleted"]
    for s in ("routes", "routes-fork", "routes-loaded"):
        assert http.delete(f"/v1/sessions/{s}").json()["deleted"]
    openai_error(http.get("/v1/sessions/routes"), 404)


def test_listing_answers_during_a_long_generation(server, http):
    result = {}

    def long_turn():
        with server.http() as c:
            result["r"] = c.post("/v1/chat/completions", json={
                "messages": [user("Tell me a long story about a dragon. " * 15)], "max_tokens": 20,
                "temperature": 0, "session_id": "long-one"})

    t = threading.Thread(target=long_turn)
    t.start()
    time.sleep(0.5)
    slowest = 0.0
    while t.is_alive():
        for path in ("/health", "/v1/sessions", "/v1/snapshots", "/v1/models"):
            start = time.perf_counter()
            r = http.get(path) if path != "/health" else httpx.get(server.url + path)
            slowest = max(slowest, time.perf_counter() - start)
            assert r.status_code == 200
        time.sleep(0.2)
    t.join()
    assert result["r"].status_code == 200
    assert slowest < 1.0, f"a listing took {slowest:.2f}s while a generation ran"
    http.delete("/v1/sessions/long-one")


def test_full_queue_answers_429(server):
    # MAX_CONCURRENCY (4) generations may wait or run; more at once get 429 with Retry-After.
    statuses = []
    lock = threading.Lock()

    def one():
        with server.http() as c:
            r = c.post("/v1/chat/completions", json={"messages": [user("Say something.")], "max_tokens": 3,
                                                     "temperature": 0})
        with lock:
            statuses.append(r)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in statuses)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    busy = next(r for r in statuses if r.status_code == 429)
    assert openai_error(busy, 429)["code"] == "server_busy" and busy.headers.get("retry-after")
