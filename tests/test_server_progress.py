"""Long prefills over HTTP, on a real server: ``return_progress`` chunks before the first token
(httpx and the official openai client), ``: keep-alive`` comments while a prefill runs silent, and
a client whose read timeout is shorter than the prefill still getting its answer.

The server runs the tiny llama with a prefill chunk of 8 tokens: a prompt of a few hundred tokens
is dozens of real chunks (forward passes), slow enough to watch and cheap on a shared CPU."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import openai
import pytest
from server_helpers import start_server

pytestmark = pytest.mark.slow

CHUNK = 8


@pytest.fixture(scope="module")
def server(tiny_llama):
    server = start_server(api_key=None, extra_args=("--model", str(tiny_llama), "--chunk-size", str(CHUNK),
                                                    "--max-seq-len", "4096"))
    yield server
    server.stop()
    shutil.rmtree(server.tmp, ignore_errors=True)


def _prompt(words: int, tag: str) -> list[dict]:
    """A prompt of its own (``tag``): requests without a session share the server's scratch cache,
    and a prompt sharing a prefix with the last one would reuse it instead of prefilling."""
    return [{"role": "user", "content": " ".join(f"{tag}{i}" for i in range(words))}]


def _sse_lines(server, body: dict, timeout: float = 120) -> list[tuple[float, str]]:
    """Every non-empty line of a streamed answer with its arrival time (comments included)."""
    lines, t0 = [], time.monotonic()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line:
                lines.append((time.monotonic() - t0, line))
    return lines


def _answer_starts(chunks: list[dict]) -> int:
    """Index of the first chunk with answer text, or of the finish (the tiny model's random
    weights may end the turn at once)."""
    return next(i for i, c in enumerate(chunks) if c["choices"] and (
        c["choices"][0]["delta"].get("content") or c["choices"][0]["delta"].get("reasoning_content")
        or c["choices"][0]["finish_reason"]))


def _data(lines) -> list[dict]:
    return [json.loads(line[5:]) for _, line in lines if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def test_progress_chunks_come_before_the_first_token(server):
    body = {"messages": _prompt(150, "t1-"), "stream": True, "max_tokens": 4, "temperature": 0,
            "return_progress": True, "session_id": "progress-a"}
    chunks = _data(_sse_lines(server, body))
    first_text = _answer_starts(chunks)
    progress = [c["prompt_progress"] for c in chunks[:first_text] if "prompt_progress" in c]
    assert all("prompt_progress" not in c for c in chunks[first_text:])
    total = progress[0]["total"]
    assert total > 10 * CHUNK and len(progress) >= total // CHUNK  # the start, then one per chunk
    assert progress[0]["processed"] == progress[0]["cache"] == 0
    assert [p["processed"] for p in progress] == sorted(p["processed"] for p in progress)
    assert progress[-1]["processed"] == total and {p["total"] for p in progress} == {total}
    times = [p["time_ms"] for p in progress]
    assert times == sorted(times)
    for c in chunks[:first_text]:  # llama.cpp's shape: an empty assistant delta beside the progress
        if "prompt_progress" in c:
            assert c["object"] == "chat.completion.chunk" and c["session_id"] == "progress-a"
            assert c["choices"][0]["delta"] == {"role": "assistant", "content": None}
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["timings"]["prefill_tokens"] == total

    # The next turn of the session reuses what the cache holds: progress starts at the cache.
    history = httpx.get(server.url + "/v1/sessions/progress-a/history", timeout=30).json()["messages"]
    body["messages"] = history + _prompt(60, "t2-")
    progress = [c["prompt_progress"] for c in _data(_sse_lines(server, body)) if "prompt_progress" in c]
    assert progress[0]["cache"] >= total and progress[0]["processed"] == progress[0]["cache"]
    assert progress[-1]["processed"] == progress[-1]["total"] > progress[0]["cache"]


def test_without_return_progress_no_progress_chunks(server):
    chunks = _data(_sse_lines(server, {"messages": _prompt(100, "t3-"), "stream": True, "max_tokens": 2}))
    assert chunks and not any("prompt_progress" in c for c in chunks)


def test_openai_client_receives_progress_before_the_first_token(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="default", messages=_prompt(120, "t4-"), max_tokens=4,
                                            temperature=0, stream=True, extra_body={"return_progress": True})
    progress, text_at = [], None
    for i, chunk in enumerate(stream):
        extra = chunk.model_extra or {}
        if "prompt_progress" in extra:
            assert text_at is None, "progress after the first token"
            progress.append(extra["prompt_progress"])
        elif chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            text_at = i if text_at is None else text_at
    assert text_at is not None
    assert len(progress) >= 3 and progress[-1]["processed"] == progress[-1]["total"]
    assert progress[0]["processed"] < progress[len(progress) // 2]["processed"] < progress[-1]["processed"]


def test_keepalive_comments_while_a_prefill_runs(server):
    body = {"messages": _prompt(200, "t5-"), "stream": True, "max_tokens": 2, "sse_ping_interval": 0.05}
    lines = _sse_lines(server, body)
    data_lines = [i for i, (_, line) in enumerate(lines) if line.startswith("data:")]
    first_token = data_lines[1 + _answer_starts(_data(lines)[1:])]  # after the opening role chunk
    pings = [t for t, line in lines[data_lines[0]:first_token] if line == ": keep-alive"]
    assert len(pings) >= 2, lines[:first_token + 1]
    final = _data(lines)[-1]
    assert final["choices"] == [] or final["choices"][0]["finish_reason"]
    # turned off: no comment at all
    body["sse_ping_interval"] = -1
    assert not [line for _, line in _sse_lines(server, body) if line.startswith(":")]


def test_a_read_timeout_shorter_than_the_prefill_does_not_cut_it(server):
    """The client's timeout is an idle one (httpx: per read), and keep-alives keep the stream busy."""
    from superlinear.api import chat_turn, collect_text
    from superlinear.client import SplClient

    messages = _prompt(300, "measure")
    with SplClient(server.url, timeout=120) as client:  # how long does this prefill take here, now?
        measured = collect_text(client.chat(chat_turn(messages, max_tokens=1)))[1].timings["prefill_s"]
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["prefill"]["tokens"] >= 300 and health["prefill"]["tokens_per_s"] > 0
    timeout = max(0.05, measured / 4)
    body = {"messages": _prompt(300, "timed"), "max_tokens": 2, "stream": True, "sse_ping_interval": timeout / 5}
    final = _data(_sse_lines(server, body, timeout=timeout))[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["timings"]["prefill_s"] > timeout  # the prefill did last longer than the read timeout


def test_bad_progress_options_are_400(server):
    for bad in ({"return_progress": "yes"}, {"sse_ping_interval": "soon"}, {"sse_ping_interval": -5}):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"messages": _prompt(3, "t7-"), "stream": True, **bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] in ("return_progress", "sse_ping_interval")


def test_snapshot_export_and_import_report_their_bytes(server, tmp_path):
    from superlinear.api import chat_turn, collect_text
    from superlinear.client import SplClient

    with SplClient(server.url, timeout=60) as client:
        _, done = collect_text(client.chat(chat_turn(_prompt(40, "t8-"), session_id="progress-bytes", max_tokens=2)))
        assert done.finish_reason
        snap = client.save("progress-bytes")
        down, up = [], []
        path = client.export_snapshot(snap["id"], tmp_path / "s.tar", on_bytes=lambda d, t: down.append((d, t)))
        size = path.stat().st_size
        assert down and down[-1] == (size, size)  # the total came from Content-Length
        assert [d for d, _ in down] == sorted(d for d, _ in down)
        info = client.import_snapshot(path, snapshot_id="progress-bytes-copy", on_bytes=lambda d, t: up.append((d, t)))
        assert info["id"] == "progress-bytes-copy" and up[-1] == (size, size)
