"""Routes on plain text and tokens, as llama.cpp's and vLLM's servers have them: ``/tokenize``
and ``/detokenize``; and ``/metrics``. (``/v1/completions`` is an OpenAI route: ``routes_chat.py``.)"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from . import bounds
from .runtime import Runtime
from .schemas import MAX_MESSAGES, DetokenizeRequest, TokenizeRequest

LARGE_TOKENIZATION_CHARS = 256 << 10  # tokenized in milliseconds: no need to wait for a turn
TOKENIZE = bounds.declare(
    "POST", "/tokenize", body_bytes=bounds.TOKENIZE_BODY_BYTES,
    text=f"{bounds.MAX_TOKENIZE_CHARS:,} characters, and at most {bounds.TOKEN_LIMIT}",
    items=f"messages {MAX_MESSAGES:,}",
    reply=f"{bounds.TOKEN_LIMIT} token ids (and pieces); one large tokenization at a time", body=TokenizeRequest)
DETOKENIZE = bounds.declare(
    "POST", "/detokenize", body_bytes=f"{bounds.ID_JSON_BYTES} per id of {bounds.TOKEN_LIMIT}",
    items=f"tokens: {bounds.TOKEN_LIMIT}", reply="the text of those ids", body=DetokenizeRequest)
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

    @app.get(METRICS.path, response_class=PlainTextResponse)  # documented as text/plain
    async def metrics():
        data, content_type = rt.metrics.render()
        return Response(data, media_type=content_type)
