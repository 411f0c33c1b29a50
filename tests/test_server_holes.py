"""Holes an attacker found, on a real server (the tiny llama): sizes bounded before any work,
uploads bounded by the disk's free space, and a persist failure cleared once the disk recovers."""

from __future__ import annotations

import json
import shutil
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def test_detokenize_refuses_more_ids_than_any_conversation_holds(server):
    with server.http() as c:
        limit = c.get("/health").json()["memory"]["max_seq_len_limit"]
        ok = c.post("/detokenize", json={"tokens": [1] * 10})
        assert ok.status_code == 200, ok.text
        r = c.post("/detokenize", json={"tokens": [1] * 1_000_000})  # refused while it streams in
        assert r.status_code == 413, r.text[:300]
        assert r.json()["error"]["code"] == "body_too_large"
        r = c.post("/detokenize", content=json.dumps({"tokens": [1] * (limit + 1)}).encode().replace(b" ", b""))
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text[:300]
        r = c.post("/v1/completions", json={"prompt": [1] * (limit + 1), "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text[:300]
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert c.get("/health").json()["status"] == "ok"


def test_a_text_too_long_for_any_conversation_is_refused_before_tokenizing(server):
    text = "word " * 400_000  # 2 MB: at least tens of thousands of tokens, whatever the tokenizer
    with server.http() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
        err = r.json()["error"]
        assert err["param"] == "messages" and "characters" in err["message"], err
        r = c.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text[:300]
        short = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 1})
        assert short.status_code == 200, short.text


def test_an_upload_larger_than_the_free_disk_is_refused_from_its_length(server):
    free = shutil.disk_usage(server.tmp / "tmp").free
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(f"POST /v1/snapshots/import HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-tar\r\n"
                  f"Connection: close\r\nContent-Length: {free + (1 << 30)}\r\n\r\n".encode())
        parts = []
        while part := s.recv(65536):  # the answer comes before any body was sent
            parts.append(part)
        answer = b"".join(parts).decode()
    status, _, rest = answer.partition("\r\n")
    assert " 413 " in status, answer
    assert "free space" in rest, answer


def test_health_clears_a_persist_failure_once_the_disk_recovers(server):
    snapshots = server.tmp / "snapshots"
    away = server.tmp / "snapshots-away"
    body = {"messages": [{"role": "user", "content": "hi"}], "session_id": "retry-persist", "max_tokens": 2,
            "temperature": 0, "session_mode": "append"}
    with server.http() as c:
        assert c.post("/v1/chat/completions", json=body).json()["persisted"] is True
        snapshots.rename(away)
        snapshots.write_text("not a directory: the store cannot be written")  # the disk "fails"
        try:
            r = c.post("/v1/chat/completions", json=body).json()
            assert r["persisted"] is False, r
            assert "retry-persist" in c.get("/health").json()["persist"]["failing_sessions"]
        finally:
            snapshots.unlink()
            away.rename(snapshots)  # the disk "recovers"; the session stays idle
        deadline = time.monotonic() + 60
        while (persist := c.get("/health").json()["persist"])["failing_sessions"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert persist["ok"] is True and persist["failing_sessions"] == [], persist
        info = c.get("/v1/sessions/retry-persist").json()
        assert info["persist_error"] is None and info["persisted_position"] == info["position"], info
        c.delete("/v1/sessions/retry-persist")


def test_a_second_server_on_the_same_session_store_is_refused(server, tiny_llama):
    """Two servers on one store would restore and journal the same sessions: the second is refused
    (one line, exit 2, naming the first) before it binds its port."""
    import subprocess
    import sys

    from server_helpers import free_port

    env = {**server.env, "SPL_STATE_DIR": str(server.tmp / "second-state")}
    second = subprocess.run([sys.executable, "-m", "superlinear.cli.main", "serve", "--model", str(tiny_llama),
                             "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in use by another spl server" in lines[0], lines
    assert f"pid {server.proc.pid}" in lines[0] and "SPL_SNAPSHOT_DIR" in lines[0], lines
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_url_points_one_command_at_a_server(server, tmp_path):
    import subprocess
    import sys

    from cli_helpers import isolated_env

    env = isolated_env(tmp_path)  # nothing recorded, no $SPL_SERVER_URL: only --url finds the server
    httpx.post(server.url + "/v1/sessions", json={"session_id": "by-url"}).raise_for_status()
    run = subprocess.run([sys.executable, "-m", "superlinear.cli.main", "session", "ls", "--json", "--url", server.url],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "by-url" in [s["id"] for s in json.loads(run.stdout)["data"]]
    httpx.delete(server.url + "/v1/sessions/by-url")
