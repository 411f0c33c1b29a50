"""Routes on plain text and tokens, as llama.cpp's and vLLM's servers have them: ``/tokenize``,
``/detokenize``, ``/v1/completions``; and ``/metrics``."""

from __future__ import annotations

import asyncio
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from superlinear.engine import Done, TextDelta
from superlinear.errors import UserError

from . import chat as chatmod
from .runtime import Runtime
from .schemas import CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_body


def register_text_routes(app: FastAPI, rt: Runtime) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request):
        from superlinear.engine.tokens import pieces, tokenize_messages, tokenize_text

        from .app import read_body

        body = parse_body(await read_body(request), TokenizeRequest)
        source = body.text_or_messages()
        rt.require_ready()
        tok = rt.model.tokenizer

        def count():
            if isinstance(source, str):
                ids = tokenize_text(tok, source, body.special())
            else:
                ids = tokenize_messages(tok, source, body.add_generation_prompt)
            return ids, (pieces(tok, ids) if body.with_pieces else None)

        ids, parts = await asyncio.to_thread(count)  # a long text takes a while: not on the event loop
        out = {"tokens": ids, "count": len(ids), "max_model_len": rt.manager.max_seq_len_limit()}
        if parts is not None:
            out["pieces"] = parts
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        from superlinear.engine.tokens import check_ids, detokenize

        from .app import read_body

        body = parse_body(await read_body(request), DetokenizeRequest)
        rt.require_ready()
        tok = rt.model.tokenizer
        text = detokenize(tok, check_ids(tok, body.tokens))
        return {"content": text, "prompt": text}  # llama.cpp's and vLLM's names

    @app.post("/v1/completions")
    async def completions(request: Request):
        from superlinear.engine import prompt_ids

        from .app import read_body

        body = parse_body(await read_body(request), CompletionRequest)
        body.check_supported()
        rt.require_ready()
        prompt = body.single_prompt()
        ids = await asyncio.to_thread(prompt_ids, rt.model.tokenizer, prompt)
        echo = (prompt if isinstance(prompt, str) else rt.model.tokenizer.decode(ids)) if body.echo else ""
        rt.stats["requests"] += 1
        job = rt.worker.submit(lambda j: _completion_job(rt, j, body, ids), kind="generation", stream=True)
        cid, created = "cmpl-" + secrets.token_hex(12), chatmod.now()
        if body.stream:
            return StreamingResponse(_stream(rt, job, body, cid, created, echo), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, done = [echo], None
            async for event in _events(job):
                if isinstance(event, TextDelta):
                    text.append(event.text)
                elif isinstance(event, Done):
                    done = event
            return _body(cid, created, rt.model_name, "".join(text), done)
        finally:
            job.cancel()

    @app.get("/metrics")
    async def metrics():
        data, content_type = rt.metrics.render()
        return Response(data, media_type=content_type)


def _completion_job(rt: Runtime, job, body: CompletionRequest, ids: list[int]) -> None:
    from superlinear.engine import RepetitionConfig, SamplingParams, run_completion

    from .app import _END

    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = SamplingParams(
        temperature=body.temperature if body.temperature is not None else rt.defaults.get("temperature", 0.7),
        top_p=body.top_p if body.top_p is not None else 1.0, top_k=body.top_k or 0, seed=body.seed,
        max_tokens=body.max_tokens, stop=stop)
    repetition = None
    if body.repetition_detection is True:
        repetition = RepetitionConfig()
    elif body.repetition_detection not in (None, False):
        repetition = RepetitionConfig(**body.repetition_detection.model_dump())
    conv = rt.scratch_conversation()
    if len(ids) + (body.max_tokens or 16) > conv.max_seq_len:
        rt.grow_scratch()
    rt.stats["generations"] += 1
    for event in run_completion(conv, ids, sampling, repetition=repetition, cancel=job.cancel_event):
        if isinstance(event, Done):
            rt.metrics.turn(event, session_id=None, queued_s=None, persisted=None)
        job.emit(event)
    job.emit(_END)


async def _events(job):
    from .app import _END, _next_event

    while (event := await _next_event(job)) is not _END:
        yield event


def _finish(done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _body(cid, created, model, text, done) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(done)}],
            "usage": chatmod.openai_usage(done.usage),
            "timings": chatmod.spl_timings(done.usage, done.timings, None)}


def _chunk(cid, created, model, text, finish=None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


async def _stream(rt, job, body: CompletionRequest, cid, created, echo):
    model = rt.model_name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    try:
        if echo:
            yield chatmod.sse(_chunk(cid, created, model, echo))
        async for event in _events(job):
            if isinstance(event, TextDelta):
                if event.text:
                    yield chatmod.sse(_chunk(cid, created, model, event.text))
                continue
            yield chatmod.sse(_chunk(cid, created, model, "", _finish(event)))
            if include_usage:
                yield chatmod.sse({**_chunk(cid, created, model, ""), "choices": [],
                                   "usage": chatmod.openai_usage(event.usage)})
        yield chatmod.sse("[DONE]")
    except UserError as exc:
        yield chatmod.sse(exc.to_openai())
        yield chatmod.sse("[DONE]")
    finally:
        job.cancel()

