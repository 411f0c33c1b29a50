"""POST /v1/chat/completions: the turn runs on the API's worker (``LocalApi.submit_chat``), its
events come back through the one generation path (``generation.py``) and are folded by one
``Reply``, streamed or not."""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from superlinear.engine import PrefillProgress
from superlinear.service import ChatTurn, Done, Logprobs, Persisted, ReasoningDelta, Started, TextDelta, ToolCallsEvent
from superlinear.service.logprobs import chat_logprobs

from . import bounds, progress
from . import chat as openai
from .generation import JobStream, generate
from .http import MAX_BODY_BYTES
from .runtime import Runtime
from .schemas import MAX_MESSAGES, ChatCompletionRequest

CHAT = bounds.declare(
    "POST", "/v1/chat/completions", body_bytes=MAX_BODY_BYTES,
    text=f"every string of messages, tools and tool_choice: at most {bounds.TOKEN_LIMIT}, each message the "
         "template's own tokens at least, each tool one",
    items=f"messages {MAX_MESSAGES:,}; " + bounds.SAMPLING_ITEMS,
    reply="one choice of at most max_tokens tokens", body=ChatCompletionRequest)


def add_routes(app: FastAPI, rt: Runtime) -> None:
    @app.post(CHAT.path)
    async def chat_completions(request: Request):
        body = await bounds.parse_request(request, ChatCompletionRequest, lenient=rt.options.lenient_fields)
        body.check_supported()
        if body.session_id is not None:
            from superlinear.sessions import validate_id

            validate_id(body.session_id, "session id", param="session_id")
        rt.require_ready()
        rt.api.get_model(body.model)  # NotFound unless it names the model served
        bounds.check_sampling(body)
        messages = body.plain_messages()
        # every string the template renders counts, before any of it reaches the worker
        chars = await asyncio.to_thread(lambda: {"messages": bounds.string_chars(messages),
                                                 "tools": bounds.string_chars([body.tools, body.tool_choice])})
        await bounds.check_text(rt, sum(chars.values()), max(chars, key=chars.get),
                                messages=len(messages), pieces=len(body.tools or ()))
        rt.stats["requests"] += 1
        turn = ChatTurn(openai.engine_request(body, messages, rt.defaults),
                        session_id=body.session_id, session_mode=body.session_mode)
        stream = JobStream(rt.api.submit_chat, turn)
        reply = Reply(rt, body, stream)
        return await generate(request, stream, streamed=body.stream, chunks=reply.stream, collect=reply.collect,
                              ping_s=progress.ping_interval(body.sse_ping_interval))


