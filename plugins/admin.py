"""Built-in plugin ``admin``: ``spl ls``, ``spl rm``, ``spl session …``, ``spl snapshot …``.

Every operation is one of the API's bus commands (``superlinear.api.commands``), dispatched
against the server the commands talk to (``SplClient``); the chat REPL's slash commands
dispatch the same commands against its own client. ``spl ls`` / ``spl rm`` / ``snapshot tag``
combine a few of them (``list_all``, ``remove``, ``retag``: plain functions of a dispatcher).
Results are plain dicts/lists (JSON-ready); the click commands format them (``--json`` prints
them as they are).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from superlinear.api import commands as api
from superlinear.bus import Context, dispatch
from superlinear.client.completion import complete_any_ids, complete_session_ids, complete_snapshot_ids
from superlinear.errors import InvalidRequest, NotFound, UserError
from superlinear.hookspecs import hookimpl

__all__ = ["as_listing", "format_bytes", "format_history", "list_all", "remove", "retag", "session_table",
           "snapshot_table"]

Run = Callable[[api.ApiCommand], object]  # dispatches one API command against some API


@contextlib.contextmanager
def _server() -> Iterator[Run]:
    """A dispatcher bound to the server the commands talk to (closed after)."""
    from superlinear.client import get_client

    client = get_client()
    try:
        yield lambda command: dispatch(command, Context(api=client))
    finally:
        client.close()


def _one(command: api.ApiCommand):
    with _server() as run:
        return run(command)


# ==== operations made of a few API commands ==================================================
def list_all(run: Run) -> dict:
    """Sessions and snapshots: ``{"sessions": [...], "snapshots": [...]}``."""
    return {"sessions": run(api.ListSessions())["sessions"], "snapshots": run(api.ListSnapshots())}


def as_listing(items: list[dict], **extra) -> dict:
    """A listing in the one shape the HTTP API and every ``--json`` give it:
    ``{"object": "list", "data": [...], ...}`` (a session listing adds count, bytes, resident and
    memory_budget)."""
    return {"object": "list", "data": items, **extra}


def session_listing(listing: dict) -> dict:
    """``ListSessions``' result (``{"sessions": [...], "count", ...}``) as ``GET /v1/sessions`` gives it."""
    return as_listing(listing["sessions"], **{k: v for k, v in listing.items() if k != "sessions"})


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


def export_snapshot(snapshot_id: str, path: str) -> dict:
    path = Path(path or f"{snapshot_id}.spl-snapshot.tar")
    if path.is_dir():
        path = path / f"{snapshot_id}.spl-snapshot.tar"
    from superlinear.client.progress import ByteBar

    with ByteBar(f"export {snapshot_id}", None) as bar:  # drawn on a terminal only
        out = _one(api.ExportSnapshot(snapshot_id=snapshot_id, dest=str(path), on_bytes=bar))
    return {"id": snapshot_id, "path": str(out), "bytes": out.stat().st_size}


def import_snapshot(path: str, snapshot_id: str | None, replace: bool) -> dict:
    from superlinear.client.progress import ByteBar
    from superlinear.sessions.snapshots import UPLOAD_NAME

    try:
        with ByteBar(f"import {Path(path).name}", None) as bar:  # drawn on a terminal only
            return _one(api.ImportSnapshot(file=path, snapshot_id=snapshot_id, replace=replace, on_bytes=bar))
    except UserError as exc:  # the server only knows "the uploaded file": name the user's file
        if UPLOAD_NAME not in exc.message:
            raise
        raise type(exc)(exc.message.replace(UPLOAD_NAME, path), param=exc.param, code=exc.code) from None


