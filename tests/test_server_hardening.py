"""Hardening round 3 (issue 29), on a real server (the tiny llama): each test is one repro of a
hostile user's finding. Sizes are bounded per route before any work, imported manifests match
one strict schema, a failed operation changes nothing, and every stop signal shuts down clean."""

from __future__ import annotations

import io
import json
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from urllib.parse import urlparse

import httpx
import psutil
import pytest
from cli_helpers import isolated_env, one_error_line, run_spl
from server_helpers import openai_error

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def health_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.get(url + "/health")
            out.append(time.perf_counter() - t)
            time.sleep(0.02)


def while_health_is_polled(server, work):
    """Run ``work()`` while /health is asked every 20 ms; returns (work's result, latencies)."""
    stop, latencies = threading.Event(), []
    poller = threading.Thread(target=health_latencies, args=(server.url, stop, latencies))
    poller.start()
    try:
        result = work()
    finally:
        stop.set()
        poller.join()
    return result, latencies


# -- 1. /tokenize ----------------------------------------------------------------------------------
def test_tokenize_is_bounded_and_health_stays_fast_meanwhile(server):
    from superlinear.plugins.serve import bounds

    with server.http() as c:
        limit = c.get("/health").json()["memory"]["max_seq_len_limit"]
        ok = c.post("/tokenize", json={"content": "hello world"})
        assert ok.status_code == 200 and ok.json()["count"] >= 2, ok.text
        # the input's bound (characters), then the reply's (token ids: what a conversation holds)
        # over the route's input bound: 413; more ids than a conversation holds: 400 context_length_exceeded
        for text, param, why, status in (("x" * (bounds.MAX_TOKENIZE_CHARS + 1), "content", "characters", 413),
                                         ("word " * (limit * 2), "tokens", "token ids", 400)):
            r = c.post("/tokenize", json={"content": text})
            assert r.status_code == status, r.text[:300]
            assert r.json()["error"]["param"] == param and why in r.json()["error"]["message"], r.text[:300]
    body = json.dumps({"content": "ab " * (bounds.MAX_TOKENIZE_CHARS // 3)}).encode()  # the largest text taken

    def post():
        with server.http() as c:
            return [c.post("/tokenize", content=body, headers={"content-type": "application/json"}).status_code
                    for _ in range(3)]

    codes, latencies = while_health_is_polled(server, post)
    assert codes == [400] * 3, codes
    print(f"/health while 3 maximum /tokenize ran: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms, {len(latencies)} samples")
    assert latencies and statistics.median(latencies) <= 0.1, latencies


def test_six_concurrent_maximum_tokenize_requests_grow_rss_by_less_than_a_gib(server):
    from superlinear.plugins.serve import bounds

    proc = psutil.Process(server.proc.pid)
    before, peak = proc.memory_info().rss, [0]
    body = json.dumps({"content": "ab " * (bounds.MAX_TOKENIZE_CHARS // 3), "with_pieces": True}).encode()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    def post(out: list):
        with server.http() as c:
            out.append(c.post("/tokenize", content=body, headers={"content-type": "application/json"}).status_code)

    codes: list[int] = []
    threads = [threading.Thread(target=post, args=(codes,)) for _ in range(6)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert codes == [400] * 6, codes
    print(f"RSS under 6 concurrent maximum /tokenize: {before >> 20} MiB before, peak {peak[0] >> 20} MiB")
    assert peak[0] - before <= 1 << 30, (before, peak[0])


# -- 2, 3. hostile manifests -------------------------------------------------------------------
@pytest.fixture(scope="module")
def export(server):
    """A real export (manifest + files) of a one-turn session."""
    with server.http() as c:
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                             "temperature": 0, "session_id": "exported"}).raise_for_status()
        snap = c.post("/v1/sessions/exported/save", json={"title": "t"}).json()["id"]
        tar = c.get(f"/v1/snapshots/{snap}/export").content
        c.delete(f"/v1/snapshots/{snap}")
        c.delete("/v1/sessions/exported")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for member in t:
            files[member.name.split("/", 1)[1]] = t.extractfile(member).read()
    return json.loads(files.pop("manifest.json")), files


def tar_of(snapshot_id: str, manifest: dict | bytes, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        head = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        for name, data in [("manifest.json", head), *files.items()]:
            info = tarfile.TarInfo(f"{snapshot_id}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deep(n: int):
    value: list = []
    for _ in range(n):
        value = [value]
    return value


HOSTILE_VALUES = [5, None, [1], {}, "abc", -1, True, 1.5, "x" * 300, deep(40), "y" * 2_000_000]
HOSTILE_PATHS = ["created_at", "updated_at", "tags", "title", "description", "session", "session.position",
                 "session.max_seq_len", "session.message_count", "model", "model.fingerprint", "model.name",
                 "files", "files.transcript.json", "files.transcript.json.bytes", "schema_version", "id",
                 "spl_version"]


def mutated(manifest: dict, path: str, value, *, delete: bool = False) -> dict:
    out = json.loads(json.dumps(manifest))
    node, keys = out, path.split(".")
    if keys[0] == "files":  # "transcript.json" is one key
        keys = ["files", ".".join(keys[1:3])] + keys[3:] if len(keys) > 1 else keys
    for key in keys[:-1]:
        node = node[key]
    if delete:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return out


def hostile_manifests(manifest: dict) -> list[tuple[str, dict]]:
    cases = [(f"no {p}", mutated(manifest, p, None, delete=True)) for p in HOSTILE_PATHS]
    cases += [(f"{p}={json.dumps(v)[:20]}", mutated(manifest, p, v)) for p in HOSTILE_PATHS for v in HOSTILE_VALUES]
    return cases[::2][:100]


def test_100_hostile_manifests_none_accepted_that_later_fails_and_listing_always_answers(server, export):
    manifest, files = export
    cases = hostile_manifests(manifest)
    assert len(cases) == 100
    accepted = []
    with server.http() as c:
        for i, (what, bad) in enumerate(cases):
            sid = f"hostile-{i}"
            r = c.post("/v1/snapshots/import", params={"snapshot_id": sid}, content=tar_of("orig", bad, files))
            assert r.status_code < 500, (what, r.text[:300])
            if r.status_code >= 400:
                assert r.json()["error"]["param"], (what, r.text[:300])  # the field that failed
            listing = c.get("/v1/snapshots")
            assert listing.status_code == 200, (what, listing.text[:300])
            if r.status_code != 201:
                continue
            accepted.append(what)
            assert c.get(f"/v1/snapshots/{sid}").status_code == 200, what
            loaded = c.post(f"/v1/snapshots/{sid}/load", json={"session_id": sid})
            assert loaded.status_code in (201, 409), (what, loaded.text[:300])  # 409: another model's
            if loaded.status_code == 201:
                turn = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "go"}],
                                                            "max_tokens": 1, "session_id": sid})
                assert turn.status_code == 200, (what, turn.text[:300])
                c.delete(f"/v1/sessions/{sid}")
            assert c.delete(f"/v1/snapshots/{sid}").status_code == 200, what
    assert len(accepted) < 100  # the mutations of types and sizes were refused


@pytest.mark.parametrize("value", [5, None, [1]])
def test_a_damaged_snapshot_on_disk_is_skipped_by_listing_and_named(server, export, value):
    manifest, files = export
    with server.http() as c:
        assert c.post("/v1/snapshots/import", params={"snapshot_id": "on-disk"},
                      content=tar_of("orig", manifest, files)).status_code == 201
        path = server.tmp / "snapshots" / "on-disk" / "manifest.json"
        path.write_text(json.dumps(dict(manifest, id="on-disk", created_at=value)))  # damaged after the import
        try:
            listing = c.get("/v1/snapshots")
            assert listing.status_code == 200, listing.text[:300]
            assert "on-disk" not in [s["id"] for s in listing.json()["data"]]
            skipped = {s["id"]: s["error"] for s in listing.json()["skipped"]}
            assert "created_at" in skipped["on-disk"], skipped
            assert "on-disk" in [s["id"] for s in c.get("/health").json()["snapshots_skipped"]]
            ls = subprocess.run([sys.executable, "-m", "superlinear.cli.main", "ls"], capture_output=True, text=True,
                                env=server.env, timeout=120)
            assert ls.returncode == 0, ls.stderr
            assert "on-disk" in ls.stderr and "skipped" in ls.stderr, ls.stderr
            r = c.post("/v1/snapshots/on-disk/load", json={})
            assert r.status_code == 400 and r.json()["error"]["code"] == "snapshot_corrupted", r.text[:300]
        finally:
            c.delete("/v1/snapshots/on-disk")


# -- 4. strings inside tools and tool calls ----------------------------------------------------------
@pytest.mark.parametrize("where", ["tools", "tool_calls"])
def test_a_huge_string_in_tools_is_refused_before_the_worker(server, where):
    big = "d" * (20 << 20)
    if where == "tools":
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                "tools": [{"type": "function", "function": {"name": "f", "description": big}}]}
    else:
        body = {"max_tokens": 1, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": big}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}]}
    raw = json.dumps(body).encode()

    def post():
        with server.http() as c:
            t = time.perf_counter()
            r = c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            return r, time.perf_counter() - t

    (r, elapsed), latencies = while_health_is_polled(server, post)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert r.json()["error"]["param"] == ("tools" if where == "tools" else "messages"), r.text[:300]
    median_ms = statistics.median(latencies) * 1000
    print(f"20 MB string in {where}: 400 in {elapsed:.2f} s; /health median {median_ms:.1f} ms")
    assert elapsed < 10, elapsed
    assert statistics.median(latencies) <= 0.1, latencies


def test_many_messages_are_refused_before_rendering(server):
    """Each message costs at least the template's own tokens (role markers, measured once): a
    request of more messages than fit is counted, not rendered."""
    from superlinear.plugins.serve import bounds

    with server.http() as c:
        limit = c.get("/health").json()["memory"]["max_seq_len_limit"]
        per = bounds.tokens_per_message(bounds_tokenizer())
        assert per >= 2
        messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}] * (limit // per // 2 + 1)
        t = time.perf_counter()
        r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text[:300]
        assert f"{len(messages)} messages" in r.json()["error"]["message"], r.text[:300]  # counted, not rendered
        assert time.perf_counter() - t < 5


def bounds_tokenizer():
    """The tiny server's tokenizer: the default model's."""
    from superlinear.model.default import ensure_default
    from superlinear.model.loaders import load_tokenizer

    return load_tokenizer(ensure_default())


def test_tool_choice_must_name_a_given_tool(server):
    with server.http() as c:
        r = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice.function.name", r.text


# -- 6. a failed delete changes nothing --------------------------------------------------------------
def test_a_delete_the_store_refuses_is_503_and_the_session_stays(server):
    snapshots, away = server.tmp / "snapshots", server.tmp / "snapshots-away"
    body = {"messages": [{"role": "user", "content": "hi"}], "session_id": "d", "max_tokens": 2, "temperature": 0}
    with server.http() as c:
        assert c.post("/v1/chat/completions", json=body).json()["persisted"] is True
        before = c.get("/v1/sessions/d/history").json()["messages"]
        snapshots.rename(away)
        snapshots.write_text("not a directory: the store cannot be changed")
        try:
            r = c.delete("/v1/sessions/d")
            assert r.status_code == 503, r.text
            assert c.get("/v1/sessions/d").status_code == 200
            assert c.get("/v1/sessions/d/history").json()["messages"] == before
        finally:
            snapshots.unlink()
            away.rename(snapshots)
        assert (snapshots / "session-d").is_dir()  # its journal is still there for a restart
        assert c.delete("/v1/sessions/d").status_code == 200
        assert not (snapshots / "session-d").exists()


# -- 9. framing errors, completions timings, the OpenAPI document ------------------------------------
FRAMING_ERRORS = {
    "length not a number": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "two lengths": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "header without colon": b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
    "no request line": b"GARBAGE\r\n\r\n",
    "bad chunk size": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


@pytest.mark.parametrize("raw", FRAMING_ERRORS.values(), ids=FRAMING_ERRORS)
def test_framing_errors_answer_an_openai_body(server, raw):
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(raw)
        parts = []
        while part := s.recv(65536):
            parts.append(part)
    head, _, body = b"".join(parts).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), head
    answer = httpx.Response(int(status_line.split()[1]), content=body,
                            headers=[tuple(line.split(":", 1)) for line in header_lines])
    assert answer.headers["content-type"].strip().startswith("application/json"), head
    assert openai_error(answer, 400)["type"] == "invalid_request_error", body


def test_completions_timings_have_queued_s(server):
    with server.http() as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and "queued_s" in r.json()["timings"], r.text


def test_openapi_documents_request_bodies_and_metrics_as_text(server):
    with server.http() as c:
        doc = c.get("/openapi.json").json()
    paths = doc["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/sessions"):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema, path
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = chat["$ref"].rsplit("/", 1)[1]
    assert "messages" in doc["components"]["schemas"][name]["properties"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]


def test_docs_list_every_declared_route_bound():
    from pathlib import Path

    from fastapi.routing import APIRoute

    from superlinear.plugins.serve import app, bounds  # app declares the routes' bounds
    from superlinear.plugins.serve.runtime import Runtime
    from superlinear.settings.options import ServeOptions

    served = {(method, r.path) for r in app.create_app(Runtime(ServeOptions())).routes if isinstance(r, APIRoute)
              for method in r.methods - {"HEAD"}}
    assert served <= set(bounds.ROUTES), served - set(bounds.ROUTES)  # every route declares its bounds
    docs = (Path(__file__).parent.parent / "docs" / "server.md").read_text()
    assert bounds.table() in docs, "docs/server.md: paste `python -c 'from superlinear.plugins.serve import " \
                                   "app, bounds; print(bounds.table())'`"


# -- 7, 8. signals and the server record ------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_every_stop_signal_saves_sessions_removes_the_record_and_exits_0(tiny_llama, tmp_path, sig):
    from server_helpers import free_port

    env = isolated_env(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "superlinear.cli.main", "serve", "--model", str(tiny_llama),
                             "--port", str(port), "--max-seq-len", "64", "--memory-budget", str(8 << 20)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    record = tmp_path / "state" / "server.json"
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        assert json.loads(record.read_text())["pid"] == proc.pid
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "session_id": "kept", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        proc.send_signal(sig)
        assert proc.wait(60) == 0, proc.stdout.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not record.exists()
    assert (tmp_path / "snapshots" / "session-kept" / "manifest.json").is_file()


def test_a_server_record_nested_100k_deep_is_one_line_exit_2(tmp_path):
    env = isolated_env(tmp_path)
    state = tmp_path / "state"
    state.mkdir(parents=True)
    (state / "server.json").write_text("[" * 100_000 + "]" * 100_000)
    for command in (("server", "stop"), ("server", "status"), ("ls",)):
        result = run_spl(env, *command)
        line = one_error_line(result)
        assert "server.json is damaged" in line and "internal error" not in line, line
    (state / "server.json").write_text(json.dumps({"pid": 5, "url": "http://x", "process": deep(100)}))
    line = one_error_line(run_spl(env, "server", "status"))
    assert "nested too deeply" in line, line
