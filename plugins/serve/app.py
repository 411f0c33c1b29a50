"""The FastAPI application: routes, errors in OpenAI's shape, auth, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import tempfile
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from superlinear.errors import Conflict, InvalidRequest, NotFound, TooLarge, Unauthorized, UserError
from superlinear.sessions.snapshots import SESSION_STATE_TAG, UPLOAD_NAME

from . import chat as chatmod
from . import progress as progressmod
from .runtime import Runtime
from .schemas import (
    ChatCompletionRequest,
    CreateSession,
    ForkSession,
    LoadSnapshot,
    PatchSnapshot,
    ResizeSession,
    RollbackSession,
    SaveSession,
    parse_body,
)
from .worker import JobCancelled

log = logging.getLogger("spl.serve")

MAX_BODY_BYTES = int(os.environ.get("SPL_MAX_BODY_BYTES", 256 << 20))  # ~50M tokens of text
MAX_IMPORT_BYTES = int(os.environ.get("SPL_MAX_IMPORT_BYTES", 1 << 40))
_END = object()


def error_response(exc: UserError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.http_status in (429, 503) else None
    return JSONResponse(exc.to_openai(), status_code=exc.http_status, headers=headers)


def _bug_response(exc: BaseException) -> JSONResponse:
    """The answer to an exception no route turned into a ``UserError``: a disk that is full or
    read-only is the storage's state (503), anything else a bug (500, logged with its traceback)."""
    from superlinear.sessions.snapshots import DISK_ERRNOS, disk_error

    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        log.error("spl: storage error: %s", exc)
        return error_response(disk_error("the server cannot write its files", exc))
    log.exception("spl: internal error: %s", exc)
    body = {"error": {"message": f"internal error: {type(exc).__name__}: {exc}".splitlines()[0],
                      "type": "server_error", "param": None, "code": "internal_error"}}
    return JSONResponse(body, status_code=500)


