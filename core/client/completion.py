"""Shell completion of session and snapshot ids (click's ``shell_complete`` callbacks).

Completion runs on every Tab, so it must answer at once and never print: ids come from the
server the commands talk to (one short request), snapshot ids from the local snapshot store
when no server answers, and any failure — no server, a bad config file, a timeout — completes
nothing, silently. No server is ever started for it.
"""

from __future__ import annotations

from collections.abc import Callable

from click.shell_completion import CompletionItem

TIMEOUT_S = 0.5  # per request; a server that does not answer by then completes nothing
# Sessions' own state journals are snapshots too; `GET /v1/snapshots` hides them, and so do we.
_SESSION_STATE_TAG = "spl:session-state"


def _from_server(what: str) -> list[dict] | None:
    """``what`` ("sessions" or "snapshots") from the server the commands use (None when no
    server of ours runs)."""
    from superlinear.client import SplClient

    client = SplClient(timeout=TIMEOUT_S, connect_timeout=TIMEOUT_S)
    try:
        if client.target.source == "configured":
            return None  # no server of ours runs; never list someone else's
        return client.list_sessions()["sessions"] if what == "sessions" else client.list_snapshots()
    finally:
        client.close()


def _local_snapshots() -> list[dict]:
    from superlinear.sessions.snapshots import SnapshotStore

    return SnapshotStore().list()


def _items(records: list[dict], incomplete: str, help_of: Callable[[dict], str]) -> list[CompletionItem]:
    return [CompletionItem(r["id"], help=help_of(r) or None) for r in records
            if isinstance(r.get("id"), str) and r["id"].startswith(incomplete)]


def _session_help(s: dict) -> str:
    return f"{s.get('message_count', 0)} messages, {s.get('position', 0)} tokens"


def _snapshot_help(s: dict) -> str:
    return s.get("title") or ", ".join(s.get("tags") or [])


def _sessions(incomplete: str) -> list[CompletionItem]:
    return _items(_from_server("sessions") or [], incomplete, _session_help)


def _snapshots(incomplete: str) -> list[CompletionItem]:
    records = None
    try:
        records = _from_server("snapshots")
    except Exception:  # noqa: BLE001 - fall back to the store on disk
        records = None
    if records is None:
        records = [m for m in _local_snapshots() if _SESSION_STATE_TAG not in (m.get("tags") or [])]
    return _items(records, incomplete, _snapshot_help)


def _silent(find: Callable[[str], list[CompletionItem]]):
    def complete(ctx, param, incomplete: str) -> list[CompletionItem]:
        try:
            return find(incomplete or "")
        except Exception:  # noqa: BLE001 - a completion never fails out loud
            return []

    return complete


complete_session_ids = _silent(_sessions)
complete_snapshot_ids = _silent(_snapshots)
complete_any_ids = _silent(lambda incomplete: _sessions(incomplete) + _snapshots(incomplete))
