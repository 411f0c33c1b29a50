"""Conversation and run_turn logic on a fake model (real tokenizer and chat template): prefix
reuse, hybrid rewinds, cancellation, rollback, fork, stops, reasoning budget, tool calls."""

import json
import threading

import pytest
from engine_fakes import FakeModel

from superlinear.engine import (
    ChatRequest,
    Done,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    ToolCallsEvent,
    run_turn,
)
from superlinear.engine.conversation import Conversation


@pytest.fixture(scope="module")
def tokenizer(request):
    return request.getfixturevalue("default_model").tokenizer


def _run(conv, messages, **kw):
    sampling = kw.pop("sampling", SamplingParams(max_tokens=12))
    events = list(run_turn(conv, ChatRequest(messages=messages, sampling=sampling, **kw),
                           kw.pop("cancel", None)))
    assert isinstance(events[-1], Done)
    return events, events[-1]


def _text(events):
    return "".join(e.text for e in events if isinstance(e, TextDelta))


@pytest.mark.parametrize("hybrid", [False, True])
def test_second_turn_prefills_only_new_tokens(tokenizer, hybrid):
    model = FakeModel(tokenizer, hybrid=hybrid)
    conv = Conversation(model, 4096)
    msgs = [{"role": "user", "content": "Tell me about foxes."}]
    ev, done = _run(conv, msgs)
    assert done.usage["cached_tokens"] == 0
    assert conv.transcript == msgs + [done.message]
    assert conv.token_ids == conv.render(conv.transcript).ids  # stored exactly as rendered
    pos = conv.position
    ev2, done2 = _run(conv, conv.transcript + [{"role": "user", "content": "And dogs?"}])
    assert done2.usage["cached_tokens"] == pos
    assert done2.usage["prefill_tokens"] < 20
    assert len(conv.boundaries) == 4 and conv.boundaries[-1] == conv.position


@pytest.mark.parametrize("hybrid", [False, True])
def test_cancel_leaves_conversation_unchanged(tokenizer, hybrid):
    model = FakeModel(tokenizer, hybrid=hybrid)
    conv = Conversation(model, 4096)
    _, d1 = _run(conv, [{"role": "user", "content": "Hi"}])
    before = (conv.position, conv.token_ids, list(conv.transcript))
    nxt = conv.transcript + [{"role": "user", "content": "More please"}]
    cancel = threading.Event()
    events = []
    for e in run_turn(conv, ChatRequest(nxt, sampling=SamplingParams(max_tokens=50)), cancel):
        events.append(e)
        if isinstance(e, TextDelta) and len(events) >= 3:
            cancel.set()
    assert events[-1].finish_reason == "cancelled"
    assert (conv.position, conv.token_ids, conv.transcript) == before
    # cancelled during prefill
    cancel = threading.Event()
    cancel.set()
    ev = list(run_turn(conv, ChatRequest(nxt), cancel))
    assert ev[-1].finish_reason == "cancelled"
    assert (conv.position, conv.token_ids, conv.transcript) == before
    # and the next greedy turn is what a fresh conversation gives
    _, a = _run(conv, nxt)
    fresh = Conversation(FakeModel(tokenizer, hybrid=hybrid), 4096)
    _run(fresh, [{"role": "user", "content": "Hi"}])
    _, b = _run(fresh, nxt)
    assert a.message == b.message


