"""One streamed chat completion of ``spl bench serve``, timed on the client: the arrival of every
token-bearing chunk (TTFT, each inter-token gap), the whole latency, and the real token counts
from the stream's usage chunk (``stream_options.include_usage``).

A token-bearing chunk is one whose delta carries text (content or reasoning) or tool calls: spl
sends an empty ``{"role": "assistant"}`` chunk when the turn starts, before the prefill, which is
not a token. Where a server sends no usage, the output is counted in chunks (``counted``: how).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from httpx_sse import aconnect_sse

MAX_ERROR_CHARS = 300


@dataclass
class RequestResult:
    started: float  # perf_counter at send
    prompt_tokens_asked: int
    output_tokens_asked: int
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    ended: float | None = None  # perf_counter when the stream ended (or failed)
    itl: list[float] = field(default_factory=list)  # every gap between token-bearing chunks
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int = 0
    counted: str = "usage"  # or "chunks": the server sent no usage
    finish_reason: str | None = None
    server_queued_s: float | None = None  # spl's timings.queued_s: how long the turn waited
    reply: str = ""  # the assistant's text, for the next turn of a session

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if not self.ok or self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def chat_body(model: str, messages: list[dict], max_tokens: int, session_id: str | None) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0,
            "ignore_eos": True}  # so the output has the asked length (vLLM's and spl's name)
    if session_id is not None:
        body["session_id"] = session_id
    return body


async def stream_chat(http: httpx.AsyncClient, body: dict, *, prompt_tokens: int, timeout: float,
                      on_first_event: Callable[[], None] | None = None) -> RequestResult:
    """Send ``body`` (streamed) and time it; never raises for what the server or the network
    does: a failure is the result's ``error``. ``timeout`` bounds the whole request."""
    result = RequestResult(started=time.perf_counter(), prompt_tokens_asked=prompt_tokens,
                           output_tokens_asked=int(body["max_tokens"]))
    try:
        await asyncio.wait_for(_stream(http, body, result, on_first_event), timeout)
    except TimeoutError:
        result.error = f"no complete answer within {timeout:g} s (--request-timeout)"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    except (ValueError, TypeError, AttributeError) as exc:  # a chunk that is not JSON, or not a chunk's shape
        result.error = f"bad stream: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    result.ended = time.perf_counter()
    result.ok = result.error is None
    if result.ok and result.counted == "usage" and result.prompt_tokens is None:
        result.counted = "chunks"  # the server sent no usage
    return result


async def _stream(http: httpx.AsyncClient, body: dict, result: RequestResult,
                  on_first_event: Callable[[], None] | None) -> None:
    last: float | None = None
    chunks = 0
    parts: list[str] = []
    async with aconnect_sse(http, "POST", "/v1/chat/completions", json=body) as source:
        response = source.response
        if response.status_code != 200:
            await response.aread()
            result.error = f"HTTP {response.status_code}: {error_message(response)}"
            return
        async for event in source.aiter_sse():
            now = time.perf_counter()
            if on_first_event is not None:
                on_first_event()
                on_first_event = None
            if event.data.strip() == "[DONE]":
                break
            if not event.data.strip():
                continue
            chunk = json.loads(event.data)
            if "error" in chunk:
                result.error = f"stream error: {_message_of(chunk)}"
                return
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                if text or delta.get("tool_calls"):
                    if last is None:
                        result.ttft = now - result.started
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    parts.append(delta.get("content") or "")
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
            queued = (chunk.get("timings") or {}).get("queued_s")
            if queued is not None:
                result.server_queued_s = float(queued)
            _take_usage(chunk.get("usage"), result)
    end = time.perf_counter()
    result.latency = end - result.started
    if result.ttft is None:  # no token had text (e.g. one token held back as a partial character)
        result.ttft = result.latency
    result.reply = "".join(parts)
    if result.prompt_tokens is None:
        result.output_tokens = chunks


def _take_usage(usage, result: RequestResult) -> None:
    if not isinstance(usage, dict) or "completion_tokens" not in usage:
        return
    result.output_tokens = int(usage["completion_tokens"])
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    result.cached_tokens = int(details.get("cached_tokens") or 0)


def error_message(response: httpx.Response) -> str:
    """The message of an error answer (OpenAI's ``{"error": {"message"}}`` or FastAPI's
    ``{"detail"}``), else the start of its body."""
    try:
        return _message_of(response.json())
    except ValueError:
        return response.text.strip()[:MAX_ERROR_CHARS] or response.reason_phrase


def _message_of(body) -> str:
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:MAX_ERROR_CHARS]
    return str(body)[:MAX_ERROR_CHARS]
