"""Routes on plain text and tokens, as llama.cpp's and vLLM's servers have them: ``/tokenize``,
``/detokenize``, ``/v1/completions`` (``LocalApi.submit_completion``, through the one generation
path of ``generation.py``); and ``/metrics``."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import Response

from superlinear.api.types import Completion
from superlinear.engine import Done, RepetitionConfig, SamplingParams, TextDelta

from . import chat as openai
from .generation import JobStream, generate
from .http import read_body
from .runtime import Runtime
from .schemas import CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_body


def add_routes(app: FastAPI, rt: Runtime) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse_body(await read_body(request), TokenizeRequest)
        source = body.text_or_messages()
        rt.require_ready()
        # a long text takes a while to tokenize: not on the event loop (nor the model's worker)
        return await asyncio.to_thread(rt.api.tokenize, source, add_special=body.special(),
                                       add_generation_prompt=body.add_generation_prompt,
                                       with_pieces=body.with_pieces)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse_body(await read_body(request), DetokenizeRequest)
        rt.require_ready()
        text = rt.api.detokenize(body.tokens)
        return {"content": text, "prompt": text}  # llama.cpp's and vLLM's names

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await read_body(request), CompletionRequest)
        body.check_supported()
        rt.require_ready()
        prompt = body.single_prompt()
        echo = ""
        if body.echo:
            echo = prompt if isinstance(prompt, str) else rt.api.detokenize(prompt)
        rt.stats["requests"] += 1
        stream = JobStream(rt.api.submit_completion, completion_request(body, prompt, rt.defaults))
        reply = CompletionReply(rt, body, stream, echo)
        return await generate(request, stream, streamed=body.stream, chunks=reply.stream, collect=reply.collect)

    @app.get("/metrics")
    async def metrics():
        data, content_type = rt.metrics.render()
        return Response(data, media_type=content_type)


def completion_request(body: CompletionRequest, prompt, defaults: dict) -> Completion:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = SamplingParams(
        temperature=body.temperature if body.temperature is not None else defaults.get("temperature", 0.7),
        top_p=body.top_p if body.top_p is not None else 1.0, top_k=body.top_k or 0, seed=body.seed,
        max_tokens=body.max_tokens, stop=stop)
    repetition = None
    if body.repetition_detection is True:
        repetition = RepetitionConfig()
    elif body.repetition_detection not in (None, False):
        repetition = RepetitionConfig(**body.repetition_detection.model_dump())
    return Completion(prompt, sampling, repetition)


class CompletionReply:
    """One text completion being answered, streamed (``stream``) or whole (``collect``)."""

    def __init__(self, rt: Runtime, body: CompletionRequest, stream: JobStream, echo: str):
        self.rt, self.body, self.stream_, self.echo = rt, body, stream, echo
        self.cid, self.created = "cmpl-" + secrets.token_hex(12), openai.now()

    def _chunk(self, text: str, finish: str | None = None, **extra) -> dict:
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.rt.model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}

    def _done(self, done: Done) -> None:
        self.rt.finished(done, session_id=None, persisted=None, queued_s=self.stream_.job.queued_s)

    async def stream(self, first):
        if self.echo:
            yield self._chunk(self.echo)
        async for event in self.stream_.events(first):
            match event:
                case TextDelta(text=piece) if piece:
                    yield self._chunk(piece)
                case Done():
                    self._done(event)
                    yield self._chunk("", _finish(event), done=dataclasses.asdict(event))
                    if self.body.stream_options and self.body.stream_options.include_usage:
                        yield {**self._chunk(""), "choices": [], "usage": openai.openai_usage(event.usage)}

    async def collect(self, first):
        text, done = [self.echo], None
        async for event in self.stream_.events(first):
            match event:
                case TextDelta(text=piece):
                    text.append(piece)
                case Done():
                    done = event
                    self._done(event)
        return {**self._chunk("".join(text), _finish(done)), "usage": openai.openai_usage(done.usage),
                "timings": openai.spl_timings(done.usage, done.timings, None)}


def _finish(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"
