"""Built-in plugin ``admin``: ``spl ls``, ``spl rm``, ``spl session …``, ``spl snapshot …``.

Every operation is one of the API's bus commands (``superlinear.protocol``), dispatched
against the server the commands talk to (``superlinear.connect()``); the chat REPL's slash commands
dispatch the same commands against its own client. ``spl ls`` / ``spl rm`` / ``snapshot tag``
combine a few of them (``superlinear.api.composite``).
Results are plain dicts/lists (JSON-ready); the click commands format them (``--json`` prints
them as they are).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from superlinear import protocol as api
from superlinear.api.composite import remove, retag
from superlinear.bus import Context, dispatch
from superlinear.client.completion import complete_any_ids, complete_session_ids, complete_snapshot_ids
from superlinear.errors import UserError
from superlinear.hookspecs import hookimpl
from superlinear.output import (
    as_listing,
    emit,
    format_bytes,
    format_history,
    json_option,
    key_values,
    session_listing,
    session_table,
    snapshot_table,
)


@contextlib.contextmanager
def _server() -> Iterator[Callable[[api.ApiCommand], object]]:
    """A dispatcher bound to the server the commands talk to (closed after)."""
    from superlinear import connect

    client = connect()
    try:
        yield lambda command: dispatch(command, Context(api=client))
    finally:
        client.close()


def _one(command: api.ApiCommand):
    with _server() as run:
        return run(command)


# ==== the commands' own steps ===============================================================
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


# ==== click ===================================================================================
@click.command("ls")
@json_option
def ls_command(as_json: bool) -> None:
    """List sessions and snapshots."""
    with _server() as run:
        sessions, snapshots = session_listing(run(api.ListSessions())), as_listing(run(api.ListSnapshots()))
        for skipped in run(api.SkippedSnapshots()):  # unreadable: left out of the listing, never its failure
            click.echo(f"spl: warning: snapshot {skipped['id']} skipped: {skipped['error']}", err=True)

    def text(r):
        return session_table(r["sessions"]["data"]) + "\n\n" + snapshot_table(r["snapshots"]["data"])

    emit({"sessions": sessions, "snapshots": snapshots}, as_json, text)


@click.command("rm")
@click.argument("ids", nargs=-1, required=True, shell_complete=complete_any_ids)
@json_option
def rm_command(ids: tuple[str, ...], as_json: bool) -> None:
    """Remove sessions or snapshots by id."""
    with _server() as run:
        result = remove(run, ids)
    emit(result, as_json, lambda r: "\n".join(f"removed {d['kind']} {d['id']}" for d in r))


@click.group("session")
def session_group() -> None:
    """Live sessions on the server: list, inspect, fork, roll back, resize, remove."""


@session_group.command("new")
@click.argument("session_id", required=False)
@click.option("--max-seq-len", type=click.IntRange(1), default=None,
              help="Tokens the session may hold (default: the server's --max-seq-len).")
@json_option
def session_new_command(session_id, max_seq_len, as_json) -> None:
    """Create an empty session."""
    emit(_one(api.CreateSession(session_id=session_id, max_seq_len=max_seq_len)), as_json,
          lambda r: f"session {r['id']} created (max_seq_len {r.get('max_seq_len')})")


@session_group.command("ls")
@json_option
def session_ls_command(as_json) -> None:
    """List sessions."""
    emit(session_listing(_one(api.ListSessions())), as_json, lambda r: session_table(r["data"]))


def _info_command(group: click.Group, what: str, get: Callable[[str], api.ApiCommand], complete,
                  help: str) -> click.Command:
    """``spl <what> info ID``: the fields of one session or snapshot, one ``key  value`` line each."""

    @group.command("info", help=help)
    @click.argument("object_id", metavar=f"{what.upper()}_ID", shell_complete=complete)
    @json_option
    def info_command(object_id: str, as_json: bool) -> None:
        emit(_one(get(object_id)), as_json, key_values)

    return info_command


session_info_command = _info_command(session_group, "session", lambda sid: api.GetSession(session_id=sid),
                                     complete_session_ids, "Show one session.")


@session_group.command("history")
@click.argument("session_id", shell_complete=complete_session_ids)
@click.option("-n", "--last", type=int, default=None, help="Only the last N messages.")
@json_option
def session_history_command(session_id, last, as_json) -> None:
    """Print a session's transcript."""
    messages = _one(api.History(session_id=session_id))
    offset = 0
    if last is not None:
        offset = max(0, len(messages) - last)
        messages = messages[offset:]
    emit(messages, as_json, lambda r: format_history(r, offset))


