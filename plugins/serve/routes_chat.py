"""POST /v1/chat/completions: the turn runs on the worker (``ChatService.chat``), its events
come back through the job's queue and are folded by one ``Reply``, streamed or not."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from superlinear.engine import PrefillProgress
from superlinear.errors import UserError
from superlinear.service import ChatTurn, Done, Logprobs, Persisted, ReasoningDelta, Started, TextDelta, ToolCallsEvent
from superlinear.service.logprobs import chat_logprobs

from . import bounds, progress, sse
from . import chat as openai
from .runtime import Runtime
from .schemas import ChatCompletionRequest
from .worker import JobCancelled

END = object()  # the job's last item: the turn is over


class ClientGone(UserError):
    """The client disconnected (nginx's 499): nobody reads this answer."""

    http_status = 499
    code = "client_closed_request"


def add_routes(app: FastAPI, rt: Runtime) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await bounds.parse_request(request, ChatCompletionRequest)
        body.check_supported()
        if body.session_id is not None:
            from superlinear.sessions import validate_id

            validate_id(body.session_id, "session id", param="session_id")
        rt.require_ready()
        rt.service.check_model(body.model)
        messages = body.plain_messages()
        await bounds.check_text(rt, sum(len(m["content"]) for m in messages), "messages")
        rt.stats["requests"] += 1
        turn = ChatTurn(openai.engine_request(body, messages, rt.defaults),
                        session_id=body.session_id, session_mode=body.session_mode)
        job = rt.worker.submit(lambda j: _chat_job(rt, j, turn), kind="generation", stream=True)
        watcher = asyncio.create_task(watch_disconnect(request, job))
        reply = Reply(rt.model_name, body, job)
        try:
            # The response starts once the prompt passed every check: what fails before (a
            # prompt too long, the memory budget, the template) gets its own HTTP status.
            first = await next_event(job)
        except BaseException:
            watcher.cancel()
            job.cancel()
            raise
        if body.stream:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            return sse.response(reply.stream(first), on_close=job.cancel,
                                ping_s=progress.ping_interval(body.sse_ping_interval))
        try:
            return await reply.collect(first)
        finally:
            watcher.cancel()
            job.cancel()  # no-op when finished; stops the turn if this task was cancelled



def _chat_job(rt: Runtime, job, turn: ChatTurn) -> None:
    """Runs on the worker: every event of the turn goes to the job's queue, then ``END``."""
    if job.cancelled():
        raise JobCancelled("client went away")
    rt.stats["generations"] += 1
    persisted = None
    for event in rt.service.chat(turn, cancel=job.cancel_event, on_start=job.emit):
        match event:
            case Persisted(ok=ok):
                persisted = ok
            case Done():
                rt.note_prefill(event.usage, event.timings)
                rt.metrics.turn(event, session_id=turn.session_id, persisted=persisted,
                                queued_s=job.queued_s)
        job.emit(event)
    job.emit(END)


async def watch_disconnect(request: Request, job) -> None:
    """Cancel ``job`` when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def next_event(job):
    """The job's next event; an exception raised on the worker is raised here."""
    get = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({get, job.future}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    # The job finished: drain what it emitted before it ended, then its result or error.
    if not job.events.empty():
        get.cancel()
        return job.events.get_nowait()
    get.cancel()
    exc = job.future.exception()
    if exc is not None:
        if isinstance(exc, JobCancelled):
            raise ClientGone("the client went away before its turn started") from exc
        raise exc
    return END


class Reply:
    """One chat completion being answered: the turn's events folded into what the answer says.
    ``stream`` and ``collect`` read the same events through ``_observe``."""

    def __init__(self, model: str, body: ChatCompletionRequest, job):
        self.model, self.body, self.job = model, body, job
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
        event = first
        while event is not END:
            yield event
            event = await next_event(self.job)
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
                self.queued_s = self.job.queued_s
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
                final = self._chunk({}, event.finish_reason, session_update=self.how, **self._persist_fields(),
                                    timings=openai.spl_timings(event.usage, event.timings, self.queued_s))
                _fix_finish(final["choices"][0], event)
                chunks = [final]
                if self.body.stream_options and self.body.stream_options.include_usage:
                    chunks.append(self._chunk(None, usage=openai.openai_usage(event.usage)))
                return chunks
        return []

    def _persist_fields(self) -> dict:
        return openai.persist_fields(self.persisted) if self.persisted is not None else {}

    async def stream(self, first):
        yield self._chunk({"role": "assistant", "content": ""})
        async for event in self._events(first):
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
    """OpenAI clients know stop/length/tool_calls; spl's own reasons go to ``stop_reason``."""
    if done.finish_reason in ("repetition", "cancelled"):
        choice["stop_reason"] = done.finish_reason
        choice["finish_reason"] = "stop"
    elif done.finish_reason == "memory":  # the memory budget ended it: "length" for OpenAI clients
        choice["stop_reason"] = "memory_budget"
        choice["finish_reason"] = "length"