@pytest.mark.parametrize("hybrid", [False, True])
def test_rollback_and_edit_history(tokenizer, hybrid):
    model = FakeModel(tokenizer, hybrid=hybrid)
    conv = Conversation(model, 4096)
    _run(conv, [{"role": "user", "content": "One"}])
    after_one = conv.token_ids
    _, d2 = _run(conv, conv.transcript + [{"role": "user", "content": "Two"}])
    conv.rollback(2)
    assert conv.token_ids == after_one and len(conv.transcript) == 2
    _, d2b = _run(conv, conv.transcript + [{"role": "user", "content": "Two"}])
    assert d2b.message == d2.message
    # an edited earlier message: only the common prefix is kept
    edited = [{"role": "user", "content": "Uno"}]
    _, d3 = _run(conv, edited)
    # (a hybrid rewinds only to a saved state: here the start, the system prompt is no message)
    cached = d3.usage["cached_tokens"]
    assert cached == 0 if hybrid else 0 < cached < len(after_one)
    assert cached + d3.usage["prefill_tokens"] == d3.usage["prompt_tokens"]
    assert conv.token_ids == conv.render(conv.transcript).ids


def test_cancel_can_keep_the_partial_answer(tokenizer):
    conv = Conversation(FakeModel(tokenizer), 4096)
    msgs = [{"role": "user", "content": "Hi"}]
    cancel = threading.Event()
    events = []
    req = ChatRequest(msgs, sampling=SamplingParams(max_tokens=50), keep_partial=True)
    for e in run_turn(conv, req, cancel):
        events.append(e)
        if len(events) == 4:
            cancel.set()
    done = events[-1]
    assert done.finish_reason == "cancelled" and done.partial
    assert done.message == {"role": "assistant", "content": _text(events)}
    assert conv.transcript == msgs + [done.message]
    assert conv.token_ids == conv.render(conv.transcript).ids


def test_fork_is_independent_and_identical(tokenizer):
    conv = Conversation(FakeModel(tokenizer), 4096)
    _run(conv, [{"role": "user", "content": "Start"}])
    other = conv.fork()
    nxt = conv.transcript + [{"role": "user", "content": "Go on"}]
    _, a = _run(conv, nxt)
    assert other.position < conv.position
    _, b = _run(other, nxt)
    assert a.message == b.message and b.usage["cached_tokens"] > 0


def test_stop_strings_and_max_tokens(tokenizer):
    conv = Conversation(FakeModel(tokenizer), 4096)
    msgs = [{"role": "user", "content": "Words"}]
    ev, free = _run(conv, msgs, sampling=SamplingParams(max_tokens=30))
    assert free.finish_reason == "length" and free.usage["completion_tokens"] == 30
    words = free.message["content"].split()
    stop = " " + words[3]
    conv2 = Conversation(FakeModel(tokenizer), 4096)
    ev, d = _run(conv2, msgs, sampling=SamplingParams(max_tokens=30, stop=[stop]))
    assert d.finish_reason == "stop"
    assert stop not in _text(ev) and free.message["content"].startswith(_text(ev))
    assert d.message["content"] == _text(ev).strip()


def test_reasoning_budget_closes_think(tokenizer):
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    budget = len(enc("\nfirst second third"))
    # After `budget` reasoning tokens the engine writes </think>; the model then answers.
    model = FakeModel(tokenizer, script=enc("<think>\nfirst second third") + enc(" The answer."))
    conv = Conversation(model, 4096)
    ev, d = _run(conv, [{"role": "user", "content": "Q"}], reasoning_budget=budget,
                 sampling=SamplingParams(max_tokens=40))
    reasoning = "".join(e.text for e in ev if isinstance(e, ReasoningDelta))
    assert reasoning.strip() == d.reasoning == "first second third"
    assert _text(ev) == "The answer." == d.message["content"]
    assert "reasoning_content" not in d.message  # keep_thinking=False
    assert conv.token_ids == conv.render(conv.transcript).ids
    script = enc("<think>\nfirst second third fourth fifth\n</think>\n\nThe answer.")
    # the whole reasoning without a budget, and kept in the transcript on request
    conv = Conversation(FakeModel(tokenizer, script=script), 4096)
    ev, d = _run(conv, [{"role": "user", "content": "Q"}], keep_thinking=True,
                 sampling=SamplingParams(max_tokens=40))
    assert d.reasoning == "first second third fourth fifth"
    assert d.message == {"role": "assistant", "content": "The answer.",
                         "reasoning_content": "first second third fourth fifth"}
    assert _text(ev) == "The answer."
    assert conv.token_ids == conv.render(conv.transcript).ids