@session_group.command("rm")
@click.argument("session_ids", nargs=-1, required=True, shell_complete=complete_session_ids)
@json_option
def session_rm_command(session_ids, as_json) -> None:
    """Close sessions (their state is dropped; save them first to keep it)."""
    with _server() as run:
        closed = [{"id": sid, "object": "session.deleted", "deleted": True,
                   "session": run(api.CloseSession(session_id=sid))} for sid in session_ids]
    emit(closed, as_json, lambda r: "\n".join(f"removed session {info['id']}" for info in r))


@session_group.command("fork")
@click.argument("session_id", shell_complete=complete_session_ids)
@click.option("--as", "new_id", default=None, help="Id of the new session.")
@json_option
def session_fork_command(session_id, new_id, as_json) -> None:
    """Start a new session from another's state (no re-prefill)."""
    emit(_one(api.Fork(session_id=session_id, new_id=new_id)), as_json,
          lambda r: f"forked {session_id} -> {r['id']} ({r.get('position')} tokens)")


@session_group.command("rollback", context_settings={"ignore_unknown_options": True})
@click.argument("session_id", shell_complete=complete_session_ids)
@click.argument("n_messages", type=int)
@json_option
def session_rollback_command(session_id, n_messages, as_json) -> None:
    """Keep the first N messages (a negative N drops the last -N)."""
    emit(_one(api.Rollback(session_id=session_id, n_messages=n_messages)), as_json,
          lambda r: f"session {session_id}: {r.get('message_count')} messages, {r.get('position')} tokens")


@session_group.command("resize")
@click.argument("session_id", shell_complete=complete_session_ids)
@click.argument("max_seq_len", type=click.IntRange(1), required=False)
@click.option("--max-seq-len", "max_seq_len_option", type=click.IntRange(1), default=None,
              help="The new length (the same as the MAX_SEQ_LEN argument; error messages use this form).")
@json_option
def session_resize_command(session_id, max_seq_len, max_seq_len_option, as_json) -> None:
    """Change a session's max_seq_len without losing its state: `spl session resize ID N`."""
    if (max_seq_len is None) == (max_seq_len_option is None):
        raise click.UsageError("give the new length once: `spl session resize ID N` (or --max-seq-len N)")
    max_seq_len = max_seq_len or max_seq_len_option
    emit(_one(api.Resize(session_id=session_id, max_seq_len=max_seq_len)), as_json,
          lambda r: f"session {session_id}: max_seq_len {r.get('max_seq_len')} ({format_bytes(r.get('bytes'))})")


@click.group("snapshot")
def snapshot_group() -> None:
    """Snapshots on disk: save, load, list, tag, export, import, remove."""


@snapshot_group.command("ls")
@click.option("--tag", default=None, help="Only snapshots with this tag.")
@json_option
def snapshot_ls_command(tag, as_json) -> None:
    """List snapshots."""
    emit(as_listing(_one(api.ListSnapshots(tag=tag))), as_json, lambda r: snapshot_table(r["data"]))


snapshot_info_command = _info_command(snapshot_group, "snapshot", lambda sid: api.GetSnapshot(snapshot_id=sid),
                                      complete_snapshot_ids, "Show one snapshot's manifest.")


