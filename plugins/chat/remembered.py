"""What the REPL remembers between runs, under ``superlinear.paths.state_dir()``.

- ``chat.json``: the last session per REPL (``"chat"``, ``"docs:NAME"`` …) and server URL, so
  ``spl chat`` resumes where it stopped;
- ``history/NAME``: prompt_toolkit's input history, one file per REPL.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from superlinear import paths


def _state_file() -> Path:
    return paths.state_dir() / "chat.json"


def _read() -> dict:
    try:
        data = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def last_session(name: str, url: str | None = None) -> str | None:
    """The session the REPL ``name`` used last (on server ``url`` when given)."""
    entry = _read().get("last_sessions", {}).get(name)
    if not isinstance(entry, dict):
        return None
    if url is not None and entry.get("url") not in (None, url):
        return None
    session_id = entry.get("session_id")
    return session_id if isinstance(session_id, str) and session_id else None


def remember_session(name: str, session_id: str | None, url: str | None = None) -> None:
    """Record (atomically) the current session of REPL ``name``; errors are ignored."""
    data = _read()
    sessions = data.setdefault("last_sessions", {})
    if session_id is None:
        sessions.pop(name, None)
    else:
        sessions[name] = {"session_id": session_id, "url": url}
    _write(data)


def remember_max_tokens(name: str, max_tokens: int | None) -> None:
    """Record the reply cap ``/max`` set in REPL ``name`` (None: no cap), for its next start."""
    data = _read()
    data.setdefault("max_tokens", {})[name] = max_tokens or 0  # 0: no cap, as a user types it
    _write(data)


def remembered_max_tokens(name: str) -> int | None:
    """The cap ``/max`` last set in REPL ``name``: tokens, 0 for no cap, None if never set."""
    value = _read().get("max_tokens", {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _write(data: dict) -> None:
    path = _state_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only state dir must not break chatting


def history_file(name: str) -> Path | None:
    """Input-history file for REPL ``name`` (``None`` when the state dir is not writable)."""
    safe = re.sub(r"[^\w.-]+", "_", name) or "chat"
    directory = paths.state_dir() / "history"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return directory / safe