# ==== formatting ==============================================================================
def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _when(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return _dt.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M")
    try:
        parsed = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return parsed.astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return str(value)


def session_table(sessions: list[dict]) -> str:
    if not sessions:
        return "no sessions"
    rows = [("SESSION", "TOKENS", "MESSAGES", "MEMORY", "STATE", "LAST USED")]
    for s in sessions:
        state = "busy" if s.get("busy") else ("live" if s.get("resident", True) else "on disk")
        rows.append((s["id"], f"{s.get('position', 0)}/{s.get('max_seq_len', '?')}", str(s.get("message_count", 0)),
                     format_bytes(s.get("bytes")), state, _when(s.get("last_used"))))
    return _table(rows)


def snapshot_table(snaps: list[dict]) -> str:
    if not snaps:
        return "no snapshots"
    rows = [("SNAPSHOT", "TITLE", "TOKENS", "SIZE", "TAGS", "CREATED")]
    for s in snaps:
        session = s.get("session") or {}
        rows.append((s["id"], (s.get("title") or "")[:40], str(session.get("position", "-")),
                     format_bytes(s.get("bytes")), ",".join(s.get("tags") or []), _when(s.get("created_at"))))
    return _table(rows)


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def format_history(messages: list[dict], offset: int = 0) -> str:
    """Numbered from 1, as `rollback N` counts (it keeps messages 1…N) and as the chat's /history
    shows them; ``offset``: how many messages come before ``messages``."""
    if not messages:
        return "(no messages)"
    out = []
    for i, m in enumerate(messages, start=offset + 1):
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        line = f"[{i}] {m.get('role')}: {content or ''}"
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {})
            line += f"\n    -> {fn.get('name')}({fn.get('arguments')})"
        out.append(line)
    return "\n".join(out)


def _kv(d: dict) -> str:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            v = json.dumps(v)
        elif k == "bytes":
            v = f"{format_bytes(v)} ({v})"
        elif k in ("created_at", "last_used", "updated_at"):
            v = _when(v)
        lines.append(f"{k:<14} {v}")
    return "\n".join(lines)


def _emit(result, as_json: bool, text) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(text(result) if callable(text) else text)


_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


# ==== click ===================================================================================
@click.command("ls")
@_json_option
def ls_command(as_json: bool) -> None:
    """List sessions and snapshots."""
    with _server() as run:
        sessions, snapshots = session_listing(run(api.ListSessions())), as_listing(run(api.ListSnapshots()))
        for skipped in run(api.SkippedSnapshots()):  # unreadable: left out of the listing, never its failure
            click.echo(f"spl: warning: snapshot {skipped['id']} skipped: {skipped['error']}", err=True)

    def text(r):
        return session_table(r["sessions"]["data"]) + "\n\n" + snapshot_table(r["snapshots"]["data"])

    _emit({"sessions": sessions, "snapshots": snapshots}, as_json, text)


@click.command("rm")
@click.argument("ids", nargs=-1, required=True, shell_complete=complete_any_ids)
@_json_option
def rm_command(ids: tuple[str, ...], as_json: bool) -> None:
    """Remove sessions or snapshots by id."""
    with _server() as run:
        result = remove(run, ids)
    _emit(result, as_json, lambda r: "\n".join(f"removed {d['kind']} {d['id']}" for d in r))


@click.group("session")
def session_group() -> None:
    """Live sessions on the server: list, inspect, fork, roll back, resize, remove."""


@session_group.command("new")
@click.argument("session_id", required=False)
@click.option("--max-seq-len", type=click.IntRange(1), default=None,
              help="Tokens the session may hold (default: the server's --max-seq-len).")
@_json_option
def session_new_command(session_id, max_seq_len, as_json) -> None:
    """Create an empty session."""
    _emit(_one(api.CreateSession(session_id=session_id, max_seq_len=max_seq_len)), as_json,
          lambda r: f"session {r['id']} created (max_seq_len {r.get('max_seq_len')})")


@session_group.command("ls")
@_json_option
def session_ls_command(as_json) -> None:
    """List sessions."""
    _emit(session_listing(_one(api.ListSessions())), as_json, lambda r: session_table(r["data"]))


@session_group.command("info")
@click.argument("session_id", shell_complete=complete_session_ids)
@_json_option
def session_info_command(session_id, as_json) -> None:
    """Show one session."""
    _emit(_one(api.GetSession(session_id=session_id)), as_json, _kv)


