"""How a command prints its result: one JSON document with ``--json`` (``json_option``), else
text made from the result. Every command that returns a result prints it through ``emit``, so
``--json`` means the same everywhere; the tables and lines of the API's results (sessions,
snapshots, a transcript) are here too, so the CLI and the chat REPL show them alike."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from typing import Any

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def emit(result: Any, as_json: bool, text: str | Callable[[Any], str] | None = None) -> None:
    """Print ``result`` as JSON, or ``text`` (a string, or a function of the result)."""
    if not emit_json(result, as_json):
        click.echo(text(result) if callable(text) else text)


def emit_json(result: Any, as_json: bool) -> bool:
    """With ``as_json``, print ``result`` as one JSON document (non-ASCII text as it is) and say
    so; a command that prints its text line by line returns then."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str, ensure_ascii=False))
    return as_json


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


def _session_row(s: dict) -> tuple:
    state = "busy" if s.get("busy") else ("live" if s.get("resident", True) else "on disk")
    return (s["id"], f"{s.get('position', 0)}/{s.get('max_seq_len', '?')}", str(s.get("message_count", 0)),
            format_bytes(s.get("bytes")), state, _when(s.get("last_used")))


def session_table(sessions: list[dict]) -> str:
    return _table(("SESSION", "TOKENS", "MESSAGES", "MEMORY", "STATE", "LAST USED"), sessions, _session_row,
                  "no sessions")


def _snapshot_row(s: dict) -> tuple:
    session = s.get("session") or {}
    return (s["id"], (s.get("title") or "")[:40], str(session.get("position", "-")),
            format_bytes(s.get("bytes")), ",".join(s.get("tags") or []), _when(s.get("created_at")))


def snapshot_table(snaps: list[dict]) -> str:
    return _table(("SNAPSHOT", "TITLE", "TOKENS", "SIZE", "TAGS", "CREATED"), snaps, _snapshot_row, "no snapshots")


def _table(header: tuple[str, ...], items: list[dict], row: Callable[[dict], tuple], empty: str) -> str:
    """One line per item (``row`` gives its cells) under ``header``, each column as wide as its
    widest cell; ``empty`` when there are no items."""
    if not items:
        return empty
    rows = [header, *map(row, items)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
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


def key_values(d: dict) -> str:
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


def as_listing(items: list[dict], **extra) -> dict:
    """A listing in the one shape the HTTP API and every ``--json`` give it:
    ``{"object": "list", "data": [...], ...}`` (a session listing adds count, bytes, resident and
    memory_budget)."""
    return {"object": "list", "data": items, **extra}


def session_listing(listing: dict) -> dict:
    """``ListSessions``' result (``{"sessions": [...], "count", ...}``) as ``GET /v1/sessions`` gives it."""
    return as_listing(listing["sessions"], **{k: v for k, v in listing.items() if k != "sessions"})
