"""POST /v1/chat/completions in OpenAI's shapes: the engine request from the body, the answer
and the stream chunks from the turn's events. The session-chat rule is the service's
(``superlinear.service.merge_session_messages``)."""

from __future__ import annotations

import secrets
import time
from typing import Any

from .schemas import ChatCompletionRequest


def engine_request(req: ChatCompletionRequest, messages: list[dict], defaults: dict):
    from superlinear.engine import ChatRequest, RepetitionConfig

    sampling = req.sampling_params(defaults, logprobs=req.logprobs_count(),
                                   max_tokens=req.token_limit(req.max_completion_tokens or req.max_tokens)
                                   or defaults.get("max_tokens"))
    repetition = None
    if req.repetition_detection is True:
        repetition = RepetitionConfig()
    elif req.repetition_detection not in (None, False):
        repetition = RepetitionConfig(**req.repetition_detection.model_dump())
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    return ChatRequest(
        messages=messages, tools=tools, tool_choice=req.tool_choice, sampling=sampling,
        parallel_tool_calls=bool(req.parallel_tool_calls),
        reasoning_budget=req.reasoning_budget, repetition=repetition,
        chat_template_kwargs=req.chat_template_kwargs, keep_thinking=req.keep_thinking,
    )


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def openai_usage(usage: dict) -> dict:
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    cached = int(usage.get("cached_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(usage.get("total_tokens", prompt + completion)),
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": int(usage.get("reasoning_tokens", 0))},
    }


def spl_timings(usage: dict, timings: dict, queued_s: float | None) -> dict:
    t = dict(timings)
    t.setdefault("prefill_tokens", usage.get("prefill_tokens"))
    t["tokens_reused"] = int(usage.get("cached_tokens", 0))
    if queued_s is not None:
        t["queued_s"] = round(queued_s, 4)
    return t


def final_message(done, content: str, reasoning: str, tool_calls: list[dict] | None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not tool_calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def response_body(*, cid: str, created: int, model: str, done, content: str, reasoning: str,
                  tool_calls: list[dict] | None, session_id: str | None, queued_s: float | None,
                  how: str | None) -> dict:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": final_message(done, content, reasoning, tool_calls),
            "finish_reason": done.finish_reason,
            "logprobs": None,
        }],
        "usage": openai_usage(done.usage),
        "timings": spl_timings(done.usage, done.timings, queued_s),
        "system_fingerprint": None,
    }
    if session_id:
        body["session_id"] = session_id
        body["session_update"] = how
    return body


def persist_fields(result) -> dict:
    """What a session turn's answer says about durability: ``persisted`` (the session's state
    with this turn is on disk: a crash or restart keeps it) and, when writing it failed,
    ``persist_error`` (an OpenAI-style error object; the turn itself stands)."""
    fields: dict[str, Any] = {"persisted": result.ok}
    if result.error is not None:
        fields["persist_error"] = result.error.to_openai()["error"]
    return fields


def chunk(cid: str, created: int, model: str, delta: dict | None = None, finish_reason: str | None = None,
          **extra) -> dict:
    body: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": None}],
    }
    body.update(extra)
    return body


def now() -> int:
    return int(time.time())