def test_tool_calls_end_to_end(tokenizer):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    script = tokenizer.encode("Checking." + call + call.replace("Paris", "Lyon"), add_special_tokens=False)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    conv = Conversation(FakeModel(tokenizer, script=script), 4096)
    msgs = [{"role": "user", "content": "Weather in Paris and Lyon?"}]
    ev, d = _run(conv, msgs, tools=tools, sampling=SamplingParams(max_tokens=80))
    assert "get_weather" in conv.render(msgs, tools=tools).text  # tools described to the model
    assert _text(ev) == "Checking."
    calls = [e for e in ev if isinstance(e, ToolCallsEvent)][0].calls
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris", "days": 2}, {"city": "Lyon", "days": 2}]
    assert d.finish_reason == "tool_calls" and d.message["tool_calls"] == calls
    # the tool results go back in and the next turn reuses the cache
    follow = conv.transcript + [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in calls]
    pos = conv.position
    _, d2 = _run(conv, follow, tools=tools)
    assert d2.usage["cached_tokens"] == pos


def test_unparsable_tool_call_stays_text(tokenizer):
    text = 'Sure.<tool_call>\n{"name": "f", "arguments": {"x": '
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    conv = Conversation(FakeModel(tokenizer, script=tokenizer.encode(text, add_special_tokens=False)), 4096)
    ev, d = _run(conv, [{"role": "user", "content": "Q"}], tools=tools, sampling=SamplingParams(max_tokens=60))
    assert not any(isinstance(e, ToolCallsEvent) for e in ev)
    assert d.finish_reason == "stop" and _text(ev) == text == d.message["content"]


def test_long_render_reuses_tokenization_exactly(tokenizer):
    import random

    rng = random.Random(0)
    words = ["fox", "Paris", "émoji😀", "東京", "\n\n", "  ", "the", "<b>", "xxxxx", "<|im_end", "|>"]

    def para(n):
        return " ".join(rng.choice(words) for _ in range(n))

    conv = Conversation(FakeModel(tokenizer), 100_000)
    msgs = [{"role": r, "content": para(200)} for _ in range(6) for r in ("user", "assistant")]
    conv.sync(msgs)
    assert conv._tok_memo is not None  # long enough to be remembered
    for variant in range(4):
        nxt = conv.transcript + [{"role": "user", "content": para(30)}]
        if variant == 2:
            nxt = nxt[:5] + [{"role": "user", "content": "edited " + para(10)}]
        r = conv.render(nxt, add_generation_prompt=True)
        assert r.ids == tokenizer(r.text, add_special_tokens=False)["input_ids"]
        conv.sync(nxt)
        assert conv.token_ids == tokenizer(conv.render(nxt).text, add_special_tokens=False)["input_ids"]


def test_repetition_stops_a_loop(tokenizer):
    from superlinear.engine import RepetitionConfig

    unit = tokenizer.encode(" I will say it again.", add_special_tokens=False)
    intro = tokenizer.encode("Sure, here goes:", add_special_tokens=False)
    conv = Conversation(FakeModel(tokenizer, script=intro + unit * 50), 4096)
    cfg = RepetitionConfig(tail_len=16, min_repeats=3, max_period=32)
    ev, d = _run(conv, [{"role": "user", "content": "Q"}], repetition=cfg,
                 sampling=SamplingParams(max_tokens=300))
    assert d.finish_reason == "repetition"
    assert d.usage["completion_tokens"] <= len(intro) + 4 * len(unit)  # within a few periods
    assert d.message["content"] == _text(ev)
    # without the option the loop runs to max_tokens
    conv = Conversation(FakeModel(tokenizer, script=intro + unit * 50), 4096)
    _, d = _run(conv, [{"role": "user", "content": "Q"}], sampling=SamplingParams(max_tokens=60))
    assert d.finish_reason == "length"


