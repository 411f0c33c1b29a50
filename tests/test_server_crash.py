"""kill -9 of a real server right after an answer and at a random moment of turns and saves: after a
restart on the same directories every turn the client got with ``persisted: true`` is in the
session, every snapshot a client got a 201 for is listed, and every listed snapshot (user
snapshots and session journals alike) is complete (its files match its manifest); the session
continues from its restored cache."""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import threading
import time

import httpx
import pytest
from server_helpers import sse_chunks, start_server

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = "4096"
SESSION = "crash"


class Client:
    """Turns (plain and streamed) and saves on one session; remembers what was acknowledged."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=120)
        self.acked: list[tuple[str, str]] = []  # (user text, assistant content) answered persisted
        self.saved: list[str] = []  # snapshot ids answered 201
        self.n = 0

    def body(self, text: str, stream: bool) -> dict:
        return {"messages": [{"role": "user", "content": text}], "session_id": SESSION, "max_tokens": 6,
                "temperature": 0, "session_mode": "append", "stream": stream}

    def turn(self, stream: bool, on_ack=None) -> dict | None:
        """One turn; a plain one returns the answer."""
        self.n += 1
        text = f"Question {self.n}: name a color."
        if not stream:
            r = self.http.post("/v1/chat/completions", json=self.body(text, False))
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["persisted"] is (r.headers["X-Spl-Persisted"] == "true")
            if answer["persisted"]:
                self.acked.append((text, answer["choices"][0]["message"]["content"]))
                if on_ack:
                    on_ack()
            return answer
        content = []
        with self.http.stream("POST", "/v1/chat/completions", json=self.body(text, True)) as r:
            assert r.status_code == 200
            for chunk in sse_chunks(r):
                for choice in chunk["choices"]:
                    content.append(choice["delta"].get("content") or "")
                    if choice["finish_reason"] is not None and chunk.get("persisted"):
                        self.acked.append((text, "".join(content)))
                        if on_ack:
                            on_ack()
                            return

    def save(self) -> None:
        r = self.http.post(f"/v1/sessions/{SESSION}/save", json={"title": f"save {self.n}"})
        assert r.status_code == 201, r.text
        self.saved.append(r.json()["id"])

    def work(self, stop: threading.Event) -> None:
        """Turns and saves until the server goes away."""
        i = 0
        try:
            while not stop.is_set():
                if i % 3 == 2:
                    self.save()
                else:
                    self.turn(stream=i % 2 == 1)
                i += 1
        except (httpx.TransportError, httpx.RemoteProtocolError):
            return


def kill(server) -> None:
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)


def check_nothing_lost(server, client: Client) -> None:
    from superlinear.sessions import SnapshotStore

    with server.http() as c:
        assert SESSION in [s["id"] for s in c.get("/v1/sessions").json()["data"]]  # restored from its journal
        messages = c.get(f"/v1/sessions/{SESSION}/history").json()["messages"]
        pairs = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(len(messages) - 1)
                 if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant"]
        found = iter(pairs)
        for turn in client.acked:  # in order; turns the client was not told about may be there too
            assert any(turn == pair for pair in found), (turn, pairs)
        listed = {s["id"] for s in c.get("/v1/snapshots", params={"all": "true"}).json()["data"]}
    assert set(client.saved) <= listed
    store = SnapshotStore(server.tmp / "snapshots", cleanup=False)
    for snapshot_id in listed:
        store.verify(snapshot_id)  # every file there, sizes and hashes as the manifest says


def test_kill_9_never_loses_an_acknowledged_turn(tiny_llama):
    rng = random.Random(11)
    args = ("--model", str(tiny_llama), "--max-seq-len", MAX_SEQ_LEN)  # restarts in a second or two
    server = start_server(api_key=None, extra_args=args)
    try:
        client = Client(server.url)
        client.turn(stream=False)
        for moment in ("after a reply", "at random"):
            if moment == "after a reply":  # 0 ms after the client has its answer
                client.turn(stream=False, on_ack=functools.partial(kill, server))
                assert server.proc.poll() is not None
            else:  # at a random moment of a stream of turns (plain and streamed) and saves
                stop = threading.Event()
                worker = threading.Thread(target=client.work, args=(stop,))
                worker.start()
                # a random moment once the stream has had a save (a loaded machine is slow: wait for it)
                deadline = time.monotonic() + 120
                while not client.saved and worker.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 1.0))
                kill(server)
                stop.set()
                worker.join(60)
            server = start_server(api_key=None, extra_args=args, tmp=server.tmp)
            client.http = httpx.Client(base_url=server.url, timeout=120)
            check_nothing_lost(server, client)
            if moment == "after a reply":  # the session goes on from its restored cache, not prefilled again
                restored = client.http.get(f"/v1/sessions/{SESSION}").json()
                assert restored["persisted_position"] == restored["position"] > 0, restored
                answer = client.turn(stream=False)
                assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= restored["position"] - 1, answer
        assert len(client.acked) >= 3 and client.saved
        print(f"\nkill -9: 2 kills, {len(client.acked)} acknowledged turns and {len(client.saved)} saves, none lost")
    finally:
        server.stop()
        shutil.rmtree(server.tmp, ignore_errors=True)


def test_persist_failures_are_reported_and_the_last_good_state_kept(tiny_llama):
    """Writes that fail (a file may not grow: EFBIG, the way a full disk fails with ENOSPC): the
    turn still answers, with ``persisted: false`` and why; /health and the session info say so;
    a graceful restart finds the session as of its last good persist, not gone."""
    args = ("--model", str(tiny_llama), "--max-seq-len", MAX_SEQ_LEN)
    server = start_server(api_key=None, extra_args=args, file_size_limit=256 << 10)
    try:
        with server.http() as c:
            assert turn_on(c, "Hi")["persisted"] is True  # a small journal: fits
            good = c.get("/v1/sessions/full").json()
            big = turn_on(c, "word " * 800)  # its KV rows need a bigger file than may be written
            assert big["persisted"] is False and big["persist_error"]["code"] == "snapshot_write_failed"
            assert "too large" in big["persist_error"]["message"]
            assert c.get("/health").json()["persist"]["failing_sessions"] == ["full"]
            info = c.get("/v1/sessions/full").json()
            assert info["persisted_position"] == good["position"] < info["position"] and info["persist_error"]
            assert turn_on(c, "Still there?")["persisted"] is False  # retried, still failing: still said
        server.stop()  # graceful: persist_all fails the same way; the journal keeps its good state
        server = start_server(api_key=None, extra_args=args, tmp=server.tmp)
        with server.http() as c:
            history = c.get("/v1/sessions/full/history").json()["messages"]
            assert [m["content"] for m in history if m["role"] == "user"] == ["Hi"]
            assert turn_on(c, "Back")["persisted"] is True
            assert c.get("/health").json()["persist"]["ok"] is True
    finally:
        server.stop()
        shutil.rmtree(server.tmp, ignore_errors=True)


def turn_on(c: httpx.Client, text: str) -> dict:
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "session_id": "full",
                                             "max_tokens": 2, "temperature": 0, "session_mode": "append"})
    assert r.status_code == 200, r.text
    return r.json()