@session_group.command("history")
@click.argument("session_id", shell_complete=complete_session_ids)
@click.option("-n", "--last", type=int, default=None, help="Only the last N messages.")
@_json_option
def session_history_command(session_id, last, as_json) -> None:
    """Print a session's transcript."""
    messages = _one(api.History(session_id=session_id))
    offset = 0
    if last is not None:
        offset = max(0, len(messages) - last)
        messages = messages[offset:]
    _emit(messages, as_json, lambda r: format_history(r, offset))


@session_group.command("rm")
@click.argument("session_ids", nargs=-1, required=True, shell_complete=complete_session_ids)
@_json_option
def session_rm_command(session_ids, as_json) -> None:
    """Close sessions (their state is dropped; save them first to keep it)."""
    with _server() as run:
        closed = [{"id": sid, "object": "session.deleted", "deleted": True,
                   "session": run(api.CloseSession(session_id=sid))} for sid in session_ids]
    _emit(closed, as_json, lambda r: "\n".join(f"removed session {info['id']}" for info in r))


@session_group.command("fork")
@click.argument("session_id", shell_complete=complete_session_ids)
@click.option("--as", "new_id", default=None, help="Id of the new session.")
@_json_option
def session_fork_command(session_id, new_id, as_json) -> None:
    """Start a new session from another's state (no re-prefill)."""
    _emit(_one(api.Fork(session_id=session_id, new_id=new_id)), as_json,
          lambda r: f"forked {session_id} -> {r['id']} ({r.get('position')} tokens)")


@session_group.command("rollback", context_settings={"ignore_unknown_options": True})
@click.argument("session_id", shell_complete=complete_session_ids)
@click.argument("n_messages", type=int)
@_json_option
def session_rollback_command(session_id, n_messages, as_json) -> None:
    """Keep the first N messages (a negative N drops the last -N)."""
    _emit(_one(api.Rollback(session_id=session_id, n_messages=n_messages)), as_json,
          lambda r: f"session {session_id}: {r.get('message_count')} messages, {r.get('position')} tokens")


@session_group.command("resize")
@click.argument("session_id", shell_complete=complete_session_ids)
@click.argument("max_seq_len", type=click.IntRange(1), required=False)
@click.option("--max-seq-len", "max_seq_len_option", type=click.IntRange(1), default=None,
              help="The new length (the same as the MAX_SEQ_LEN argument; error messages use this form).")
@_json_option
def session_resize_command(session_id, max_seq_len, max_seq_len_option, as_json) -> None:
    """Change a session's max_seq_len without losing its state: `spl session resize ID N`."""
    if (max_seq_len is None) == (max_seq_len_option is None):
        raise click.UsageError("give the new length once: `spl session resize ID N` (or --max-seq-len N)")
    max_seq_len = max_seq_len or max_seq_len_option
    _emit(_one(api.Resize(session_id=session_id, max_seq_len=max_seq_len)), as_json,
          lambda r: f"session {session_id}: max_seq_len {r.get('max_seq_len')} ({format_bytes(r.get('bytes'))})")


@click.group("snapshot")
def snapshot_group() -> None:
    """Snapshots on disk: save, load, list, tag, export, import, remove."""


@snapshot_group.command("ls")
@click.option("--tag", default=None, help="Only snapshots with this tag.")
@_json_option
def snapshot_ls_command(tag, as_json) -> None:
    """List snapshots."""
    _emit(as_listing(_one(api.ListSnapshots(tag=tag))), as_json, lambda r: snapshot_table(r["data"]))


@snapshot_group.command("info")
@click.argument("snapshot_id", shell_complete=complete_snapshot_ids)
@_json_option
def snapshot_info_command(snapshot_id, as_json) -> None:
    """Show one snapshot's manifest."""
    _emit(_one(api.GetSnapshot(snapshot_id=snapshot_id)), as_json, _kv)


