"""Operations made of a few of the API's commands (``superlinear.protocol``): each is a
plain function of ``run``, which dispatches one command against some API, so the CLI (``spl
ls``, ``spl rm``, ``spl snapshot tag``) and the chat REPL (``/ls``, ``/rm``) share them."""

from __future__ import annotations

from collections.abc import Callable

from superlinear import protocol as api
from superlinear.errors import InvalidRequest, NotFound

Run = Callable[[api.ApiCommand], object]  # dispatches one API command against some API


def list_all(run: Run) -> dict:
    """Sessions and snapshots: ``{"sessions": [...], "snapshots": [...]}``."""
    return {"sessions": run(api.ListSessions())["sessions"], "snapshots": run(api.ListSnapshots())}


def remove(run: Run, ids) -> list[dict]:
    """Remove sessions or snapshots by id (a session id wins): ``[{"id", "kind"}]``."""
    if not ids:
        raise InvalidRequest("give at least one session or snapshot id")
    done = []
    for item in ids:
        try:
            run(api.CloseSession(session_id=item))
            done.append({"id": item, "kind": "session"})
            continue
        except NotFound:
            pass
        try:
            run(api.DeleteSnapshot(snapshot_id=item))
            done.append({"id": item, "kind": "snapshot"})
        except NotFound:
            raise NotFound(f"no session or snapshot {item!r}" +
                           (f" (removed before it: {', '.join(d['id'] for d in done)})" if done else "")
                           ) from None
    return done


def retag(run: Run, snapshot_id: str, add=(), drop=(), title: str | None = None,
          description: str | None = None) -> dict:
    """Add and remove tags, set the title or description of a snapshot."""
    tags = None
    if add or drop:
        current = list(run(api.GetSnapshot(snapshot_id=snapshot_id)).get("tags") or [])
        tags = tuple([t for t in current if t not in drop] + [t for t in add if t not in current])
    if tags is None and title is None and description is None:
        raise InvalidRequest("nothing to change: give tags to add, --remove TAG, --title or --description")
    return run(api.UpdateSnapshot(snapshot_id=snapshot_id, title=title, description=description, tags=tags))
