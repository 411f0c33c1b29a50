"""One chat turn: sync the prompt into the cache, decode, and stream events out.

Text flows token -> detokenizer (UTF-8 safe) -> stop strings -> <think> splitter -> tool-call
splitter -> events. Each stage holds back only what it might still have to take back.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

from superlinear.errors import InvalidRequest, OverBudget, TooLarge

from .conversation import Conversation
from .decode import (
    IncrementalDetokenizer,
    Sampler,
    StopCutter,
    decode,
    find_first,
    partial_marker_start,
    stop_reason,
    turn_usage,
)
from .limits import check_request
from .repetition import RepetitionDetector
from .tools import THINK_CLOSE, THINK_OPEN, TOOL_BLOCKS, parse_tool_calls
from .types import ChatRequest, Done, Event, ReasoningDelta, TextDelta, ToolCallsEvent

END_OF_TURN_ROOM = 8


class ThinkSplitter:
    """Splits generated text into reasoning (inside <think>…</think>) and answer.

    ``in_reasoning=True`` when the prompt already opened the block (templates that end the
    generation prompt with ``<think>``). A ``<think>`` is honoured only before any answer text
    (leading whitespace aside), like the models that emit it.
    """

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"  # start -> reasoning -> answer
        self.buf = ""
        self.reasoning = ""
        self.answer = ""

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"

    def push(self, text: str) -> tuple[str, str]:
        """Returns (reasoning_delta, answer_delta)."""
        self.buf += text
        r_out, a_out = "", ""
        while True:
            if self.state == "start":
                stripped = self.buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buf = stripped[len(THINK_OPEN):]
                    self.state = "reasoning"
                    continue
                if THINK_OPEN.startswith(stripped):  # empty or a prefix of <think>: wait
                    break
                self.state = "answer_start"
                continue
            if self.state == "reasoning":
                i = self.buf.find(THINK_CLOSE)
                if i != -1:
                    r_out += self.buf[:i]
                    self.buf = self.buf[i + len(THINK_CLOSE):]
                    self.state = "answer_start"
                    continue
                k = partial_marker_start(self.buf, [THINK_CLOSE])
                r_out += self.buf[:k]
                self.buf = self.buf[k:]
                break
            if self.state == "answer_start":  # the answer starts at its first visible character
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self.state = "answer"
                continue
            a_out += self.buf  # answer
            self.buf = ""
            break
        if not self.reasoning:
            r_out = r_out.lstrip()  # the newline after <think>
        self.reasoning += r_out
        self.answer += a_out
        return r_out, a_out

    def flush(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            self.reasoning += rest
            return rest, ""
        if self.state in ("start", "answer_start"):
            rest = rest.lstrip()
        self.answer += rest
        return "", rest


class _TextPipeline:
    """Generated text in, events out."""

    def __init__(self, stops, in_reasoning: bool, parse_tools: bool, unarmed: int = 0):
        self.stop = StopCutter(stops, unarmed)
        self.think = ThinkSplitter(in_reasoning)
        self.parse_tools = parse_tools
        self.pending = ""  # answer text held back (could start <tool_call>)
        self.in_tools = False
        self.emitted = ""  # answer text sent as TextDelta

    def _answer(self, text: str, final: bool) -> list[Event]:
        if self.in_tools or not text and not final:
            return []
        self.pending += text
        if self.parse_tools:
            i, _ = find_first(self.pending, list(TOOL_BLOCKS))
            if i != -1:
                out, self.pending, self.in_tools = self.pending[:i].rstrip(), "", True
            else:
                k = len(self.pending) if final else partial_marker_start(self.pending, list(TOOL_BLOCKS))
                out, self.pending = self.pending[:k], self.pending[k:]
        else:
            out, self.pending = self.pending, ""
        if out:
            self.emitted += out
            return [TextDelta(out)]
        return []

    def push(self, text: str) -> list[Event]:
        r, a = self.think.push(self.stop.push(text))
        events: list[Event] = [ReasoningDelta(r)] if r else []
        return events + self._answer(a, False)

    def finish(self) -> list[Event]:
        r1, a1 = self.think.push(self.stop.flush())
        r2, a2 = self.think.flush()
        events: list[Event] = [ReasoningDelta(r1 + r2)] if r1 + r2 else []
        return events + self._answer(a1 + a2, True)


def run_turn(conversation: Conversation, request: ChatRequest,
             cancel: threading.Event | None = None) -> Iterator[Event]:
    """Run one assistant turn for ``request.messages`` on ``conversation`` (blocking).

    On success the conversation holds messages + the assistant message (as yielded in ``Done``);
    on cancellation or an error it is restored to exactly what it was before.
    """
    check_request(request, len(conversation.model.tokenizer))
    cp = conversation.checkpoint()
    try:
        yield from _turn(conversation, request, cancel or threading.Event(), cp)
    except BaseException:
        conversation.restore(cp)
        raise


def _turn(conv: Conversation, req: ChatRequest, cancel: threading.Event, cp) -> Iterator[Event]:
    from superlinear.model.model import Cancelled

    if not req.messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    sp = req.sampling
    tok = conv.model.tokenizer
    tools = req.tools if req.tools and req.tool_choice != "none" else None
    kwargs = req.chat_template_kwargs
    t_start = time.perf_counter()

    prompt = conv.render(req.messages, tools=tools, template_kwargs=kwargs, add_generation_prompt=True)
    try:
        # PrefillProgress events: when the prefill begins and after every chunk (clients show a bar)
        stats = yield from conv.sync_steps(prompt.ids, [b for b in prompt.boundaries if b],
                                           should_cancel=cancel.is_set)
    except Cancelled:
        conv.restore(cp)
        yield _done_cancelled(conv, prompt, 0, t_start)
        return
    conv.set_transcript(req.messages, prompt.boundaries, tools, kwargs)
    logits = conv.logits
    prefill_s = time.perf_counter() - t_start

    in_reasoning = prompt.text.rstrip().endswith("<think>")
    pipe = _TextPipeline(sp.stop, in_reasoning, tools is not None, sp.min_tokens)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=sp.skip_special_tokens)
    stop_ids = (set() if sp.ignore_eos else conv.template.end_token_ids) | set(sp.stop_token_ids)
    tool_grammar = tools is not None and sp.structured is None and req.tool_choice not in (None, "none")
    if tool_grammar:  # the calls follow the markup, names and parameter schemas of the tools
        sp = dataclasses.replace(sp, structured={"tools": {
            "tools": tools, "format": conv.template.tool_format, "reasoning": in_reasoning,
            "parallel": req.parallel_tool_calls,
            "choice": (req.tool_choice.get("function") or {}).get("name") if isinstance(req.tool_choice, dict)
            else req.tool_choice}})
    sampler = Sampler(sp, tokenizer=tok, end_ids=sorted(stop_ids), prompt_ids=prompt.ids)
    detector = RepetitionDetector(req.repetition) if req.repetition else None
    budget = req.reasoning_budget
    max_tokens = sp.max_tokens if sp.max_tokens is not None else conv.max_seq_len
    # Generation stops this many tokens before the cache is full: the end-of-turn tokens of the
    # stored message must still fit. Under a memory budget it stops where the budget ends.
    limit = conv.max_seq_len - END_OF_TURN_ROOM
    room = conv.memory.room(conv) if conv.memory is not None else None
    budget_limit = conv.position + room - END_OF_TURN_ROOM if room is not None else limit
    length_reason = "length"
    if budget_limit < limit:
        limit, length_reason = budget_limit, "memory"
    completion = 0
    t_decode = time.perf_counter()
    reasoning = {"before": False, "tokens": 0, "budget": budget}

    def feed(ids: list[int]) -> Iterator[Event]:
        reasoning["before"] = pipe.think.in_reasoning
        for t in ids:
            yield from pipe.push(detok.push(t))

    def reasoning_budget(_token: int, logits):
        """Count reasoning tokens; once the budget is spent, close the block ourselves."""
        if not (reasoning["before"] and pipe.think.in_reasoning) or reasoning["budget"] is None:
            return logits, 0, None
        reasoning["tokens"] += 1
        if reasoning["tokens"] < reasoning["budget"]:
            return logits, 0, None
        ids = tok.encode("\n" + THINK_CLOSE + "\n\n", add_special_tokens=False)
        if conv.position + len(ids) >= limit:
            return logits, 0, length_reason
        logits = conv.extend_tokens(ids)
        sampler.accept(ids)
        yield from feed(ids)
        reasoning["budget"] = None
        return logits, len(ids), None

    forced = "\n" + THINK_CLOSE + "\n\n" if budget is not None and budget <= 0 and in_reasoning else ""
    ids = tok.encode(forced, add_special_tokens=False) if forced else []
    if tool_grammar and not in_reasoning:  # what the grammar allows alone (a required call's opening)
        ids += sampler.forced_tokens()
    ids = ids[:max(0, max_tokens - completion)]
    if ids and conv.position + len(ids) < limit:
        logits = conv.extend_tokens(ids)
        sampler.accept(ids)
        completion += len(ids)
        yield from feed(ids)

    finish, completion = yield from decode(
        conv, logits, sampler, stop_ids=stop_ids, max_tokens=max_tokens, limit=limit, cancel=cancel,
        feed=lambda t: feed([t]), stopped=lambda: pipe.stop.stopped, detector=detector,
        length_reason=length_reason, completion=completion, after_step=reasoning_budget)
    if finish == "cancelled":
        done = _done_cancelled(conv, prompt, completion, t_start, pipe)
        if req.keep_partial:  # store exactly what was streamed, flagged in Done
            if done.reasoning and req.keep_thinking:
                done.message["reasoning_content"] = done.reasoning
            conv.sync(req.messages + [done.message], tools=tools, template_kwargs=kwargs)
            done.partial = True
        else:
            conv.restore(cp)
        yield done
        return

    yield from pipe.push(detok.flush())
    yield from pipe.finish()
    decode_s = time.perf_counter() - t_decode
    reasoning_text = pipe.think.reasoning.strip() or None
    answer = pipe.think.answer
    calls = []
    if tools is not None:
        _, calls = parse_tool_calls(answer, tools)
        if calls:
            answer = pipe.emitted  # the text streamed before the first tool-call block
        elif pipe.in_tools and finish in ("length", "memory"):  # a call cut short: no markup leaks
            answer = pipe.emitted
        elif pipe.in_tools:  # a <tool_call> that does not parse: it is plain text after all
            yield TextDelta(answer[len(pipe.emitted):])
    # The stored content is exactly the streamed text (the answer's leading blanks never stream).
    message: dict = {"role": "assistant", "content": answer if not calls else (answer or None)}
    if calls:
        message["tool_calls"] = calls
        yield ToolCallsEvent(calls)
        if finish == "stop":
            finish = "tool_calls"
    if reasoning_text and req.keep_thinking:
        message["reasoning_content"] = reasoning_text
    # Store the turn as the template renders it: the generated tokens stay in the cache where
    # they match that rendering, the end-of-turn tokens are appended.
    stored = False
    if req.close_turn:
        try:
            conv.sync(req.messages + [message], tools=tools, template_kwargs=kwargs)
            stored = True
        except (TooLarge, OverBudget):  # the rendering does not fit: keep the generated tokens
            pass
    if not stored:  # the cache keeps the generated tokens; the next sync trims and appends
        conv.set_transcript(req.messages + [message], prompt.boundaries + [None], tools, kwargs)
    usage, timings = turn_usage(len(prompt.ids), completion, stats, prefill_s, decode_s)
    yield Done(finish, message, usage, timings, reasoning=reasoning_text,
               stop_reason=stop_reason(finish, sampler, pipe.stop.matched))


def _done_cancelled(conv, prompt, completion, t_start, pipe: _TextPipeline | None = None) -> Done:
    message = {"role": "assistant", "content": pipe.emitted if pipe else ""}
    reasoning = pipe.think.reasoning.strip() or None if pipe else None
    usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": completion,
             "total_tokens": len(prompt.ids) + completion, "cached_tokens": 0, "prefill_tokens": 0}
    timings = {"prefill_s": None, "prefill_tokens_per_s": None,
               "decode_s": round(time.perf_counter() - t_start, 4), "decode_tokens_per_s": None}
    return Done("cancelled", message, usage, timings, reasoning=reasoning)
