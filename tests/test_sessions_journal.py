"""Incremental, crash-safe session journals (core/sessions/journal.py) with the real default model:
a persist after each turn writes only the new KV rows; a restart (a fresh SessionManager on the
same directory) restores the session and continues it exactly; rollback below the persisted
position; a corrupt segment is refused; a REAL crash (SIGKILL of `spl serve`) loses nothing
that a finished turn persisted.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from sessions_tiny import greedy_turn

from superlinear.errors import Unavailable
from superlinear.sessions import CorruptSnapshot, SessionManager, SnapshotStore, state_snapshot_id, tensorfile

pytestmark = pytest.mark.slow

LEN = 256
MAX_TOKENS = 6


def turn(manager, session_id, text, max_tokens=MAX_TOKENS):
    return greedy_turn(manager, session_id, text, max_tokens)


def manifest(store, sid):
    return json.loads((store.root / state_snapshot_id(sid) / "manifest.json").read_text())


def kv_bytes_per_token(model):
    return model.layout.kv_bytes_per_token(model.dtype)


def test_incremental_persist_restart_and_rollback(default_model, tmp_path):
    model = default_model
    store = SnapshotStore(tmp_path)
    manager = SessionManager(model, store, default_max_seq_len=LEN)
    manager.create("j")
    turn(manager, "j", "What is the capital of France?")
    manager.persist("j")
    m1 = manifest(store, "j")
    p1 = manager.info("j")["position"]
    assert [(s["start"], s["end"]) for s in m1["segments"]] == [(0, p1)]
    assert manager.info("j")["persisted_position"] == p1

    turn(manager, "j", "And of Italy?")
    manager.persist("j")
    m2 = manifest(store, "j")
    p2 = manager.info("j")["position"]
    assert [(s["start"], s["end"]) for s in m2["segments"]] == [(0, p1), (p1, p2)]
    assert m2["segments"][0]["file"] == m1["segments"][0]["file"]  # turn 1's rows not rewritten
    seg2 = m2["files"][m2["segments"][1]["file"]]["bytes"]
    rows = (p2 - p1) * (kv_bytes_per_token(model) + 8)  # KV + the token id of each new row
    assert rows <= seg2 < rows + 16384  # + the safetensors header
    written = manager.lookup("j").last_persist_bytes
    assert written < rows + 400_000  # the new rows, the logits ([vocab] fp32), transcript, manifest
    # the files of the previous generation that the new manifest does not list are gone
    listed = {"manifest.json", *m2["files"]}
    assert {p.name for p in (store.root / state_snapshot_id("j")).iterdir()} == listed
    assert manager.persist("j") and manager.lookup("j").last_persist_bytes == 0  # nothing changed

    # restart: a fresh manager on the same directory restores it and continues identically
    expect = turn(manager, "j", "And of Spain?")
    again = SessionManager(model, SnapshotStore(tmp_path), default_max_seq_len=LEN)
    assert again.restore_index() == ["j"]
    assert again.history("j") == manifest_history(store, "j")
    got = turn(again, "j", "And of Spain?")
    assert got.message == expect.message and got.usage["completion_tokens"] == expect.usage["completion_tokens"]

    # rollback below the persisted position, persist, restart
    again.persist("j")
    again.rollback("j", 1)  # keep the first user message only: cuts into the first segment
    p_rb = again.info("j")["position"]
    assert p_rb < p1
    again.persist("j")
    m3 = manifest(store, "j")
    assert [(s["start"], s["end"]) for s in m3["segments"]] == [(0, p_rb)]
    ids_rb = again.get("j").conversation.token_ids
    expect_rb = turn(again, "j", "Tell me more.")
    third = SessionManager(model, SnapshotStore(tmp_path), default_max_seq_len=LEN)
    assert third.restore_index() == ["j"]
    assert third.get("j").conversation.token_ids == ids_rb
    assert [m["role"] for m in third.history("j")] == ["user"]
    got_rb = turn(third, "j", "Tell me more.")
    assert got_rb.message == expect_rb.message


def manifest_history(store, sid):
    m = manifest(store, sid)
    return json.loads((store.root / state_snapshot_id(sid) / m["meta"]).read_text())["transcript"]


def test_corrupt_segment_is_refused_and_orphans_cleaned(default_model, tmp_path, monkeypatch):
    store = SnapshotStore(tmp_path)
    manager = SessionManager(default_model, store, default_max_seq_len=LEN)
    manager.create("c")
    turn(manager, "c", "Hello!")
    manager.persist("c")
    directory = store.root / state_snapshot_id("c")
    m = manifest(store, "c")
    # an orphan of a persist cut short (a segment and a manifest temp file never published)
    (directory / "seg-0000000099-0000000120-deadbeef.safetensors").write_bytes(b"x" * 100)
    (directory / ".manifest.json.0badc0de").write_bytes(b"{}")
    fresh = SessionManager(default_model, SnapshotStore(tmp_path), default_max_seq_len=LEN)
    assert fresh.restore_index() == ["c"]
    turn(fresh, "c", "Again")  # loads (orphans ignored), then appends
    fresh.persist("c")
    assert not (directory / "seg-0000000099-0000000120-deadbeef.safetensors").exists()
    assert not (directory / ".manifest.json.0badc0de").exists()

    # a persist that fails before its manifest is in place (disk full) leaves the previous one
    before = manifest(store, "c")
    turn(fresh, "c", "Once more")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorfile, "write_manifest", full_disk)
    with pytest.raises(Unavailable, match="disk is full"):
        fresh.persist("c")
    monkeypatch.undo()
    assert manifest(store, "c") == before
    assert {p.name for p in directory.iterdir()} == {"manifest.json", *before["files"]}
    later = SessionManager(default_model, SnapshotStore(tmp_path), default_max_seq_len=LEN)
    later.restore_index()
    assert later.get("c").position == before["session"]["position"]

    seg = directory / manifest(store, "c")["segments"][0]["file"]
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # flip a byte in the KV rows
    seg.write_bytes(bytes(data))
    broken = SessionManager(default_model, SnapshotStore(tmp_path), default_max_seq_len=LEN)
    assert broken.restore_index() == ["c"]
    with pytest.raises(CorruptSnapshot, match=r"hash of seg-.*does not match"):
        broken.get("c")
    assert m["segments"]  # the manager goes on: other sessions work
    broken.create("ok")
    turn(broken, "ok", "Hi")

    # an empty session (created, nothing said) round-trips too: no segments at all
    manager.create("empty")
    manager.persist("empty")
    assert manifest(store, "empty")["segments"] == []
    fresh = SessionManager(default_model, SnapshotStore(tmp_path), default_max_seq_len=LEN)
    fresh.restore_index()
    assert fresh.get("empty").position == 0 and fresh.history("empty") == []


def test_server_crash_keeps_persisted_turns(tmp_path):
    """`spl serve`, two turns in a session, SIGKILL, start again on the same dirs: both turns
    are there and the session continues."""
    from server_helpers import start_server

    server = start_server(api_key=None)
    try:
        with server.http() as c:
            for text in ("What is the capital of France?", "And of Italy?"):
                r = c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": text}], "session_id": "crash",
                    "max_tokens": 4, "temperature": 0})
                assert r.status_code == 200, r.text
            info = c.get("/v1/sessions/crash").json()
            # the persist runs on the worker after the response; a queued admin job waits for it
            c.post("/v1/sessions/crash/resize", json={"max_seq_len": info["max_seq_len"]})
            info = c.get("/v1/sessions/crash").json()
            assert info["persisted_position"] == info["position"] > 0
            history = c.get("/v1/sessions/crash/history").json()["messages"]
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        restarted = _restart(server)
        try:
            with restarted.http() as c:
                listed = [s["id"] for s in c.get("/v1/sessions").json()["data"]]
                assert "crash" in listed
                assert c.get("/v1/sessions/crash/history").json()["messages"] == history
                assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
                r = c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "And of Spain?"}], "session_id": "crash",
                    "max_tokens": 4, "temperature": 0})
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= info["position"] - 1
                assert len(c.get("/v1/sessions/crash/history").json()["messages"]) == 6
        finally:
            restarted.stop()
    finally:
        server.stop()
        import shutil

        shutil.rmtree(server.tmp, ignore_errors=True)


def _restart(server):
    """Start `spl serve` again on the same state and snapshot directories."""
    from server_helpers import start_server

    return start_server(api_key=None, tmp=server.tmp)


def test_persist_shutdown_option_writes_nothing_per_turn():
    """`spl serve --persist shutdown`: no journal after a turn (sessions reach disk only on a
    clean shutdown), which is what a 1M-token context may want."""
    from server_helpers import start_server

    server = start_server(api_key=None, extra_args=("--persist", "shutdown"))
    try:
        with server.http() as c:
            r = c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "session_id": "quiet",
                "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
            c.post("/v1/sessions/quiet/resize", json={"max_seq_len": 2048})  # waits for the worker
            info = c.get("/v1/sessions/quiet").json()
            assert info["position"] > 0 and info["persisted_position"] is None
    finally:
        server.stop()
        import shutil

        shutil.rmtree(server.tmp, ignore_errors=True)
