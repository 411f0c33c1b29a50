"""POST /v1/chat/completions and /v1/completions: OpenAI's shapes over the one API.

Both are thin adapters. The body (``schemas.py``) becomes the engine's request; the job runs on
the API's worker (``LocalApi.submit_chat`` / ``submit_completion``); its events come back to the
event loop through ``JobStream`` and ``generate`` answers with them, whole or as server-sent
events. One ``Reply`` per route folds the events into OpenAI's answer, and both its stream and
its whole answer read the same events. A generation nobody reads any more stops within a step.

A stream is JSON chunks, then ``data: [DONE]``. An error after the stream has started cannot
change its status: it goes into the stream as an OpenAI error body, then ``[DONE]``. Long
prefills follow llama.cpp's server: ``"return_progress": true`` gets ``prompt_progress: {total,
cache, processed, time_ms}`` chunks while the prompt is prefilled, and every stream gets a
``: keep-alive`` comment after ``sse_ping_interval`` seconds of silence (``DEFAULT_PING_S``;
``<= 0``: none), so no proxy cuts a prefill that is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from superlinear.api.worker import JobCancelled
from superlinear.engine import PrefillProgress
from superlinear.errors import UserError
from superlinear.service import ChatTurn, Done, Logprobs, Persisted, ReasoningDelta, Started, TextDelta, ToolCallsEvent
from superlinear.service.logprobs import chat_logprobs, completion_logprobs

from . import bounds
from .http import MAX_BODY_BYTES, internal_error_body
from .runtime import Runtime
from .schemas import MAX_MESSAGES, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("spl.serve")
CHAT = bounds.declare(
    "POST", "/v1/chat/completions", body_bytes=MAX_BODY_BYTES,
    text=f"every string of messages, tools and tool_choice: at most {bounds.TOKEN_LIMIT}, each message the "
         "template's own tokens at least, each tool one",
    items=f"messages {MAX_MESSAGES:,}; " + bounds.SAMPLING_ITEMS,
    reply="one choice of at most max_tokens tokens", body=ChatCompletionRequest)
COMPLETIONS = bounds.declare(
    "POST", "/v1/completions", body_bytes=MAX_BODY_BYTES,
    text=f"prompt: at most {bounds.TOKEN_LIMIT}", items=f"prompt ids: {bounds.TOKEN_LIMIT}; " + bounds.SAMPLING_ITEMS,
    reply="one choice of at most max_tokens tokens", body=CompletionRequest)
DEFAULT_PING_S = 5.0  # well under the 30-60 s idle limits of common proxies and load balancers
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_END = object()  # a job's last item: the generation is over


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
        turn = ChatTurn(body.engine_request(messages, rt.defaults), session_id=body.session_id,
                        session_mode=body.session_mode)
        stream = JobStream(rt.api.submit_chat, turn)
        reply = ChatReply(rt, body, stream)
        return await generate(request, stream, streamed=body.stream, chunks=reply.stream, collect=reply.collect,
                              ping_s=ping_interval(body.sse_ping_interval))

    @app.post(COMPLETIONS.path)
    async def completions(request: Request):
        body = await bounds.parse_request(request, CompletionRequest, lenient=rt.options.lenient_fields)
        body.check_supported()
        rt.require_ready()
        rt.api.get_model(body.model)  # NotFound unless it names the model served
        bounds.check_sampling(body)
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            await bounds.check_text(rt, len(prompt), "prompt")
        else:
            bounds.check_ids(rt, prompt, "prompt")
        echo = ""
        if body.echo:
            echo = prompt if isinstance(prompt, str) else await asyncio.to_thread(rt.api.detokenize, prompt)
        rt.stats["requests"] += 1
        stream = JobStream(rt.api.submit_completion, body.engine_request(prompt, rt.defaults))
        reply = CompletionReply(rt, body, stream, echo)
        return await generate(request, stream, streamed=body.stream, chunks=reply.stream, collect=reply.collect)


# -- the answers' shared parts ---------------------------------------------------------------------
def openai_usage(usage: dict) -> dict:
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(usage.get("total_tokens", prompt + completion)),
        "prompt_tokens_details": {"cached_tokens": int(usage.get("cached_tokens", 0))},
        "completion_tokens_details": {"reasoning_tokens": int(usage.get("reasoning_tokens", 0))},
    }


def spl_timings(done: Done, queued_s: float | None) -> dict:
    """spl's ``timings`` block: the engine's, with the prefilled and reused tokens and the queue time."""
    t = dict(done.timings)
    t.setdefault("prefill_tokens", done.usage.get("prefill_tokens"))
    t["tokens_reused"] = int(done.usage.get("cached_tokens", 0))
    if queued_s is not None:
        t["queued_s"] = round(queued_s, 4)
    return t


def chunk(cid: str, created: int, model: str, delta: dict | None = None, finish_reason: str | None = None,
          **extra) -> dict:
    """A ``chat.completion.chunk``: one choice with ``delta``, none when it is None."""
    body: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": None}],
    }
    body.update(extra)
    return body


def progress_chunk(base: dict[str, Any], event: PrefillProgress) -> dict[str, Any]:
    """A chunk (``base``: id, object, created, model and spl's extras) that carries the prefill's
    progress as llama.cpp sends it: an empty assistant delta (``content`` null, so OpenAI clients
    add no text) and ``prompt_progress`` at the top level."""
    return {**base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": None},
                         "finish_reason": None, "logprobs": None}],
            "prompt_progress": {"total": int(event.total), "cache": int(event.cached),
                                "processed": int(event.done), "time_ms": int(event.elapsed_s * 1000)}}


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


# -- the chat's answer -----------------------------------------------------------------------------
class ChatReply:
    """One chat completion being answered: the turn's events folded into what the answer says.
    ``stream`` and ``collect`` read the same events through ``_observe``."""

    def __init__(self, rt: Runtime, body: ChatCompletionRequest, stream: JobStream):
        self.rt, self.model, self.body, self.stream_ = rt, rt.model_name, body, stream
        self.cid, self.created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
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
        out = chunk(self.cid, self.created, self.model, delta, finish_reason, **fields, **self.extra)
        if self.unsent_logprobs and delta is not None:
            out["choices"][0]["logprobs"] = chat_logprobs(self.unsent_logprobs)
            self.unsent_logprobs = []
        return out

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
                    return [progress_chunk(self._chunk(None), event)]
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
                                    timings=spl_timings(event, self.queued_s), done=dataclasses.asdict(event))
                _fix_finish(final["choices"][0], event)
                chunks = [final]
                if self.body.stream_options and self.body.stream_options.include_usage:
                    chunks.append(self._chunk(None, usage=openai_usage(event.usage)))
                return chunks
        return []

    def _persist_fields(self) -> dict:
        """What a session turn's answer says about durability: ``persisted`` (the session's state
        with this turn is on disk: a crash or restart keeps it) and, when writing it failed,
        ``persist_error`` (an OpenAI-style error object; the turn itself stands)."""
        if self.persisted is None:
            return {}
        fields: dict[str, Any] = {"persisted": self.persisted.ok}
        if self.persisted.error is not None:
            fields["persist_error"] = self.persisted.error.to_openai()["error"]
        return fields

    async def stream(self, first):
        # The turn's first event is ``Started``: the first chunk says how the session took it.
        held = self._observe(first)
        yield self._chunk({"role": "assistant", "content": ""}, session_update=self.how)
        for part in held:
            yield part
        async for event in self._events(await self.stream_.next()):
            for part in self._observe(event):
                yield part

    async def collect(self, first):
        async for event in self._events(first):
            self._observe(event)
        done = self.done
        # The stored message is what a client should send back: it matches the transcript exactly.
        stored = done.message.get("content")
        content = stored if isinstance(stored, str) else "".join(self.content)
        reasoning = "".join(self.reasoning) or (done.reasoning or "")
        tool_calls = self.tool_calls or done.message.get("tool_calls")
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not tool_calls else None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason,
                  "logprobs": chat_logprobs(self.logprobs) if self.body.logprobs else None}
        _fix_finish(choice, done)
        body: dict[str, Any] = {
            "id": self.cid, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [choice], "usage": openai_usage(done.usage), "timings": spl_timings(done, self.queued_s),
            "system_fingerprint": None}
        if self.body.session_id:
            body["session_id"] = self.body.session_id
            body["session_update"] = self.how
        if self.persisted is None:
            return body
        body.update(self._persist_fields())
        return JSONResponse(body, headers={"X-Spl-Persisted": "true" if self.persisted.ok else "false"})


# -- a plain completion's answer -------------------------------------------------------------------
class CompletionReply:
    """One text completion being answered, streamed (``stream``) or whole (``collect``); with
    ``logprobs``, each chunk carries the logprobs of the tokens picked since the last one, and
    the echoed prompt waits for the prompt's own. The chunk of the echoed prompt says
    ``"echo": true`` (spl's: the remote API tells the prompt from generated text by it)."""

    def __init__(self, rt: Runtime, body: CompletionRequest, stream: JobStream, echo: str):
        self.rt, self.body, self.stream_, self.echo = rt, body, stream, echo
        self.cid, self.created = "cmpl-" + secrets.token_hex(12), int(time.time())
        self.unsent: list = []  # generated tokens' logprobs, sent with the next chunk
        self.offset = 0  # text_offset: characters of the choice's text sent so far

    def _base(self, text: str | None, finish: str | None = None) -> dict:
        """A ``text_completion`` object: one choice of ``text``, none when it is None."""
        choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.rt.model_name,
                "choices": choices}

    def _chunk(self, text: str, finish: str | None = None, prompt: list | None = None, **extra) -> dict:
        out = {**self._base(text, finish), **extra}
        if self.body.logprobs is not None and (self.unsent or prompt):
            out["choices"][0]["logprobs"] = completion_logprobs(self.unsent, self.offset, prompt or [])
            self.unsent = []
        self.offset += len(text)
        return out

    def _done(self, done: Done) -> None:
        self.rt.finished(done, session_id=None, persisted=None, queued_s=self.stream_.job.queued_s)

    async def stream(self, first):
        if self.echo and self.body.logprobs is None:  # with logprobs the echo waits for the prompt's
            yield self._chunk(self.echo, echo=True)
        async for event in self.stream_.events(first):
            match event:
                case Logprobs(tokens=entries, prompt=True):
                    yield self._chunk(self.echo, prompt=entries, echo=True)
                case Logprobs(tokens=entries):
                    self.unsent.extend(entries)
                case TextDelta(text=piece) if piece:
                    yield self._chunk(piece)
                case Done():
                    self._done(event)
                    final = self._chunk("", _finish(event), done=dataclasses.asdict(event),
                                        timings=spl_timings(event, self.stream_.job.queued_s))
                    final["choices"][0]["stop_reason"] = event.stop_reason
                    yield final
                    if self.body.stream_options and self.body.stream_options.include_usage:
                        yield {**self._base(None), "usage": openai_usage(event.usage)}

    async def collect(self, first):
        text, done, prompt_logprobs, logprobs = [self.echo], None, [], []
        async for event in self.stream_.events(first):
            match event:
                case TextDelta(text=piece):
                    text.append(piece)
                case Logprobs(tokens=entries, prompt=True):
                    prompt_logprobs = entries
                case Logprobs(tokens=entries):
                    logprobs.extend(entries)
                case Done():
                    done = event
                    self._done(event)
        answer = self._base("".join(text), _finish(done))
        answer["choices"][0]["stop_reason"] = done.stop_reason
        if self.body.logprobs is not None:
            answer["choices"][0]["logprobs"] = completion_logprobs(logprobs, len(self.echo), prompt_logprobs)
        return {**answer, "usage": openai_usage(done.usage), "timings": spl_timings(done, self.stream_.job.queued_s)}


