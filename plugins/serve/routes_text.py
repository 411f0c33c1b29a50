"""Routes on plain text and tokens, as llama.cpp's and vLLM's servers have them: ``/tokenize``,
``/detokenize``, ``/v1/completions`` (``LocalApi.submit_completion``, through the one generation
path of ``generation.py``); and ``/metrics``."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from superlinear.api.types import Completion
from superlinear.engine import Done, Logprobs, RepetitionConfig, TextDelta
from superlinear.service.logprobs import completion_logprobs

from . import bounds
from . import chat as openai
from .generation import JobStream, generate
from .http import MAX_BODY_BYTES
from .runtime import Runtime
from .schemas import MAX_MESSAGES, CompletionRequest, DetokenizeRequest, TokenizeRequest

LARGE_TOKENIZATION_CHARS = 256 << 10  # tokenized in milliseconds: no need to wait for a turn
TOKENIZE = bounds.declare(
    "POST", "/tokenize", body_bytes=bounds.TOKENIZE_BODY_BYTES,
    text=f"{bounds.MAX_TOKENIZE_CHARS:,} characters, and at most {bounds.TOKEN_LIMIT}",
    items=f"messages {MAX_MESSAGES:,}",
    reply=f"{bounds.TOKEN_LIMIT} token ids (and pieces); one large tokenization at a time", body=TokenizeRequest)
DETOKENIZE = bounds.declare(
    "POST", "/detokenize", body_bytes=f"{bounds.ID_JSON_BYTES} per id of {bounds.TOKEN_LIMIT}",
    items=f"tokens: {bounds.TOKEN_LIMIT}", reply="the text of those ids", body=DetokenizeRequest)
COMPLETIONS = bounds.declare(
    "POST", "/v1/completions", body_bytes=MAX_BODY_BYTES,
    text=f"prompt: at most {bounds.TOKEN_LIMIT}", items=f"prompt ids: {bounds.TOKEN_LIMIT}; " + bounds.SAMPLING_ITEMS,
    reply="one choice of at most max_tokens tokens", body=CompletionRequest)
METRICS = bounds.declare("GET", "/metrics", body_bytes=0, depth=None, reply="Prometheus text, one series per route")


def add_routes(app: FastAPI, rt: Runtime) -> None:
    # A tokenization holds many times its text in memory while it runs: large ones take turns.
    large_tokenization = asyncio.Semaphore(1)

    @app.post(TOKENIZE.path)
    async def tokenize(request: Request):
        body = await bounds.parse_request(request, TokenizeRequest, limit=bounds.TOKENIZE_BODY_BYTES)
        source = body.text_or_messages()
        rt.require_ready()
        chars = bounds.string_chars(source) if isinstance(source, list) else len(source)
        param = "messages" if isinstance(source, list) else "content" if body.content is not None else "prompt"
        bounds.check_chars(chars, bounds.MAX_TOKENIZE_CHARS, param)
        await bounds.check_text(rt, chars, param, messages=len(source) if isinstance(source, list) else 0)

        def run():  # not on the event loop (nor the model's worker)
            tokens = rt.api.tokenize(source, add_special=body.special(),
                                     add_generation_prompt=body.add_generation_prompt, with_pieces=body.with_pieces)
            bounds.check_ids(rt, tokens["tokens"], "tokens")  # the reply's bound: what fits a conversation
            return tokens

        if chars < LARGE_TOKENIZATION_CHARS:
            return await bounds.json_reply(await asyncio.to_thread(run))
        async with large_tokenization:
            return await bounds.json_reply(await asyncio.to_thread(run))

    @app.post(DETOKENIZE.path)
    async def detokenize(request: Request):
        rt.require_ready()
        body = await bounds.parse_request(request, DetokenizeRequest, limit=bounds.ids_body_limit(rt))
        bounds.check_ids(rt, body.tokens, "tokens")
        text = await asyncio.to_thread(rt.api.detokenize, body.tokens)
        return await bounds.json_reply({"content": text, "prompt": text})  # llama.cpp's and vLLM's names

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
        stream = JobStream(rt.api.submit_completion, completion_request(body, prompt, rt.defaults))
        reply = CompletionReply(rt, body, stream, echo)
        return await generate(request, stream, streamed=body.stream, chunks=reply.stream, collect=reply.collect)

    @app.get(METRICS.path, response_class=PlainTextResponse)  # documented as text/plain
    async def metrics():
        data, content_type = rt.metrics.render()
        return Response(data, media_type=content_type)


def completion_request(body: CompletionRequest, prompt, defaults: dict) -> Completion:
    sampling = body.sampling_params(defaults, max_tokens=body.token_limit(body.max_tokens), logprobs=body.logprobs)
    repetition = None
    if body.repetition_detection is True:
        repetition = RepetitionConfig()
    elif body.repetition_detection not in (None, False):
        repetition = RepetitionConfig(**body.repetition_detection.model_dump())
    return Completion(prompt, sampling, repetition, echo=body.echo)


class CompletionReply:
    """One text completion being answered, streamed (``stream``) or whole (``collect``); with
    ``logprobs``, each chunk carries the logprobs of the tokens picked since the last one, and
    the echoed prompt waits for the prompt's own. The chunk of the echoed prompt says
    ``"echo": true`` (spl's: the remote API tells the prompt from generated text by it)."""

    def __init__(self, rt: Runtime, body: CompletionRequest, stream: JobStream, echo: str):
        self.rt, self.body, self.stream_, self.echo = rt, body, stream, echo
        self.cid, self.created = "cmpl-" + secrets.token_hex(12), openai.now()
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
                    timings = openai.spl_timings(event.usage, event.timings, self.stream_.job.queued_s)
                    final = self._chunk("", _finish(event), done=dataclasses.asdict(event), timings=timings)
                    final["choices"][0]["stop_reason"] = event.stop_reason
                    yield final
                    if self.body.stream_options and self.body.stream_options.include_usage:
                        yield {**self._base(None), "usage": openai.openai_usage(event.usage)}

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
        return {**answer, "usage": openai.openai_usage(done.usage),
                "timings": openai.spl_timings(done.usage, done.timings, self.stream_.job.queued_s)}


def _finish(done: Done) -> str:
    return "length" if done.finish_reason in ("length", "memory") else "stop"