def test_template_opened_think_and_zero_budget(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tokenizer.chat_template.replace("assistant\n' }}", "assistant\n<think>\n' }}")
    assert tok.chat_template != tokenizer.chat_template
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    msgs = [{"role": "user", "content": "Q"}]
    # the prompt opened the block: everything is reasoning until </think>
    conv = Conversation(FakeModel(tok, script=enc("alpha beta") + enc(" Final.")), 4096)
    ev, d = _run(conv, msgs, reasoning_budget=len(enc("alpha beta")), sampling=SamplingParams(max_tokens=20))
    assert d.reasoning == "alpha beta" and _text(ev) == "Final." == d.message["content"]
    # budget 0: the engine closes the block before the first token
    conv = Conversation(FakeModel(tok, script=enc("The answer.")), 4096)
    ev, d = _run(conv, msgs, reasoning_budget=0, sampling=SamplingParams(max_tokens=20))
    assert d.reasoning is None and _text(ev) == "The answer."
    assert not any(isinstance(e, ReasoningDelta) for e in ev)


def test_named_tool_choice_forces_the_call(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    # the grammar forces '<tool_call>\n{"name":"get_weather","arguments":' (compact JSON); then the model
    script = tokenizer.encode('{"city":"Oslo"}}\n</tool_call>', add_special_tokens=False)
    conv = Conversation(FakeModel(tokenizer, script=script), 4096)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    ev, d = _run(conv, [{"role": "user", "content": "Weather?"}], tools=tools, tool_choice=choice,
                 sampling=SamplingParams(max_tokens=40))
    assert d.finish_reason == "tool_calls" and _text(ev) == ""
    assert d.message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    # a model that would write something else is held to the call's markup and the tool's name
    conv = Conversation(FakeModel(tokenizer, script=tokenizer.encode("Sure! It is sunny.", add_special_tokens=False)),
                        4096)
    _, d = _run(conv, [{"role": "user", "content": "Weather?"}], tools=tools, tool_choice=choice,
                sampling=SamplingParams(max_tokens=40))
    assert "<tool_call>" not in (d.message["content"] or "") and "Sure" not in (d.message["content"] or "")
    # tool_choice "none": the tools are not even described
    conv = Conversation(FakeModel(tokenizer), 4096)
    _, d = _run(conv, [{"role": "user", "content": "Weather?"}], tools=tools, tool_choice="none")
    assert conv.tools is None and "tool_calls" not in d.message


@pytest.mark.parametrize("change,param", [
    ({"sampling": SamplingParams(seed=2**64)}, "seed"),
    ({"sampling": SamplingParams(top_k=-1)}, "top_k"),
    ({"sampling": SamplingParams(temperature=float("nan"))}, "temperature"),
    ({"sampling": SamplingParams(max_tokens=-1)}, "max_tokens"),
    ({"sampling": SamplingParams(min_tokens=5, max_tokens=2)}, "min_tokens"),
    ({"sampling": SamplingParams(stop_token_ids=[-3])}, "stop_token_ids"),
    ({"sampling": SamplingParams(stop=["x" * 5000])}, "stop"),
    ({"reasoning_budget": 2**70}, "reasoning_budget"),
    ({"repetition": "big"}, "repetition_detection.max_period"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
])
def test_out_of_bounds_requests_are_refused_before_any_work(tokenizer, change, param):
    """Library callers get the server's bounds too: nothing allocated (a max_period of 1e13 would
    be a list of that length), nothing prefilled, the conversation as it was."""
    from superlinear.engine import RepetitionConfig
    from superlinear.errors import InvalidRequest

    if change.get("repetition") == "big":
        change = {"repetition": RepetitionConfig(max_period=10**13)}
    model = FakeModel(tokenizer)
    conv = Conversation(model, 256)
    _run(conv, [{"role": "user", "content": "hi"}])
    before = (conv.token_ids, conv.transcript, model.prefilled)
    request = ChatRequest(messages=conv.transcript + [{"role": "user", "content": "again"}], **change)
    with pytest.raises(InvalidRequest) as e:
        list(run_turn(conv, request))
    assert e.value.param == param
    assert (conv.token_ids, conv.transcript, model.prefilled) == before


class _Guard:
    """A memory guard (``Conversation.memory``) that allows ``limit`` cached tokens."""

    def __init__(self, limit: int):
        self.limit = limit
        self.asked: list[int] = []

    def reserve(self, conv, position: int) -> None:
        from superlinear.errors import OverBudget

        self.asked.append(position)
        if position > self.limit:
            raise OverBudget(f"{position} tokens do not fit", param="max_seq_len")

    def room(self, conv) -> int:
        return self.limit - conv.position


def test_memory_guard_refuses_a_prefill_and_ends_a_generation(tokenizer):
    """The budget is asked before the cache grows (a refusal changes nothing) and bounds how
    far a generation goes (finish_reason "memory")."""
    from superlinear.errors import OverBudget

    conv = Conversation(FakeModel(tokenizer), 1024)
    _run(conv, [{"role": "user", "content": "hi"}])
    before = (conv.token_ids, conv.transcript)
    conv.memory = _Guard(conv.position + 5)
    with pytest.raises(OverBudget):
        _run(conv, conv.transcript + [{"role": "user", "content": "a long question " * 20}])
    assert (conv.token_ids, conv.transcript) == before
    conv.memory = guard = _Guard(conv.position + 60)
    _, done = _run(conv, conv.transcript + [{"role": "user", "content": "tell me more"}],
                   sampling=SamplingParams(max_tokens=500))
    assert done.finish_reason == "memory" and conv.position <= guard.limit
    assert guard.asked and max(guard.asked) <= guard.limit
    assert conv.fork().memory is None  # a fork's owner installs its own guard


def test_a_template_that_cannot_render_the_request_is_a_400(tokenizer):
    import copy

    from superlinear.errors import InvalidRequest

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('the first message "
                            "must be a system message') }}{% endif %}{{ messages[0]['content'] }}")
    conv = Conversation(FakeModel(strict), 256)
    with pytest.raises(InvalidRequest, match="cannot render this request: the first message must be"):
        _run(conv, [{"role": "user", "content": "hi"}])
    assert conv.position == 0 and conv.transcript == []


def test_many_new_messages_cost_a_bounded_number_of_renders(tokenizer):
    """Each message boundary costs a render of its prefix; only the newest few are computed (a
    hybrid keeps at most MAX_RECURRENT_CHECKPOINTS), so a request with thousands of messages is
    not quadratic. A prompt longer than the cache computes none (it is refused anyway)."""
    from superlinear.engine.conversation import MAX_RECURRENT_CHECKPOINTS

    conv = Conversation(FakeModel(tokenizer), 1 << 16)
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(2000)]
    calls = []
    render = conv.template.render
    conv.template.render = lambda *a, **k: calls.append(1) or render(*a, **k)
    rendered = conv.render(messages, add_generation_prompt=True)
    assert len(calls) == 1 + MAX_RECURRENT_CHECKPOINTS + 1
    known = [b for b in rendered.boundaries if b is not None]
    assert len(known) == MAX_RECURRENT_CHECKPOINTS + 1 and known == sorted(known)
    assert rendered.boundaries[-1] == len(conv.render(messages).ids)  # the end of the last message
    small = Conversation(FakeModel(tokenizer), 64)
    small.template.render = conv.template.render
    calls.clear()
    assert small.render(messages, add_generation_prompt=True).boundaries == [None] * 2000 and len(calls) == 1
