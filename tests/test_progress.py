"""Progress of long work, in its parts: the prefill callback of a real (tiny) model, the
conversation's and the turn's ``PrefillProgress``, the SSE keep-alive wrapper, llama.cpp's
progress chunk, and the client's estimate line and bar plumbing."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from engine_fakes import FakeModel

from superlinear.engine import ChatRequest, Done, PrefillProgress, SamplingParams, TextDelta, run_turn
from superlinear.engine.conversation import Conversation


@pytest.fixture(scope="module")
def tokenizer(request):
    return request.getfixturevalue("default_model").tokenizer


@pytest.mark.parametrize("hybrid", [False, True])
def test_sync_reports_progress_from_the_cached_prefix_to_the_total(tokenizer, hybrid):
    conv = Conversation(FakeModel(tokenizer, hybrid=hybrid), 4096, chunk_size=16)
    first = list(range(1000, 1100))
    events: list[PrefillProgress] = []
    conv.sync_tokens(first, on_progress=events.append)
    assert [e.done for e in events] == [0, *range(16, 100, 16), 100]  # the start, then every chunk
    assert {e.total for e in events} == {100} and {e.cached for e in events} == {0}
    assert events[0].fraction == 0.0 and events[-1].fraction == 1.0
    # The second sync keeps the common prefix: progress starts there and counts it as cached.
    events.clear()
    stats = conv.sync_tokens(first + list(range(2000, 2040)), on_progress=events.append)
    assert events[0].done == events[0].cached == stats.cached_tokens == 100
    assert events[-1].done == events[-1].total == 140
    assert [e.done for e in events] == sorted(e.done for e in events)


def test_sync_reports_only_what_it_prefills(tokenizer):
    conv = Conversation(FakeModel(tokenizer), 4096)
    conv.sync_tokens(list(range(1000, 1010)))
    events = []
    conv.sync_tokens(list(range(1000, 1005)), on_progress=events.append)  # a rollback
    assert [(e.done, e.total, e.cached) for e in events] == [(4, 5, 4), (5, 5, 4)]  # the last token, for logits
    events.clear()
    conv.sync_tokens(list(range(1000, 1005)), on_progress=events.append)  # nothing to do
    assert events == []


def test_turn_streams_prefill_progress_before_the_first_token(tokenizer):
    conv = Conversation(FakeModel(tokenizer), 4096, chunk_size=8)
    long = " ".join(["fox"] * 60)
    events = list(run_turn(conv, ChatRequest([{"role": "user", "content": long}],
                                             sampling=SamplingParams(max_tokens=4))))
    kinds = [type(e).__name__ for e in events]
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    progress = [e for e in events[:first_text] if isinstance(e, PrefillProgress)]
    assert "PrefillProgress" not in kinds[first_text:]
    assert len(progress) >= 3 and progress[-1].done == progress[-1].total
    assert isinstance(events[-1], Done) and events[-1].usage["prompt_tokens"] == progress[-1].total


def test_cancelled_prefill_restores_the_conversation(tokenizer):
    conv = Conversation(FakeModel(tokenizer), 4096, chunk_size=8)
    cancel = threading.Event()
    seen = []
    request = ChatRequest([{"role": "user", "content": " ".join(["dog"] * 80)}])
    for event in run_turn(conv, request, cancel):
        if isinstance(event, PrefillProgress):
            seen.append(event.done)
            if len(seen) == 3:
                cancel.set()  # cancelled between chunks: the turn ends cancelled, nothing kept
    assert conv.position == 0 and conv.transcript == [] and len(seen) == 3


async def _slow_parts(delays, closed):
    try:
        for d in delays:
            await asyncio.sleep(d)
            yield f"data: {d}\n\n".encode()
    finally:
        closed.append(True)


def test_keepalive_fills_silences_and_passes_every_part():
    from superlinear.plugins.serve.routes_chat import KEEPALIVE, with_keepalive

    async def run():
        closed = []
        parts = [p async for p in with_keepalive(_slow_parts([0.0, 0.35, 0.0], closed), 0.1)]
        return parts, closed

    parts, closed = asyncio.run(run())
    data = [p for p in parts if p != KEEPALIVE]
    assert data == [b"data: 0.0\n\n", b"data: 0.35\n\n", b"data: 0.0\n\n"]  # in order, none lost
    assert parts.count(KEEPALIVE) >= 2 and parts.index(KEEPALIVE) == 1  # only in the silence
    assert closed == [True]


def test_keepalive_closes_the_stream_when_the_consumer_leaves():
    from superlinear.plugins.serve.routes_chat import with_keepalive

    async def run():
        closed = []
        stream = with_keepalive(_slow_parts([0.0, 30.0], closed), 0.05)
        assert (await anext(stream)).startswith(b"data:")
        await anext(stream)  # a keep-alive while the next part is pending
        await stream.aclose()  # the client went away: the pending read is cancelled, the stream closed
        return closed

    assert asyncio.run(asyncio.wait_for(run(), 5)) == [True]


def test_ping_interval():
    from superlinear.plugins.serve.routes_chat import DEFAULT_PING_S, ping_interval

    assert ping_interval(None) == DEFAULT_PING_S <= 10
    assert ping_interval(0.5) == 0.5
    assert ping_interval(-1) is None and ping_interval(0) is None


def test_progress_chunk_has_llama_cpp_shape():
    from superlinear.plugins.serve.routes_chat import chunk, progress_chunk

    body = progress_chunk(chunk("chatcmpl-x", 1, "default", session_id="s"), PrefillProgress(1024, 4096, 512, 1.25))
    assert body["prompt_progress"] == {"total": 4096, "cache": 512, "processed": 1024, "time_ms": 1250}
    assert body["object"] == "chat.completion.chunk" and body["session_id"] == "s"
    assert body["choices"][0]["delta"] == {"role": "assistant", "content": None}


def test_estimate_line():
    from superlinear.client.progress import estimate_line, format_seconds

    assert estimate_line(14000, {"tokens_per_s": 100.0}) == \
        "prefilling 14,000 tokens: about 2 min 20 s at 100 tokens/s (this server's last prefill)"
    assert "no prefill measured" in estimate_line(14000, None)
    assert format_seconds(7260) == "2 h 01 min"


def test_prefill_bar_notes_the_estimate_once_and_watch_closes_the_stream():
    from superlinear.api import PrefillProgress, TextDelta
    from superlinear.client.progress import PrefillBar, watch_prefill

    notes = []
    bar = PrefillBar(io.StringIO(), speed=lambda: {"tokens_per_s": 50.0}, note=notes.append, enabled=False)
    closed = []

    def events():
        try:
            for done in (0, 2048, 4096):
                yield PrefillProgress(done, 4096, 0, 0.0)
            yield TextDelta("hi")
            yield TextDelta(" there")
        finally:
            closed.append(True)

    watched = watch_prefill(events(), bar)
    assert next(watched).text == "hi"  # progress events go to the bar, not to the caller
    watched.close()
    assert closed == [True]
    assert notes == ["prefilling 4,096 tokens: about 1 min 22 s at 50 tokens/s (this server's last prefill)"]
    assert bar.seen == [0, 2048, 4096]


def test_a_short_prefill_gets_a_bar_once_it_turns_out_slow():
    from superlinear.client.progress import PrefillBar

    notes = []
    bar = PrefillBar(io.StringIO(), note=notes.append, enabled=False)
    bar.update(PrefillProgress(0, 600, 0, 0.0))
    bar.update(PrefillProgress(256, 600, 0, 0.9))
    assert notes == []  # short and quick so far: nothing to watch
    bar.update(PrefillProgress(512, 600, 0, 2.1))
    assert notes == ["prefilling 600 tokens (no prefill measured on this server yet: the bar shows the ETA)"]


def test_the_prefill_bar_moves_between_chunks_with_an_eta():
    """Progress events come one per chunk (thousands of tokens apart); between them the bar moves
    at the measured speed, with an ETA, but never past the end of the running chunk."""
    from superlinear.client.progress import TICK_S, PrefillBar

    out = io.StringIO()
    bar = PrefillBar(out, speed=lambda: {"tokens_per_s": 1000.0}, note=lambda line: None, enabled=True)
    assert TICK_S <= 2.0
    bar.update(PrefillProgress(0, 10_000, 0, 0.0))
    bar.tick(bar.reported_at + 1.0)  # before this prefill's own speed: the server's last one
    assert 990 <= bar.position <= 1010 and 8.5 <= bar.eta_s <= 9.5
    bar.update(PrefillProgress(2048, 10_000, 0, 1.0))  # 2048 tokens/s
    bar.tick(bar.reported_at + 0.5)
    assert 3000 <= bar.position <= 3100 and 3.0 <= bar.eta_s <= 3.6
    bar.tick(bar.reported_at + 60)  # a slow chunk: the bar waits at its end
    assert bar.position == 4095
    bar.update(PrefillProgress(10_000, 10_000, 0, 5.0))
    assert not bar.drawing
    assert not [t for t in threading.enumerate() if t.name == "spl-prefill-bar"]  # no thread left
    assert "eta" in out.getvalue() and "-:--:--" not in out.getvalue()
