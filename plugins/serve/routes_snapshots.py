"""The snapshot routes that move a file, through the in-process API (``LocalApi``): an upload
(import) and a download (export); store work runs in a thread (it never waits for a turn). The
other snapshot routes are the protocol's (``routes_api``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from superlinear.errors import InvalidRequest, TooLarge
from superlinear.sessions.snapshots import UPLOAD_NAME

from . import http
from .runtime import Runtime


def add_routes(app: FastAPI, rt: Runtime) -> None:
    def ready():
        rt.require_ready()
        return rt.api

    @app.post("/v1/snapshots/import")
    async def import_snapshot(request: Request, snapshot_id: str | None = None, replace: bool = False):
        service = ready()
        fd, tmp = tempfile.mkstemp(prefix="spl-import-", suffix=".tar")
        try:
            size, (limit, why) = 0, http.import_limit()
            with os.fdopen(fd, "wb") as out:
                async for part in request.stream():
                    size += len(part)
                    if size > limit:
                        raise TooLarge(f"upload is over {why}, {limit} bytes", code="body_too_large")
                    out.write(part)
            if size == 0:
                raise InvalidRequest("the upload is empty; send the file made by snapshot export")
            view = await asyncio.to_thread(lambda: service.import_snapshot(
                tmp, snapshot_id=snapshot_id or None, replace=replace, name=UPLOAD_NAME))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return JSONResponse(view, status_code=201)

    @app.get("/v1/snapshots/{snapshot_id}/export")
    async def export_snapshot(snapshot_id: str):
        service = ready()
        tmpdir = tempfile.mkdtemp(prefix="spl-export-")

        def cleanup():
            shutil.rmtree(tmpdir, ignore_errors=True)

        try:
            dest = os.path.join(tmpdir, f"{snapshot_id}.spl-snapshot.tar")
            path = await asyncio.to_thread(service.export_snapshot, snapshot_id, dest)
        except BaseException:
            cleanup()
            raise
        return FileResponse(str(path), media_type="application/x-tar", filename=os.path.basename(str(path)),
                            background=BackgroundTask(cleanup))




