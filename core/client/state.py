"""Files under ``superlinear.paths.state_dir()`` that say which server the commands talk to.

- ``server.json``: the local server (pid, url, log file, options, started_at, and ``process``:
  its identity, pid + start time + command line, so a pid reused by another process is never
  taken for it), written by ``spl server start`` (or a foreground ``spl serve``) and removed
  by ``spl server stop``;
- ``server.log``: its output;
- ``connect.json``: the URL (and API key) stored by ``spl server connect URL``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from superlinear import process, records
from superlinear.errors import InvalidRequest
from superlinear.paths import state_dir


def _dir() -> Path:
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


def server_file() -> Path:
    return state_dir() / "server.json"


def log_file() -> Path:
    return state_dir() / "server.log"


def lock_file() -> Path:
    return _dir() / "server.lock"


def connect_file() -> Path:
    return state_dir() / "connect.json"


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _write(path: Path, data: dict) -> None:
    _dir()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold an API key
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


class ServerRecord(BaseModel):
    """What ``server.json`` must hold to name a server that can be checked and stopped."""

    model_config = ConfigDict(extra="allow", strict=True)
    pid: Annotated[int, Field(gt=0, lt=1 << 32)]
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    process: dict | None = None
    api_key: Annotated[str, StringConstraints(max_length=4096)] | None = None


MAX_RECORD_BYTES = 1 << 20  # a pid, a URL, the options: a few hundred bytes


def local_server() -> dict | None:
    """``server.json``, or None; a file that is not a ``ServerRecord`` (wrong types, too large,
    nested too deep) is a ``UserError``: it names no process that could be checked or stopped."""
    path = server_file()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidRequest(f"{path} cannot be read ({exc.strerror}); remove the file") from None
    try:
        return records.checked_json(raw[:MAX_RECORD_BYTES + 1], ServerRecord, what="server.json",
                                    max_bytes=MAX_RECORD_BYTES)
    except records.BadRecord as exc:
        raise InvalidRequest(f"{path} is damaged ({exc.message}); no server can be checked or stopped "
                             "through it: remove the file, then stop the server by its pid if one still "
                             "runs") from None


def write_local_server(data: dict) -> None:
    _write(server_file(), data)


def clear_local_server(pid: int | None = None) -> None:
    """Remove ``server.json`` (only if it names ``pid``, when given)."""
    if pid is not None and (_read(server_file()) or {}).get("pid") != pid:
        return
    server_file().unlink(missing_ok=True)


def connected() -> dict | None:
    return _read(connect_file())


def write_connected(url: str, api_key: str | None) -> None:
    data = {"url": url.rstrip("/")}
    if api_key:
        data["api_key"] = api_key
    _write(connect_file(), data)


def clear_connected() -> None:
    connect_file().unlink(missing_ok=True)


def pid_alive(pid: int | None) -> bool:
    if not process.pid_alive(pid):
        return False
    # A zombie child of ours counts as gone.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    return True


# -- the recorded server ------------------------------------------------------------------------
def _looks_like_spl_serve(cmdline: list[str]) -> bool:
    return "serve" in cmdline and any(part.endswith(("spl", "superlinear.cli.main")) for part in cmdline)


def verified_identity(info: dict) -> dict | None:
    """The identity of the live process ``server.json`` names, or None if that process is gone
    or is another one now."""
    ident = info.get("process")
    if isinstance(ident, dict) and ident.get("pid") == info.get("pid"):
        return ident if process.matches(ident) else None
    # A server.json from an older spl holds the pid only: a live `spl serve` with that pid may
    # be anyone's (the pid was reused), so it counts only if the recorded URL's /health answers
    # with that pid, from a process of this user.
    cmdline = process.cmdline(info.get("pid"))
    if not (cmdline and _looks_like_spl_serve(cmdline) and process.owner(info["pid"]) == _user()):
        return None
    import httpx

    try:  # /health needs no key
        confirmed = httpx.get(info["url"].rstrip("/") + "/health", timeout=2.0).json().get("pid") == info["pid"]
    except (httpx.HTTPError, ValueError, AttributeError):
        confirmed = False
    return process.identity(info["pid"]) if confirmed else None


def _user() -> str | None:
    return process.owner(os.getpid())


def running_local() -> dict | None:
    """``server.json`` of our live local server, or None (a stale file is removed)."""
    info = local_server()
    if not info:
        return None
    if verified_identity(info) is None:
        clear_local_server(pid=info.get("pid"))
        return None
    return info
