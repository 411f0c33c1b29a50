"""A snapshot as one file: its upload (import) and download (export), at the routes the protocol
declares, through the in-process API (``LocalApi``); the file is written or read in a thread. The
other snapshot operations are JSON, registered from the protocol (``routes_api``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from superlinear import protocol
from superlinear.errors import BodyTooLarge, InvalidRequest
from superlinear.sessions.snapshots import UPLOAD_NAME

from . import http, routes_api
from .runtime import Runtime

RECHECK_BYTES = 16 << 20  # how often an upload asks again how much room the disk has
IMPORT, EXPORT = protocol.ImportSnapshot, protocol.ExportSnapshot
BOUNDS = [routes_api.declare(op) for op in (IMPORT, EXPORT)]


def add_routes(app: FastAPI, rt: Runtime) -> None:

    @app.api_route(IMPORT.http.route, methods=[IMPORT.http.method], status_code=IMPORT.http.status)
    async def import_snapshot(request: Request, snapshot_id: str | None = None, replace: bool = False):
        service = rt.ready_api()
        fd, tmp = tempfile.mkstemp(prefix="spl-import-", suffix=".tar")
        try:
            size, (limit, why), checked = 0, http.import_limit(), 0
            with os.fdopen(fd, "wb") as out:
                async for part in request.stream():
                    size += len(part)
                    if size - checked > RECHECK_BYTES:  # the disk fills from elsewhere too
                        checked, (limit, why) = size, await asyncio.to_thread(http.import_limit)
                        limit += checked - len(part)  # what is written already counts against the room left
                    if size > limit:
                        raise BodyTooLarge(f"upload is over {why}, {limit} bytes")
                    out.write(part)
            if size == 0:
                raise InvalidRequest("the upload is empty; send the file made by snapshot export")
            view = await asyncio.to_thread(lambda: service.import_snapshot(
                tmp, snapshot_id=snapshot_id or None, replace=replace, name=UPLOAD_NAME))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return JSONResponse(view, status_code=IMPORT.http.status)

    @app.api_route(EXPORT.http.route, methods=[EXPORT.http.method])
    async def export_snapshot(snapshot_id: str):
        service = rt.ready_api()
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
