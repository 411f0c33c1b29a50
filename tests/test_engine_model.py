"""Chat turns on the real default model (CPU): answers, streaming, seeds, multi-byte text, prefix
reuse, cancellation, rollback, fork."""

import threading

import pytest

from superlinear.engine import ChatRequest, Done, SamplingParams, TextDelta, run_turn
from superlinear.engine.conversation import Conversation
from superlinear.engine.decode import IncrementalDetokenizer

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _turn(conv, messages, cancel=None, **sampling):
    sampling.setdefault("max_tokens", 16)
    events = list(run_turn(conv, ChatRequest(messages, sampling=SamplingParams(**sampling)), cancel))
    assert isinstance(events[-1], Done) and all(not isinstance(e, Done) for e in events[:-1])
    return events, events[-1]


def _text(events):
    return "".join(e.text for e in events if isinstance(e, TextDelta))


@pytest.fixture(scope="module")
def first_turn(default_model):
    conv = Conversation(default_model, 1024)
    events, done = _turn(conv, QUESTION)
    return conv, events, done


def test_capital_of_france_streams(first_turn):
    conv, events, done = first_turn
    assert "Paris" in done.message["content"]
    assert len([e for e in events if isinstance(e, TextDelta)]) >= 3  # streamed, not one blob
    assert _text(events) == done.message["content"]
    assert done.finish_reason == "stop"
    u = done.usage
    assert u["prompt_tokens"] == u["cached_tokens"] + u["prefill_tokens"] and u["completion_tokens"] > 0
    assert set(done.timings) == {"prefill_s", "prefill_tokens_per_s", "decode_s", "decode_tokens_per_s"}
    assert conv.transcript == QUESTION + [done.message]
    assert conv.token_ids == conv.render(conv.transcript).ids  # the cache holds the stored turn


def test_second_turn_prefills_only_new_tokens(first_turn):
    conv, _, _ = first_turn
    c = conv.fork()
    pos = c.position
    nxt = c.transcript + [{"role": "user", "content": "And of Germany?"}]
    _, done = _turn(c, nxt)
    assert done.usage["cached_tokens"] == pos
    assert done.usage["prefill_tokens"] == len(c.render(nxt, add_generation_prompt=True).ids) - pos < 20
    assert "Berlin" in done.message["content"]


def test_same_seed_same_text(default_model):
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    base = Conversation(default_model, 512)
    base.sync(msgs)  # each run below prefills only the generation prompt
    texts = []
    for seed in (11, 11, 12):
        events, _ = _turn(base.fork(), msgs, temperature=1.0, top_p=0.95, top_k=50, seed=seed, max_tokens=8)
        texts.append(_text(events))
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_multibyte_text_streams_intact(default_model):
    tok = default_model.tokenizer
    text = "Café, 東京, Привет, 🇫🇷🍷😀 — ok"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) + d.flush() == text
    # a whole turn whose answer has multi-byte characters
    conv = Conversation(default_model, 512)
    events, done = _turn(conv, [{"role": "user", "content": "Write the Japanese word for Tokyo in kanji."}],
                         max_tokens=16)
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert all("\ufffd" not in t for t in deltas)
    assert "".join(deltas) == done.message["content"]
    assert any(ord(ch) > 127 for ch in done.message["content"])


def test_cancelled_turn_leaves_conversation_unchanged(first_turn):
    conv, _, _ = first_turn
    c = conv.fork()
    before = (c.position, c.token_ids, list(c.transcript))
    nxt = c.transcript + [{"role": "user", "content": "Tell me more about it."}]
    cancel = threading.Event()
    seen = 0
    for e in run_turn(c, ChatRequest(nxt, sampling=SamplingParams(max_tokens=40)), cancel):
        seen += isinstance(e, TextDelta)
        if seen == 3:
            cancel.set()
    assert e.finish_reason == "cancelled"
    assert (c.position, c.token_ids, c.transcript) == before
    _, after_cancel = _turn(c, nxt)
    _, reference = _turn(conv.fork(), nxt)
    assert after_cancel.message == reference.message


def test_rollback_then_same_message_same_tokens(first_turn):
    conv, _, _ = first_turn
    c = conv.fork()
    nxt = c.transcript + [{"role": "user", "content": "Name one famous museum there."}]
    _, a = _turn(c, nxt)
    tokens_a = c.token_ids
    c.rollback(2)
    assert c.transcript == conv.transcript and c.token_ids == conv.token_ids
    _, b = _turn(c, nxt)
    assert c.token_ids == tokens_a and b.message == a.message
    assert b.usage["cached_tokens"] == conv.position


def test_fork_gives_identical_continuation(first_turn):
    conv, _, _ = first_turn
    a, b = conv.fork(), conv.fork()
    nxt = conv.transcript + [{"role": "user", "content": "What river flows through it?"}]
    _, da = _turn(a, nxt)
    _, db = _turn(b, nxt)
    assert a.token_ids == b.token_ids and da.message == db.message
    assert conv.transcript[-1]["role"] == "assistant"  # the original is untouched
    # the state as a snapshot stores it, loaded back: no prefill, the same continuation
    c = Conversation.from_state(conv.model, conv.state_meta(), conv.state_tensors(), 1024)
    assert (c.position, c.token_ids, c.transcript) == (conv.position, conv.token_ids, conv.transcript)
    _, dc = _turn(c, nxt)
    assert dc.message == da.message and dc.usage["cached_tokens"] == conv.position