def _finish(done: Done) -> str:
    return "length" if done.finish_reason in ("length", "memory") else "stop"


# -- the one generation path -----------------------------------------------------------------------
class ClientGone(UserError):
    """The client disconnected (nginx's 499): nobody reads this answer."""

    http_status = 499
    code = "client_closed_request"


class JobStream:
    """A worker job's events on the event loop: ``submit(request, emit)`` queues the job (a
    ``LocalApi.submit_*``), ``next()`` awaits its next event (``_END`` when it is over; an error
    raised on the worker is raised here)."""

    def __init__(self, submit, request):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(self.queue.put_nowait, item)

        self.job = submit(request, put)
        self.job.future.add_done_callback(lambda _f: put(_END))  # after every event: same thread

    async def next(self):
        item = await self.queue.get()
        if item is _END:
            exc = self.job.future.exception()
            if isinstance(exc, JobCancelled):
                raise ClientGone("the client went away before its generation started") from exc
            if exc is not None:
                raise exc
        return item

    async def events(self, first) -> AsyncIterator:
        event = first
        while event is not _END:
            yield event
            event = await self.next()


async def generate(request: Request, stream: JobStream, *, streamed: bool,
                   chunks: Callable[[object], AsyncIterator[dict]], collect: Callable[[object], Awaitable],
                   ping_s: float | None = DEFAULT_PING_S):
    """Answer a generation. Nothing is sent before its first event: what fails before (a prompt
    too long, the memory budget, a bad template) gets its own HTTP status."""
    watcher = asyncio.create_task(_watch_disconnect(request, stream.job))
    try:
        first = await stream.next()
    except BaseException:
        watcher.cancel()
        stream.job.cancel()
        raise
    if streamed:  # the stream's end tells: sse_response's on_close cancels the job
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        return sse_response(chunks(first), on_close=stream.job.cancel, ping_s=ping_s)
    try:
        return await collect(first)
    finally:
        watcher.cancel()
        stream.job.cancel()  # no-op when finished; stops the generation if this task was cancelled