@snapshot_group.command("save")
@click.argument("session_id", shell_complete=complete_session_ids)
@click.option("--title", default=None, help="A short title, shown by `spl snapshot ls`.")
@click.option("--description", default=None, help="A longer note kept with the snapshot.")
@click.option("--tag", "tags", multiple=True, help="Tag (repeatable).")
@_json_option
def snapshot_save_command(session_id, title, description, tags, as_json) -> None:
    """Save a session as a snapshot."""
    _emit(_one(api.Save(session_id=session_id, title=title, description=description, tags=tuple(tags))),
          as_json,
          lambda r: f"saved session {session_id} as snapshot {r['id']}")


@snapshot_group.command("load")
@click.argument("snapshot_id", shell_complete=complete_snapshot_ids)
@click.option("--session", "session_id", default=None, help="Session id to load into.",
              shell_complete=complete_session_ids)
@click.option("--force", is_flag=True, help="Replace an existing session's state.")
@click.option("--max-seq-len", type=click.IntRange(1), default=None,
              help="Tokens the loaded session may hold (default: the snapshot's, within the server's limit).")
@_json_option
def snapshot_load_command(snapshot_id, session_id, force, max_seq_len, as_json) -> None:
    """Load a snapshot into a session."""
    _emit(_one(api.Load(snapshot_id=snapshot_id, session_id=session_id, force=force, max_seq_len=max_seq_len)),
          as_json,
          lambda r: f"loaded snapshot {snapshot_id} into session {r['id']} ({r.get('position')} tokens)")


@snapshot_group.command("rm")
@click.argument("snapshot_ids", nargs=-1, required=True, shell_complete=complete_snapshot_ids)
@_json_option
def snapshot_rm_command(snapshot_ids, as_json) -> None:
    """Delete snapshots."""
    deleted = []
    with _server() as run:
        for sid in snapshot_ids:
            run(api.DeleteSnapshot(snapshot_id=sid))
            deleted.append({"id": sid, "object": "snapshot.deleted", "deleted": True})
    _emit(deleted, as_json, lambda r: "\n".join(f"removed snapshot {d['id']}" for d in r))


@snapshot_group.command("tag")
@click.argument("snapshot_id", shell_complete=complete_snapshot_ids)
@click.argument("tags", nargs=-1)
@click.option("--remove", "remove_tags", multiple=True, help="Tag to remove (repeatable).")
@click.option("--title", default=None, help="Replace the title.")
@click.option("--description", default=None, help="Replace the description.")
@_json_option
def snapshot_tag_command(snapshot_id, tags, remove_tags, title, description, as_json) -> None:
    """Add tags (and/or remove them, set the title or description)."""
    with _server() as run:
        result = retag(run, snapshot_id, tags, remove_tags, title, description)
    _emit(result, as_json,
          lambda r: f"snapshot {snapshot_id}: tags {', '.join(r.get('tags') or []) or '(none)'}"
                    + (f"; title {r.get('title')!r}" if r.get("title") else ""))


@snapshot_group.command("export")
@click.argument("snapshot_id", shell_complete=complete_snapshot_ids)
@click.argument("path", required=False, default="", type=click.Path())
@_json_option
def snapshot_export_command(snapshot_id, path, as_json) -> None:
    """Write a snapshot to one file (default ./ID.spl-snapshot.tar)."""
    _emit(export_snapshot(snapshot_id, path), as_json,
          lambda r: f"exported snapshot {snapshot_id} to {r['path']} ({format_bytes(r['bytes'])})")


@snapshot_group.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--as", "snapshot_id", default=None, help="Import under this id.")
@click.option("--replace", is_flag=True, help="Overwrite a snapshot with the same id.")
@_json_option
def snapshot_import_command(path, snapshot_id, replace, as_json) -> None:
    """Import a snapshot file made by `spl snapshot export`."""
    _emit(import_snapshot(path, snapshot_id, replace), as_json,
          lambda r: f"imported snapshot {r['id']}")


@hookimpl
def register_commands(register):
    from superlinear.client.url_option import with_url_option

    for command in (ls_command, rm_command, session_group, snapshot_group):
        register(with_url_option(command))


