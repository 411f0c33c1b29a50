"""/v1/snapshots: snapshots on disk, through the in-process API (``LocalApi``). Store work runs
in a thread (it never waits for a turn); loading one into a session runs on the worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from superlinear.errors import BodyTooLarge, InvalidRequest
from superlinear.sessions.manifest import MAX_DEPTH, MAX_DESCRIPTION, MAX_TAG_LEN, MAX_TAGS, MAX_TITLE
from superlinear.sessions.snapshots import UPLOAD_NAME

from . import bounds, http
from .runtime import Runtime
from .schemas import LoadSnapshot, PatchSnapshot

RECHECK_BYTES = 16 << 20  # how often an upload asks again how much room the disk has
IMPORT = bounds.declare(
    "POST", "/v1/snapshots/import", body_bytes="the room of the disk: free space less $SPL_STORE_RESERVE_BYTES",
    depth=MAX_DEPTH, items="manifest: 16 MiB; then only the files it lists, each hashed and stopped at the size "
                           "it declares (never more decompressed)", body="application/x-tar")
PATCH = bounds.declare("PATCH", "/v1/snapshots/{snapshot_id}", items=f"title {MAX_TITLE}, description "
                       f"{MAX_DESCRIPTION:,} characters; tags {MAX_TAGS} of {MAX_TAG_LEN}", body=PatchSnapshot)
LOAD = bounds.declare("POST", "/v1/snapshots/{snapshot_id}/load", body=LoadSnapshot)
LIST = bounds.declare("GET", "/v1/snapshots", body_bytes=0, depth=None)
ONE = bounds.declare("GET", "/v1/snapshots/{snapshot_id}", body_bytes=0, depth=None)
DELETE = bounds.declare("DELETE", "/v1/snapshots/{snapshot_id}", body_bytes=0, depth=None)
EXPORT = bounds.declare("GET", "/v1/snapshots/{snapshot_id}/export", body_bytes=0, depth=None,
                        reply="the snapshot's files, streamed from disk")


def add_routes(app: FastAPI, rt: Runtime) -> None:
    def ready():
        rt.require_ready()
        return rt.api

    @app.get(LIST.path)
    async def list_snapshots(tag: str | None = None, all: bool = False):  # noqa: A002 - query name
        items = await asyncio.to_thread(ready().list_snapshots, tag, all)
        # unreadable snapshots are left out, never a failed listing; they are named beside it
        return {"object": "list", "data": items, "skipped": rt.store.skipped}

    @app.post(IMPORT.path)
    async def import_snapshot(request: Request, snapshot_id: str | None = None, replace: bool = False):
        service = ready()
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
        return JSONResponse(view, status_code=201)

    @app.get(ONE.path)
    async def get_snapshot(snapshot_id: str):
        return await asyncio.to_thread(ready().get_snapshot, snapshot_id)

    @app.patch(PATCH.path)
    async def patch_snapshot(snapshot_id: str, request: Request):
        body = await bounds.parse_request(request, PatchSnapshot, limit=PATCH.body_bytes)
        service = ready()
        fields = body.model_dump(exclude_unset=True)
        return await asyncio.to_thread(lambda: service.update_snapshot(snapshot_id, **fields))

    @app.delete(DELETE.path)
    async def delete_snapshot(snapshot_id: str):
        await asyncio.to_thread(ready().delete_snapshot, snapshot_id)
        return {"id": snapshot_id, "object": "snapshot.deleted", "deleted": True}

    @app.post(LOAD.path)
    async def load_snapshot(snapshot_id: str, request: Request):
        body = await bounds.parse_request(request, LoadSnapshot, limit=LOAD.body_bytes, allow_empty=True)
        info = await asyncio.to_thread(lambda: ready().load(snapshot_id, session_id=body.session_id, force=body.force,
                                                            max_seq_len=body.max_seq_len, ephemeral=body.ephemeral))
        return JSONResponse(info, status_code=201)

    @app.get(EXPORT.path)
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