@snapshot_group.command("save")
@click.argument("session_id", shell_complete=complete_session_ids)
@click.option("--title", default=None, help="A short title, shown by `spl snapshot ls`.")
@click.option("--description", default=None, help="A longer note kept with the snapshot.")
@click.option("--tag", "tags", multiple=True, help="Tag (repeatable).")
@json_option
def snapshot_save_command(session_id, title, description, tags, as_json) -> None:
    """Save a session as a snapshot."""
    emit(_one(api.Save(session_id=session_id, title=title, description=description, tags=tuple(tags))),
          as_json,
          lambda r: f"saved session {session_id} as snapshot {r['id']}")


@snapshot_group.command("load")
@click.argument("snapshot_id", shell_complete=complete_snapshot_ids)
@click.option("--session", "session_id", default=None, help="Session id to load into.",
              shell_complete=complete_session_ids)
@click.option("--force", is_flag=True, help="Replace an existing session's state.")
@click.option("--max-seq-len", type=click.IntRange(1), default=None,
              help="Tokens the loaded session may hold (default: the snapshot's, within the server's limit).")
@json_option
def snapshot_load_command(snapshot_id, session_id, force, max_seq_len, as_json) -> None:
    """Load a snapshot into a session."""
    emit(_one(api.Load(snapshot_id=snapshot_id, session_id=session_id, force=force, max_seq_len=max_seq_len)),
          as_json,
          lambda r: f"loaded snapshot {snapshot_id} into session {r['id']} ({r.get('position')} tokens)")


@snapshot_group.command("rm")
@click.argument("snapshot_ids", nargs=-1, required=True, shell_complete=complete_snapshot_ids)
@json_option
def snapshot_rm_command(snapshot_ids, as_json) -> None:
    """Delete snapshots."""
    deleted = []
    with _server() as run:
        for sid in snapshot_ids:
            run(api.DeleteSnapshot(snapshot_id=sid))
            deleted.append({"id": sid, "object": "snapshot.deleted", "deleted": True})
    emit(deleted, as_json, lambda r: "\n".join(f"removed snapshot {d['id']}" for d in r))


@snapshot_group.command("tag")
@click.argument("snapshot_id", shell_complete=complete_snapshot_ids)
@click.argument("tags", nargs=-1)
@click.option("--remove", "remove_tags", multiple=True, help="Tag to remove (repeatable).")
@click.option("--title", default=None, help="Replace the title.")
@click.option("--description", default=None, help="Replace the description.")
@json_option
def snapshot_tag_command(snapshot_id, tags, remove_tags, title, description, as_json) -> None:
    """Add tags (and/or remove them, set the title or description)."""
    with _server() as run:
        result = retag(run, snapshot_id, tags, remove_tags, title, description)
    emit(result, as_json,
          lambda r: f"snapshot {snapshot_id}: tags {', '.join(r.get('tags') or []) or '(none)'}"
                    + (f"; title {r.get('title')!r}" if r.get("title") else ""))


@snapshot_group.command("export")
@click.argument("snapshot_id", shell_complete=complete_snapshot_ids)
@click.argument("path", required=False, default="", type=click.Path())
@json_option
def snapshot_export_command(snapshot_id, path, as_json) -> None:
    """Write a snapshot to one file (default ./ID.spl-snapshot.tar)."""
    emit(export_snapshot(snapshot_id, path), as_json,
          lambda r: f"exported snapshot {snapshot_id} to {r['path']} ({format_bytes(r['bytes'])})")


@snapshot_group.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--as", "snapshot_id", default=None, help="Import under this id.")
@click.option("--replace", is_flag=True, help="Overwrite a snapshot with the same id.")
@json_option
def snapshot_import_command(path, snapshot_id, replace, as_json) -> None:
    """Import a snapshot file made by `spl snapshot export`."""
    emit(import_snapshot(path, snapshot_id, replace), as_json,
          lambda r: f"imported snapshot {r['id']}")


@hookimpl
def register_commands(register):
    from superlinear.client.url_option import with_url_option

    for command in (ls_command, rm_command, session_group, snapshot_group):
        register(with_url_option(command))