class GuardMiddleware:
    """Pure ASGI (streaming and disconnects pass through untouched): API key on /v1 routes,
    body-size limit from Content-Length, and any uncaught exception answered as a 500 body."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and (path == "/v1" or path.startswith("/v1/")):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                msg = ("missing API key: send `Authorization: Bearer KEY`" if not auth
                       else "invalid API key")
                return await error_response(Unauthorized(msg))(scope, receive, send)
        length = headers.get("content-length")
        limit = MAX_IMPORT_BYTES if path == "/v1/snapshots/import" else MAX_BODY_BYTES
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await error_response(InvalidRequest("bad Content-Length"))(scope, receive, send)
            if too_big:
                return await error_response(
                    TooLarge(f"request body is {length} bytes; the limit is {limit}", code="body_too_large")
                )(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: still an OpenAI body
            if started:
                raise
            await _bug_response(exc)(scope, receive, send)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(part)
    return b"".join(chunks)


async def _watch_disconnect(request: Request, job) -> None:
    """Cancel ``job`` when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def create_app(runtime: Runtime) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start_loading()
        yield
        await asyncio.to_thread(runtime.shutdown)

    app = FastAPI(title="spl", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.add_middleware(GuardMiddleware, api_key=runtime.options.api_key)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query"))
        return error_response(InvalidRequest(f"{loc or 'request'}: {first.get('msg', 'invalid')}",
                                             param=loc or None, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err: UserError = NotFound(f"no route {request.method} {request.url.path}", code="unknown_route")
        elif exc.status_code == 405:
            err = InvalidRequest(f"method {request.method} is not allowed on {request.url.path}",
                                 code="method_not_allowed")
            resp = error_response(err)
            resp.status_code = 405
            return resp
        else:
            err = UserError(str(exc.detail))
            err.http_status = exc.status_code
        return error_response(err)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return _bug_response(exc)

    register_routes(app, runtime)
    from superlinear.pluginloader import collect

    for plugin, args, kwargs in collect("register_routes"):
        try:
            app.include_router(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the server down
            log.warning("spl: plugin %r: routes skipped: %s", plugin, exc)
    return app


def _version() -> str:
    from superlinear import __version__

    return __version__


def register_routes(app: FastAPI, rt: Runtime) -> None:  # noqa: C901 - one place lists every route
    worker = rt.worker

    # -- health and models ----------------------------------------------------------------
    @app.get("/health")
    async def health():
        # Readiness probes and load balancers read the status code: 200 only once the model is
        # loaded and the server takes requests; 503 (same body) while loading, failed or stopping.
        body = rt.health()
        if body["status"] == "ok":
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get("/v1/models")
    async def models():
        rt.require_ready()
        return {"object": "list", "data": [_model_card(rt)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        rt.require_ready()
        card = _model_card(rt)
        if model_id not in (card["id"], "default", rt.options.model):
            raise NotFound(f"no model {model_id!r}; this server serves {card['id']!r}", param="model")
        return card

    # -- chat -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await read_body(request), ChatCompletionRequest)
        body.check_supported()
        if body.session_id is not None:
            from superlinear.sessions import validate_id

            validate_id(body.session_id, "session id", param="session_id")
        rt.require_ready()
        rt.stats["requests"] += 1
        messages = body.plain_messages()
        job = worker.submit(lambda j: _chat_job(rt, j, body, messages), kind="generation", stream=True)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        cid, created = chatmod.completion_id(), chatmod.now()
        try:
            first = await _next_event(job)
        except BaseException:
            watcher.cancel()
            job.cancel()
            raise
        if body.stream:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            return StreamingResponse(
                progressmod.with_keepalive(_stream(rt, job, body, first, cid, created),
                                           progressmod.ping_interval(body.sse_ping_interval)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return await _collect(rt, job, body, first, cid, created)
        finally:
            watcher.cancel()
            job.cancel()  # no-op when finished; stops the turn if this task was cancelled

    # -- sessions -------------------------------------------------------------------------
    @app.post("/v1/sessions")
    async def create_session(request: Request):
        body = parse_body(await read_body(request), CreateSession, allow_empty=True)
        rt.require_ready()
        session = await worker.run(lambda j: _persisted(rt, _prepare(rt, rt.manager.create(
            body.session_id, body.max_seq_len))))
        return JSONResponse(session.info(), status_code=201)

    @app.get("/v1/sessions")
    async def list_sessions():
        rt.require_ready()
        listing = rt.session_listing()
        return {"object": "list", "data": listing["sessions"],
                **{k: v for k, v in listing.items() if k != "sessions"}}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str):
        rt.require_ready()
        info = rt.manager.info(session_id)
        return info

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        rt.require_ready()
        rt.manager.info(session_id)  # 404 now, not after the queue
        info = await worker.run(lambda j: rt.manager.close(session_id))
        return {"id": session_id, "object": "session.deleted", "deleted": True, "session": info}

    @app.get("/v1/sessions/{session_id}/history")
    async def history(session_id: str):
        rt.require_ready()
        session = rt.manager._lookup(session_id)
        if session.conversation is not None:
            messages = list(session.conversation.transcript)
        else:  # on disk (evicted or restored after a restart): read it from its state snapshot
            messages = await asyncio.to_thread(_disk_transcript, rt, session)
        return {"object": "session.history", "id": session_id, "messages": messages,
                "message_count": len(messages)}

    @app.post("/v1/sessions/{session_id}/fork")
    async def fork(session_id: str, request: Request):
        body = parse_body(await read_body(request), ForkSession, allow_empty=True)
        rt.require_ready()
        rt.manager.info(session_id)
        session = await worker.run(lambda j: _persisted(rt, _prepare(rt, rt.manager.fork(
            session_id, body.new_session_id))))
        return JSONResponse(session.info(), status_code=201)

    @app.post("/v1/sessions/{session_id}/rollback")
    async def rollback(session_id: str, request: Request):
        body = parse_body(await read_body(request), RollbackSession)
        rt.require_ready()
        rt.manager.info(session_id)  # 404 now, not after the queue

        def run(job):
            n = body.n_messages
            if n < 0:  # drop the last -n messages
                n = max(0, rt.manager.info(session_id)["message_count"] + n)
            info = rt.manager.rollback(session_id, n)
            rt.persist_session(session_id)
            return info

        return await worker.run(run)

    @app.post("/v1/sessions/{session_id}/resize")
    async def resize(session_id: str, request: Request):
        body = parse_body(await read_body(request), ResizeSession)
        rt.require_ready()
        rt.manager.info(session_id)
        def run(job):
            info = rt.manager.resize(session_id, body.max_seq_len)
            rt.persist_session(session_id)
            return info

        return await worker.run(run)

    @app.post("/v1/sessions/{session_id}/save")
    async def save(session_id: str, request: Request):
        body = parse_body(await read_body(request), SaveSession, allow_empty=True)
        rt.require_ready()
        rt.manager.info(session_id)
        snap_id = await worker.run(lambda j: rt.manager.save(session_id, title=body.title,
                                                             description=body.description, tags=body.tags))
        return JSONResponse(_snapshot_view(rt.store.get(snap_id)), status_code=201)

    # -- snapshots ------------------------------------------------------------------------
    @app.get("/v1/snapshots")
    async def list_snapshots(tag: str | None = None, all: bool = False):  # noqa: A002 - query name
        rt.require_ready()
        items = await asyncio.to_thread(rt.store.list, tag=tag)
        if not all:
            items = [m for m in items if SESSION_STATE_TAG not in (m.get("tags") or [])]
        return {"object": "list", "data": [_snapshot_view(m) for m in items]}

    @app.post("/v1/snapshots/import")
    async def import_snapshot(request: Request, snapshot_id: str | None = None, replace: bool = False):
        rt.require_ready()
        fd, tmp = tempfile.mkstemp(prefix="spl-import-", suffix=".tar")
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for part in request.stream():
                    size += len(part)
                    if size > MAX_IMPORT_BYTES:
                        raise TooLarge(f"upload is over the limit of {MAX_IMPORT_BYTES} bytes")
                    out.write(part)
            if size == 0:
                raise InvalidRequest("the upload is empty; send the file made by snapshot export")
            manifest = await asyncio.to_thread(
                lambda: rt.store.import_(tmp, snapshot_id=snapshot_id or None, replace=replace,
                                         name=UPLOAD_NAME))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return JSONResponse(_snapshot_view(manifest), status_code=201)

    @app.get("/v1/snapshots/{snapshot_id}")
    async def get_snapshot(snapshot_id: str):
        rt.require_ready()
        return _snapshot_view(await asyncio.to_thread(rt.store.get, snapshot_id))

    @app.patch("/v1/snapshots/{snapshot_id}")
    async def patch_snapshot(snapshot_id: str, request: Request):
        body = parse_body(await read_body(request), PatchSnapshot)
        rt.require_ready()
        _refuse_session_state(rt, snapshot_id, "changed")
        fields = body.model_dump(exclude_unset=True)
        manifest = await asyncio.to_thread(lambda: rt.store.patch(snapshot_id, **fields))
        return _snapshot_view(manifest if isinstance(manifest, dict) else rt.store.get(snapshot_id))

    @app.delete("/v1/snapshots/{snapshot_id}")
    async def delete_snapshot(snapshot_id: str):
        rt.require_ready()
        _refuse_session_state(rt, snapshot_id, "deleted")
        await asyncio.to_thread(rt.store.delete, snapshot_id)
        return {"id": snapshot_id, "object": "snapshot.deleted", "deleted": True}

    @app.post("/v1/snapshots/{snapshot_id}/load")
    async def load_snapshot(snapshot_id: str, request: Request):
        body = parse_body(await read_body(request), LoadSnapshot, allow_empty=True)
        rt.require_ready()
        await asyncio.to_thread(rt.store.get, snapshot_id)  # 404 before queueing
        session = await worker.run(lambda j: _persisted(rt, _prepare(rt, rt.manager.load(
            snapshot_id, session_id=body.session_id, force=body.force, max_seq_len=body.max_seq_len))))
        return JSONResponse(session.info(), status_code=201)

    @app.get("/v1/snapshots/{snapshot_id}/export")
    async def export_snapshot(snapshot_id: str):
        import shutil

        rt.require_ready()
        _refuse_session_state(rt, snapshot_id, "exported")
        await asyncio.to_thread(rt.store.get, snapshot_id)
        tmpdir = tempfile.mkdtemp(prefix="spl-export-")

        def cleanup():
            shutil.rmtree(tmpdir, ignore_errors=True)

        try:
            dest = os.path.join(tmpdir, f"{snapshot_id}.spl-snapshot.tar")
            path = await asyncio.to_thread(rt.store.export, snapshot_id, dest)
        except BaseException:
            cleanup()
            raise

        return FileResponse(str(path), media_type="application/x-tar", filename=os.path.basename(str(path)),
                            background=BackgroundTask(cleanup))


def _refuse_session_state(rt: Runtime, snapshot_id: str, what: str) -> None:
    """A live session's own journal is written by the server after every turn: changing,
    deleting or exporting it from outside would leave that session naming files it lost."""
    owner = rt.manager.state_owner(snapshot_id)
    if owner is not None:
        raise Conflict(f"snapshot {snapshot_id!r} is the live state of session {owner!r} and cannot be {what}; "
                       f"save the session (POST /v1/sessions/{owner}/save) for a snapshot of its own, or "
                       "delete the session", param="snapshot_id")


def _model_card(rt: Runtime) -> dict:
    info: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        info = dict(rt.model.info())
    return {
        "id": rt.model_name,
        "object": "model",
        "created": int(rt.ready_at or rt.started_at),
        "owned_by": "spl",
        "fingerprint": getattr(rt.model, "fingerprint", None),
        "info": _jsonable(info),
    }


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return str(value)


def _snapshot_view(manifest: dict) -> dict:
    view = {k: v for k, v in manifest.items() if k not in ("files",)}
    view["object"] = "snapshot"
    files = manifest.get("files") or {}
    view["bytes"] = sum(int(f.get("bytes", 0)) for f in files.values() if isinstance(f, dict))
    return view


def _disk_transcript(rt: Runtime, session) -> list[dict]:
    snap = session.state_snapshot
    if not snap:
        return []
    try:
        data = rt.store.read_transcript(snap)  # hash-checked; a session journal or a snapshot
    except (OSError, ValueError, UserError):
        return []
    messages = data
    if isinstance(data, dict):
        messages = data.get("transcript", data.get("messages"))
    return messages if isinstance(messages, list) else []


def _persisted(rt: Runtime, session):
    """Make a new or changed session durable (its journal) before answering."""
    rt.persist_session(session.id)
    return session


def _prepare(rt: Runtime, session):
    """Apply server options a session's conversation does not get from the manager."""
    conv = getattr(session, "conversation", None)
    if conv is not None and rt.options.chunk_size:
        conv.chunk_size = rt.options.chunk_size
    return session


# -- chat turns --------------------------------------------------------------------------
def _chat_job(rt: Runtime, job, body: ChatCompletionRequest, messages: list[dict]) -> None:
    """Runs on the worker: pick the conversation, apply the session rule, run the turn, emit events.
    A session's journal is persisted before the last event (``Done``) goes out, so a client that
    got its answer with ``persisted: true`` finds the turn after any crash."""
    if job.cancelled():
        raise JobCancelled("client went away")
    queued_s = time.monotonic() - job.submitted
    session = None
    if body.session_id:
        try:
            session = rt.manager.get(body.session_id)
        except NotFound:
            session = rt.manager.create(body.session_id)  # first use of a session id creates it
        _prepare(rt, session)
    persisted = False
    try:
        persisted = _run_chat(rt, job, body, messages, session, queued_s)
    finally:
        if session is not None and not persisted:  # failed or cancelled: the journal gets what changed
            rt.persist_session(session.id)


class _AnnounceStart:
    """Wraps a conversation's memory guard for one turn: the response starts (``("start", ...)``
    event) when the prompt has passed every check and its prefill begins, or at the first event.
    What fails before (a prompt too long, the memory budget, the template) gets its own HTTP
    status, streamed or not."""

    def __init__(self, inner, announce):
        self.inner = inner
        self.announce = announce

    def reserve(self, conv, position: int) -> None:
        if self.inner is not None:
            self.inner.reserve(conv, position)
        self.announce()

    def room(self, conv):
        return self.inner.room(conv) if self.inner is not None else None


def _run_chat(rt: Runtime, job, body: ChatCompletionRequest, messages: list[dict], session, queued_s) -> bool:
    """Run the turn and emit its events; returns whether the session was persisted."""
    from superlinear.engine import run_turn

    lock = session.lock if session is not None else contextlib.nullcontext()
    with lock:
        if session is not None:
            conv = session.conversation if session.conversation is not None else rt.manager.get(
                body.session_id).conversation
            transcript = list(conv.transcript)
            full, how, _kept = chatmod.merge_session_messages(transcript, messages, body.session_mode)
        else:
            conv = rt.scratch_conversation()
            full, how = messages, None
        request = chatmod.engine_request(body, full, rt.defaults)
        started = False

        def announce() -> None:
            nonlocal started
            if not started:
                started = True
                job.emit(("start", how, queued_s))

        rt.stats["generations"] += 1
        guard = conv.memory
        conv.memory = _AnnounceStart(guard, announce)
        try:
            try:
                done = _emit_turn(run_turn(conv, request, cancel=job.cancel_event), job, announce)
            except TooLarge:
                if session is not None or started or not rt.grow_scratch():
                    raise
                done = _emit_turn(run_turn(conv, request, cancel=job.cancel_event), job, announce)
        finally:
            conv.memory = guard
        rt.note_prefill(done.usage, done.timings)
        if session is not None:
            session.touch()
            result = rt.persist_session(session.id)
            job.emit(("persist", result))
        job.emit(done)
    job.emit(_END)
    return session is not None


def _emit_turn(events, job, announce):
    """Emit every event of a turn but the last (``Done``), which is returned: it goes out once the
    session is persisted."""
    done = None
    for event in events:
        announce()
        if type(event).__name__ == "Done":
            done = event
        else:
            job.emit(event)
    if done is None:
        raise RuntimeError("the turn ended without a Done event")
    return done


async def _next_event(job):
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
    return _END


class ClientGone(UserError):
    """The client disconnected (nginx's 499): nobody reads this answer."""

    http_status = 499
    code = "client_closed_request"


def _event_kind(event) -> str:
    return type(event).__name__


async def _collect(rt: Runtime, job, body: ChatCompletionRequest, first, cid: str, created: int):
    content, reasoning, tool_calls = [], [], None
    done = None
    how = queued_s = persisted = None
    event = first
    while event is not _END:
        kind = _event_kind(event)
        if isinstance(event, tuple) and event[0] == "start":
            _, how, queued_s = event
        elif isinstance(event, tuple) and event[0] == "persist":
            persisted = event[1]
        elif kind == "TextDelta":
            content.append(event.text)
        elif kind == "ReasoningDelta":
            reasoning.append(event.text)
        elif kind == "ToolCallsEvent":
            tool_calls = event.calls
        elif kind == "Done":
            done = event
        event = await _next_event(job)
    if done is None:
        raise RuntimeError("the turn ended without a Done event")
    # The stored message is what a client should send back: it matches the transcript exactly.
    stored = done.message.get("content")
    text = stored if isinstance(stored, str) else "".join(content)
    reasoning_text = "".join(reasoning) or (done.reasoning or "")
    body_out = chatmod.response_body(
        cid=cid, created=created, model=rt.model_name, done=done, content=text, reasoning=reasoning_text,
        tool_calls=tool_calls or done.message.get("tool_calls"), session_id=body.session_id,
        queued_s=queued_s, how=how)
    _fix_finish(body_out["choices"][0], done)
    if persisted is None:
        return body_out
    body_out.update(chatmod.persist_fields(persisted))
    return JSONResponse(body_out, headers={"X-Spl-Persisted": "true" if persisted.ok else "false"})


def _fix_finish(choice: dict, done) -> None:
    """OpenAI clients know stop/length/tool_calls; spl's own reasons go to ``stop_reason``."""
    if done.finish_reason in ("repetition", "cancelled"):
        choice["stop_reason"] = done.finish_reason
        choice["finish_reason"] = "stop"
    elif done.finish_reason == "memory":  # the memory budget ended it: "length" for OpenAI clients
        choice["stop_reason"] = "memory_budget"
        choice["finish_reason"] = "length"


async def _stream(rt: Runtime, job, body: ChatCompletionRequest, first, cid: str, created: int):
    model = rt.model_name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"session_id": body.session_id} if body.session_id else {}
    how = queued_s = persisted = None
    try:
        yield chatmod.sse(chatmod.chunk(cid, created, model, {"role": "assistant", "content": ""}, **extra))
        event = first
        while event is not _END:
            kind = _event_kind(event)
            if isinstance(event, tuple) and event[0] == "start":
                _, how, queued_s = event
            elif isinstance(event, tuple) and event[0] == "persist":
                persisted = event[1]
            elif kind == "PrefillProgress":  # llama.cpp's prompt_progress chunks, when asked for
                if body.return_progress:
                    yield chatmod.sse(progressmod.progress_chunk(chatmod.chunk(cid, created, model, **extra),
                                                                 event))
            elif kind == "TextDelta" and event.text:
                yield chatmod.sse(chatmod.chunk(cid, created, model, {"content": event.text}, **extra))
            elif kind == "ReasoningDelta" and event.text:
                yield chatmod.sse(chatmod.chunk(cid, created, model, {"reasoning_content": event.text},
                                                **extra))
            elif kind == "ToolCallsEvent":
                calls = [{"index": i, "id": c.get("id"), "type": "function",
                          "function": {"name": c["function"]["name"],
                                       "arguments": c["function"].get("arguments", "")}}
                         for i, c in enumerate(event.calls)]
                yield chatmod.sse(chatmod.chunk(cid, created, model, {"tool_calls": calls}, **extra))
            elif kind == "Done":
                final = chatmod.chunk(cid, created, model, {}, event.finish_reason,
                                      timings=chatmod.spl_timings(event.usage, event.timings, queued_s),
                                      session_update=how, **extra,
                                      **(chatmod.persist_fields(persisted) if persisted is not None else {}))
                _fix_finish(final["choices"][0], event)
                yield chatmod.sse(final)
                if include_usage:
                    yield chatmod.sse(chatmod.chunk(cid, created, model, None,
                                                    usage=chatmod.openai_usage(event.usage), **extra))
            event = await _next_event(job)
        yield chatmod.sse("[DONE]")
    except UserError as exc:
        yield chatmod.sse(exc.to_openai())
        yield chatmod.sse("[DONE]")
    except asyncio.CancelledError:
        job.cancel()
        raise
    except Exception as exc:  # noqa: BLE001 - a bug mid-stream: report it in the stream
        log.exception("spl: error while streaming")
        yield chatmod.sse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}".splitlines()[0],
                                     "type": "server_error", "param": None, "code": "internal_error"}})
        yield chatmod.sse("[DONE]")
    finally:
        job.cancel()  # the client went away (or we are done): stop the turn within one step
