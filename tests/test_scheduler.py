"""The engine's scheduler through the real in-process API (``LocalApi`` on a tiny random llama,
CPU fp32): sequences batched together give each exactly the tokens it gives alone, prefill
chunks take turns with decodes, a cancelled member leaves without disturbing the others, and a
session's turns and admin operations still run one at a time."""

from __future__ import annotations

import random
import threading

import pytest

import superlinear
from superlinear.api.types import Completion
from superlinear.api.worker import Worker
from superlinear.engine import ChatRequest, Done, SamplingParams, TextDelta
from superlinear.service import ChatTurn, Started

STEP_TOKENS = 16  # small: prompts take several steps, interleaved with the others' decodes


@pytest.fixture(scope="module")
def api(tiny_llama, tmp_path_factory):
    steps: list[tuple[int, int]] = []
    worker = Worker(max_step_tokens=STEP_TOKENS, on_step=lambda batch, tokens, _s: steps.append((batch, tokens)))
    api = superlinear.connect("local", model=str(tiny_llama), max_seq_len=2048,
                              snapshots_dir=str(tmp_path_factory.mktemp("snapshots")), worker=worker)
    api.steps = steps
    yield api
    api.close()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of mixed lengths, each starting with its own token (no shared prefix)."""
    rng = random.Random(seed)
    lengths = [5, 70, 23, 41, 9, 100, 3, 57][:n]
    return [[1000 + i] + [rng.randrange(200, 40000) for _ in range(length - 1)] for i, length in enumerate(lengths)]


def completion(ids: list[int], max_tokens: int = 12) -> Completion:
    return Completion(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))


def tokens_of(events: list) -> tuple[str, str]:
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return text, next(e for e in events if isinstance(e, Done)).finish_reason


def run_together(api, requests: list[Completion], cancel_after: dict[int, int] | None = None) -> list[list]:
    """Submit every request at once; ``cancel_after[i] = k``: cancel request i at its k-th text."""
    events: list[list] = [[] for _ in requests]
    jobs = []
    gate = threading.Event()  # no request may start before all are queued

    def emitter(i: int):
        def emit(event):
            events[i].append(event)
            texts = sum(isinstance(e, TextDelta) for e in events[i])
            if cancel_after and i in cancel_after and texts >= cancel_after[i]:
                jobs[i].cancel()
        return emit

    api.worker.call(lambda: None)
    blocker = api.worker.submit(lambda _job: gate.wait(30))  # holds the worker while all arrive
    for i, request in enumerate(requests):
        jobs.append(api.submit_completion(request, emitter(i)))
    gate.set()
    blocker.future.result(30)
    for job in jobs:
        job.future.result(120)
    return events


def test_each_sequence_in_a_batch_gives_exactly_its_tokens_alone(api):
    requests = [completion(ids, max_tokens=24) for ids in prompts(6)]
    alone = [tokens_of(list(api.complete(r))) for r in requests]
    del api.steps[:]
    together = [tokens_of(e) for e in run_together(api, requests)]
    assert together == alone
    batches = [b for b, _ in api.steps]
    assert max(batches) >= 4  # they really decoded together (the short ones wait for no long prompt)
    # prefill chunks ran in steps that also decoded others: no prompt froze the running streams
    assert any(b >= 1 and t > 0 for b, t in api.steps)
    assert all(t <= STEP_TOKENS for _, t in api.steps)  # the per-step prefill budget held


def test_a_member_cancelled_midway_leaves_the_others_untouched(api):
    requests = [completion(ids, max_tokens=16) for ids in prompts(4, seed=1)]
    alone = [tokens_of(list(api.complete(r))) for r in requests]
    events = run_together(api, requests, cancel_after={1: 3})
    together = [tokens_of(e) for e in events]
    assert together[1][1] == "cancelled"
    assert together[1][0] == alone[1][0][:len(together[1][0])]  # what it streamed was its own text
    assert [together[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]


def chat(text: str, session_id: str | None = None, max_tokens: int = 24) -> ChatTurn:
    return ChatTurn(ChatRequest(messages=[{"role": "user", "content": text}],
                                sampling=SamplingParams(temperature=0, max_tokens=max_tokens)), session_id=session_id)


def test_a_sessions_turns_and_admin_operations_wait_for_its_running_turn(api):
    api.create_session("s")
    order: list[str] = []
    first_done = threading.Event()

    def on_first(event):
        if isinstance(event, Done):
            order.append("first done")
            first_done.set()

    def on_second(event):
        if isinstance(event, Started):
            order.append("second started")

    first = api.submit_chat(chat("Tell me a story.", "s", max_tokens=40), on_first)
    second = api.submit_chat(chat("And then?", "s", max_tokens=4), on_second)
    other = api.submit_chat(chat("Unrelated.", None, max_tokens=4), lambda _e: None)  # another user: not held
    forked = api.fork("s", "s-fork")  # waits for both turns queued before it on "s"
    first.future.result(60)
    second.future.result(60)
    other.future.result(60)
    assert order == ["first done", "second started"]  # one turn at a time on a session
    assert forked["message_count"] == 4  # the fork saw both whole turns, never half of one
    assert api.history("s-fork") == api.history("s")
    saved = api.save("s", title="between turns")
    assert saved["session"]["position"] == api.get_session("s")["position"]


@pytest.fixture(scope="module")
def hybrid_api(tmp_path_factory):
    """A tiny random Nemotron-H hybrid (Mamba + attention): its prompts are cut at message
    boundaries for the recurrent-state checkpoints, then in step chunks."""
    from sessions_tiny import write_tiny_hybrid

    from superlinear.model.default import ensure_default
    from superlinear.model.loaders import load_tokenizer

    path = write_tiny_hybrid(tmp_path_factory.mktemp("tiny-hybrid"), load_tokenizer(ensure_default()))
    api = superlinear.connect("local", model=str(path), device="cpu", max_seq_len=2048,
                              snapshots_dir=str(tmp_path_factory.mktemp("hybrid-snapshots")),
                              worker=Worker(max_step_tokens=STEP_TOKENS))
    yield api
    api.close()


def test_hybrid_session_turns_in_a_batch_give_exactly_their_tokens_alone(hybrid_api):
    texts = ["Tell me about rivers and the sea, at length.", "Hi", "What is the capital of a country far away?"]

    def answers(events: list) -> str:
        return next(e for e in events if isinstance(e, Done)).message["content"]

    alone = []
    for i, text in enumerate(texts):
        alone.append([answers(list(hybrid_api.chat(chat(t, f"alone-{i}", max_tokens=10))))
                      for t in (text, "And then?")])
    together: list[list[str]] = [[] for _ in texts]
    for follow_up in (None, "And then?"):
        events: list[list] = [[] for _ in texts]
        jobs = [hybrid_api.submit_chat(chat(follow_up or text, f"together-{i}", max_tokens=10), events[i].append)
                for i, text in enumerate(texts)]
        for job in jobs:
            job.future.result(120)
        for i in range(len(texts)):
            together[i].append(answers(events[i]))
    assert together == alone