class Reply:
    """One chat completion being answered: the turn's events folded into what the answer says.
    ``stream`` and ``collect`` read the same events through ``_observe``."""

    def __init__(self, rt: Runtime, body: ChatCompletionRequest, stream: JobStream):
        self.rt, self.model, self.body, self.stream_ = rt, rt.model_name, body, stream
        self.cid, self.created = openai.completion_id(), openai.now()
        self.extra = {"session_id": body.session_id} if body.session_id else {}
        self.how: str | None = None
        self.queued_s: float | None = None
        self.persisted: Persisted | None = None
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict] | None = None
        self.logprobs: list = []  # every token's, for the answer
        self.unsent_logprobs: list = []  # a stream's not yet sent: they go with the next chunk
        self.done: Done | None = None

    async def _events(self, first):
        async for event in self.stream_.events(first):
            yield event
        if self.done is None:
            raise RuntimeError("the turn ended without a Done event")

    def _chunk(self, delta: dict | None, finish_reason: str | None = None, **fields) -> dict:
        chunk = openai.chunk(self.cid, self.created, self.model, delta, finish_reason, **fields, **self.extra)
        if self.unsent_logprobs and delta is not None:
            chunk["choices"][0]["logprobs"] = chat_logprobs(self.unsent_logprobs)
            self.unsent_logprobs = []
        return chunk

    def _observe(self, event) -> list[dict]:
        """Take in one event; returns the stream chunks it makes."""
        match event:
            case Started(how=how):
                self.how = how
                self.queued_s = self.stream_.job.queued_s
            case Persisted():
                self.persisted = event
            case PrefillProgress():  # llama.cpp's prompt_progress chunks, when asked for
                if self.body.return_progress:
                    return [progress.progress_chunk(self._chunk(None), event)]
            case Logprobs(tokens=entries):
                self.logprobs.extend(entries)
                self.unsent_logprobs.extend(entries)
            case TextDelta(text=text):
                self.content.append(text)
                return [self._chunk({"content": text})] if text else []
            case ReasoningDelta(text=text):
                self.reasoning.append(text)
                return [self._chunk({"reasoning_content": text})] if text else []
            case ToolCallsEvent(calls=calls):
                self.tool_calls = calls
                deltas = [{"index": i, "id": c.get("id"), "type": "function",
                           "function": {"name": c["function"]["name"],
                                        "arguments": c["function"].get("arguments", "")}}
                          for i, c in enumerate(calls)]
                return [self._chunk({"tool_calls": deltas})]
            case Done():
                self.done = event
                self.rt.finished(event, session_id=self.body.session_id,
                                 persisted=self.persisted.ok if self.persisted else None, queued_s=self.queued_s)
                final = self._chunk({}, event.finish_reason, session_update=self.how, **self._persist_fields(),
                                    timings=openai.spl_timings(event.usage, event.timings, self.queued_s),
                                    done=dataclasses.asdict(event))
                _fix_finish(final["choices"][0], event)
                chunks = [final]
                if self.body.stream_options and self.body.stream_options.include_usage:
                    chunks.append(self._chunk(None, usage=openai.openai_usage(event.usage)))
                return chunks
        return []

    def _persist_fields(self) -> dict:
        return openai.persist_fields(self.persisted) if self.persisted is not None else {}

    async def stream(self, first):
        # The turn's first event is ``Started``: the first chunk says how the session took it.
        held = self._observe(first)
        yield self._chunk({"role": "assistant", "content": ""},
                          session_update=self.how)
        for chunk in held:
            yield chunk
        async for event in self._events(await self.stream_.next()):
            for chunk in self._observe(event):
                yield chunk

    async def collect(self, first):
        async for event in self._events(first):
            self._observe(event)
        done = self.done
        # The stored message is what a client should send back: it matches the transcript exactly.
        stored = done.message.get("content")
        text = stored if isinstance(stored, str) else "".join(self.content)
        body = openai.response_body(
            cid=self.cid, created=self.created, model=self.model, done=done, content=text,
            reasoning="".join(self.reasoning) or (done.reasoning or ""),
            tool_calls=self.tool_calls or done.message.get("tool_calls"), session_id=self.body.session_id,
            queued_s=self.queued_s, how=self.how)
        _fix_finish(body["choices"][0], done)
        if self.body.logprobs:
            body["choices"][0]["logprobs"] = chat_logprobs(self.logprobs)
        if self.persisted is None:
            return body
        body.update(self._persist_fields())
        return JSONResponse(body, headers={"X-Spl-Persisted": "true" if self.persisted.ok else "false"})


def _fix_finish(choice: dict, done: Done) -> None:
    """OpenAI clients know stop/length/tool_calls; ``stop_reason`` says what stopped it, as vLLM's
    does (the stop string or token id; null for an end token or a length), and holds spl's own
    reasons."""
    choice["stop_reason"] = done.stop_reason
    if done.finish_reason in ("repetition", "cancelled"):
        choice["stop_reason"] = done.finish_reason
        choice["finish_reason"] = "stop"
    elif done.finish_reason == "memory":  # the memory budget ended it: "length" for OpenAI clients
        choice["stop_reason"] = "memory_budget"
        choice["finish_reason"] = "length"
