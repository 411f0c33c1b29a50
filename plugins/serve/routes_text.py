"""Routes on plain text and tokens, as llama.cpp's and vLLM's servers have them: ``/tokenize``,
``/detokenize``, ``/v1/completions`` (``ChatService.complete`` on the worker); and ``/metrics``."""

from __future__ import annotations

import asyncio
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import Response

from superlinear.engine import Done, Logprobs, RepetitionConfig, TextDelta
from superlinear.service.logprobs import completion_logprobs

from . import bounds, sse
from . import chat as openai
from .routes_chat import END, next_event, watch_disconnect
from .runtime import Runtime
from .schemas import CompletionRequest, DetokenizeRequest, TokenizeRequest


def add_routes(app: FastAPI, rt: Runtime) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await bounds.parse_request(request, TokenizeRequest)
        source = body.text_or_messages()
        rt.require_ready()
        # a long text takes a while to tokenize: not on the event loop (nor the model's worker)
        return await asyncio.to_thread(rt.service.tokenize, source, add_special=body.special(),
                                       add_generation_prompt=body.add_generation_prompt,
                                       with_pieces=body.with_pieces)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        rt.require_ready()
        body = await bounds.parse_request(request, DetokenizeRequest, limit=bounds.ids_body_limit(rt))
        bounds.check_ids(rt, body.tokens, "tokens")
        text = await asyncio.to_thread(rt.service.detokenize, body.tokens)
        return {"content": text, "prompt": text}  # llama.cpp's and vLLM's names

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await bounds.parse_request(request, CompletionRequest)
        body.check_supported()
        rt.require_ready()
        rt.service.check_model(body.model)
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            await bounds.check_text(rt, len(prompt), "prompt")
        else:
            bounds.check_ids(rt, prompt, "prompt")
        echo = ""
        if body.echo:
            echo = prompt if isinstance(prompt, str) else await asyncio.to_thread(rt.service.detokenize, prompt)
        rt.stats["requests"] += 1
        job = rt.worker.submit(lambda j: _completion_job(rt, j, body, prompt), kind="generation", stream=True)
        watcher = asyncio.create_task(watch_disconnect(request, job))  # a client gone stops the job
        cid, created = "cmpl-" + secrets.token_hex(12), openai.now()
        try:
            first = await next_event(job)  # a bad prompt is a 400, before any response starts
        except BaseException:
            watcher.cancel()
            job.cancel()
            raise
        events = _events(job, first)
        if body.stream:
            watcher.cancel()  # the stream's own end (sse.response) cancels the job from here on
            return sse.response(_chunks(events, body, cid, created, rt.model_name, echo), on_close=job.cancel)
        try:
            text, done, prompt_logprobs, logprobs = [echo], None, [], []
            async for event in events:
                match event:
                    case TextDelta(text=piece):
                        text.append(piece)
                    case Logprobs(tokens=entries, prompt=True):
                        prompt_logprobs = entries
                    case Logprobs(tokens=entries):
                        logprobs.extend(entries)
                    case Done():
                        done = event
            answer = _chunk(cid, created, rt.model_name, "".join(text), _finish(done))
            if body.logprobs is not None:
                answer["choices"][0]["logprobs"] = completion_logprobs(logprobs, len(echo), prompt_logprobs)
            return {**answer, "usage": openai.openai_usage(done.usage),
                    "timings": openai.spl_timings(done.usage, done.timings, None)}
        finally:
            watcher.cancel()
            job.cancel()

    @app.get("/metrics")
    async def metrics():
        data, content_type = rt.metrics.render()
        return Response(data, media_type=content_type)


def _completion_job(rt: Runtime, job, body: CompletionRequest, prompt) -> None:
    """Runs on the worker: the completion's events to the job's queue, then ``END``."""
    sampling = body.sampling_params(rt.defaults, max_tokens=body.max_tokens, logprobs=body.logprobs)
    repetition = None
    if body.repetition_detection is True:
        repetition = RepetitionConfig()
    elif body.repetition_detection not in (None, False):
        repetition = RepetitionConfig(**body.repetition_detection.model_dump())
    rt.stats["generations"] += 1
    for event in rt.service.complete(prompt, sampling, repetition=repetition, echo=body.echo,
                                     cancel=job.cancel_event):
        if isinstance(event, Done):
            rt.note_prefill(event.usage, event.timings)
            rt.metrics.turn(event, session_id=None, queued_s=job.queued_s, persisted=None)
        job.emit(event)
    job.emit(END)


async def _events(job, first):
    event = first
    while event is not END:
        yield event
        event = await next_event(job)


def _finish(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _chunk(cid, created, model, text, finish=None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


async def _chunks(events, body: CompletionRequest, cid, created, model, echo):
    """The stream: the echoed prompt first (with its logprobs, when asked), then each piece of
    text with the logprobs of the tokens picked since the last chunk."""
    unsent: list = []  # generated tokens' logprobs, sent with the next chunk
    offset = 0  # text_offset: characters of the choice's text sent so far

    def chunk(text: str, finish=None, prompt: list | None = None) -> dict:
        nonlocal unsent, offset
        out = _chunk(cid, created, model, text, finish)
        if body.logprobs is not None and (unsent or prompt):
            out["choices"][0]["logprobs"] = completion_logprobs(unsent, offset, prompt or [])
            unsent = []
        offset += len(text)
        return out

    if echo and body.logprobs is None:  # with logprobs the echo waits for the prompt's logprobs
        yield chunk(echo)
    async for event in events:
        match event:
            case Logprobs(tokens=entries, prompt=True):
                yield chunk(echo, prompt=entries)
            case Logprobs(tokens=entries):
                unsent.extend(entries)
            case TextDelta(text=piece) if piece:
                yield chunk(piece)
            case Done():
                yield chunk("", _finish(event))
                if body.stream_options and body.stream_options.include_usage:
                    yield {**_chunk(cid, created, model, ""), "choices": [], "usage": openai.openai_usage(event.usage)}
