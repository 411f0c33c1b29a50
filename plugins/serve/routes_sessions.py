"""/v1/sessions: live sessions. Whatever touches a cache runs on the worker; a missing session
is a 404 at once, not after the queue."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from . import bounds
from .runtime import Runtime
from .schemas import CreateSession, ForkSession, ResizeSession, RollbackSession, SaveSession


def add_routes(app: FastAPI, rt: Runtime) -> None:
    def ready():
        rt.require_ready()
        return rt.service

    async def on_worker(call):
        return await rt.worker.run(lambda _job: call())

    @app.post("/v1/sessions")
    async def create_session(request: Request):
        body = await bounds.parse_request(request, CreateSession, allow_empty=True)
        service = ready()
        info = await on_worker(lambda: service.create_session(body.session_id, body.max_seq_len))
        return JSONResponse(info, status_code=201)

    @app.get("/v1/sessions")
    async def list_sessions():
        ready()
        listing = rt.session_listing()
        return {"object": "list", "data": listing["sessions"],
                **{k: v for k, v in listing.items() if k != "sessions"}}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str):
        return ready().session_info(session_id)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        service = ready()
        service.session_info(session_id)
        info = await on_worker(lambda: service.close_session(session_id))
        return {"id": session_id, "object": "session.deleted", "deleted": True, "session": info}

    @app.get("/v1/sessions/{session_id}/history")
    async def history(session_id: str):
        messages = await asyncio.to_thread(ready().history, session_id)
        return {"object": "session.history", "id": session_id, "messages": messages,
                "message_count": len(messages)}

    async def on_session(session_id: str, request: Request, schema, call, *, allow_empty: bool = False):
        """Parse the body, 404 at once for a missing session, then ``call(service, body)`` on the worker."""
        body = await bounds.parse_request(request, schema, allow_empty=allow_empty)
        service = ready()
        service.session_info(session_id)
        return await on_worker(lambda: call(service, body))

    @app.post("/v1/sessions/{session_id}/fork")
    async def fork(session_id: str, request: Request):
        info = await on_session(session_id, request, ForkSession, allow_empty=True,
                                call=lambda service, body: service.fork_session(session_id, body.new_session_id))
        return JSONResponse(info, status_code=201)

    @app.post("/v1/sessions/{session_id}/rollback")
    async def rollback(session_id: str, request: Request):
        return await on_session(session_id, request, RollbackSession,
                                call=lambda service, body: service.rollback(session_id, body.n_messages))

    @app.post("/v1/sessions/{session_id}/resize")
    async def resize(session_id: str, request: Request):
        return await on_session(session_id, request, ResizeSession,
                                call=lambda service, body: service.resize(session_id, body.max_seq_len))

    @app.post("/v1/sessions/{session_id}/save")
    async def save(session_id: str, request: Request):
        view = await on_session(session_id, request, SaveSession, allow_empty=True,
                                call=lambda service, body: service.save(session_id, title=body.title,
                                                                        description=body.description, tags=body.tags))
        return JSONResponse(view, status_code=201)

