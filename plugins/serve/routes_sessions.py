"""/v1/sessions: live sessions, through the in-process API (``LocalApi``: what touches a cache
runs on its worker, a missing session is a 404 at once, not after the queue). Its blocking
calls run in a thread, never on the event loop."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from superlinear.sessions.manifest import MAX_DESCRIPTION, MAX_TAG_LEN, MAX_TAGS, MAX_TITLE

from . import bounds
from .runtime import Runtime
from .schemas import CreateSession, ForkSession, ResizeSession, RollbackSession, SaveSession

CREATE = bounds.declare("POST", "/v1/sessions", body=CreateSession)
LIST = bounds.declare("GET", "/v1/sessions", body_bytes=0, depth=None)
ONE = bounds.declare("GET", "/v1/sessions/{session_id}", body_bytes=0, depth=None)
CLOSE = bounds.declare("DELETE", "/v1/sessions/{session_id}", body_bytes=0, depth=None)
HISTORY = bounds.declare("GET", "/v1/sessions/{session_id}/history", body_bytes=0, depth=None,
                         reply="the messages of the conversation limit, encoded off the event loop")
FORK = bounds.declare("POST", "/v1/sessions/{session_id}/fork", body=ForkSession)
ROLLBACK = bounds.declare("POST", "/v1/sessions/{session_id}/rollback", body=RollbackSession)
RESIZE = bounds.declare("POST", "/v1/sessions/{session_id}/resize", items="max_seq_len: the conversation limit",
                        body=ResizeSession)
SAVE = bounds.declare("POST", "/v1/sessions/{session_id}/save", items=f"title {MAX_TITLE}, description "
                      f"{MAX_DESCRIPTION:,} characters; tags {MAX_TAGS} of {MAX_TAG_LEN}", body=SaveSession)


def add_routes(app: FastAPI, rt: Runtime) -> None:
    def ready():
        rt.require_ready()
        return rt.api

    @app.post(CREATE.path)
    async def create_session(request: Request):
        body = await bounds.parse_request(request, CreateSession, limit=CREATE.body_bytes, allow_empty=True)
        info = await asyncio.to_thread(ready().create_session, body.session_id, body.max_seq_len,
                                       ephemeral=body.ephemeral)
        return JSONResponse(info, status_code=201)

    @app.get(LIST.path)
    async def list_sessions():
        ready()
        listing = rt.session_listing()
        return {"object": "list", "data": listing["sessions"],
                **{k: v for k, v in listing.items() if k != "sessions"}}

    @app.get(ONE.path)
    async def get_session(session_id: str):
        return ready().get_session(session_id)

    @app.delete(CLOSE.path)
    async def delete_session(session_id: str):
        info = await asyncio.to_thread(ready().close_session, session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True, "session": info}

    @app.get(HISTORY.path)
    async def history(session_id: str):
        messages = await asyncio.to_thread(ready().history, session_id)
        return await bounds.json_reply({"object": "session.history", "id": session_id, "messages": messages,
                                        "message_count": len(messages)})

    async def on_session(request: Request, schema, call, *, allow_empty: bool = False):
        """Parse the body (a small one), then ``call(api, body)`` in a thread."""
        body = await bounds.parse_request(request, schema, limit=bounds.SMALL_BODY_BYTES, allow_empty=allow_empty)
        api = ready()
        return await asyncio.to_thread(call, api, body)

    @app.post(FORK.path)
    async def fork(session_id: str, request: Request):
        info = await on_session(request, ForkSession, allow_empty=True,
                                call=lambda api, body: api.fork(session_id, body.new_session_id))
        return JSONResponse(info, status_code=201)

    @app.post(ROLLBACK.path)
    async def rollback(session_id: str, request: Request):
        return await on_session(request, RollbackSession,
                                call=lambda api, body: api.rollback(session_id, body.n_messages))

    @app.post(RESIZE.path)
    async def resize(session_id: str, request: Request):
        return await on_session(request, ResizeSession,
                                call=lambda api, body: api.resize(session_id, body.max_seq_len))

    @app.post(SAVE.path)
    async def save(session_id: str, request: Request):
        view = await on_session(request, SaveSession, allow_empty=True,
                                call=lambda api, body: api.save(session_id, title=body.title,
                                                                description=body.description, tags=body.tags))
        return JSONResponse(view, status_code=201)