async def _watch_disconnect(request: Request, job) -> None:
    """Cancel ``job`` when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


# -- server-sent events ----------------------------------------------------------------------------
def ping_interval(requested: float | None) -> float | None:
    """The keep-alive interval of a request: its ``sse_ping_interval``, else the default;
    ``None`` when it turned them off."""
    interval = DEFAULT_PING_S if requested is None else float(requested)
    return interval if interval > 0 else None


def frame(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def sse_response(chunks: AsyncIterator[dict], on_close: Callable[[], None],
                 ping_s: float | None = DEFAULT_PING_S) -> StreamingResponse:
    """Stream ``chunks`` as SSE. ``on_close`` runs however the stream ends (finished, failed, or
    the client went away), e.g. to stop the work that feeds it."""

    async def body():
        try:
            async for part in chunks:
                yield frame(part)
            yield frame("[DONE]")
        except UserError as exc:
            yield frame(exc.to_openai())
            yield frame("[DONE]")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug mid-stream: report it in the stream
            log.exception("spl: error while streaming")
            yield frame(internal_error_body(exc))
            yield frame("[DONE]")
        finally:
            on_close()

    return StreamingResponse(with_keepalive(body(), ping_s), media_type="text/event-stream", headers=SSE_HEADERS)


async def _next(it: AsyncIterator[bytes]) -> bytes:
    return await anext(it)


async def with_keepalive(stream: AsyncIterator[bytes], interval: float | None) -> AsyncIterator[bytes]:
    """``stream``'s parts, with ``KEEPALIVE`` whenever it stays silent ``interval`` seconds.

    The pending read is never cancelled by a ping (the stream does not notice them); when the
    consumer goes away, it is cancelled and the stream closed, so its own cleanup runs."""
    if interval is None:
        async for part in stream:
            yield part
        return
    it = aiter(stream)
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(it))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            try:
                part = pending.result()
            except StopAsyncIteration:
                pending = None
                return
            pending = None
            yield part
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
