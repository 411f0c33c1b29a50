"""The local background server: start (detached, health-checked), stop (graceful), status,
and ``ensure_server()`` for commands that need a server and should start one if none answers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from superlinear.errors import Conflict, Unavailable, UserError

from . import state
from .api import SplClient
from .options import ServeOptions

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    """Redraw one status line on stderr (a terminal) or print it (a log / pipe)."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + line)
        sys.stderr.flush()
    else:
        print(line, file=sys.stderr, flush=True)


def _end_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


@contextlib.contextmanager
def _start_lock():
    """Serialise starts, so two commands calling ensure_server() at once start one server."""
    with open(state.lock_file(), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def running_local() -> dict | None:
    """``server.json`` of a live local server, or None (a stale file is removed)."""
    info = state.local_server()
    if not info:
        return None
    if not state.pid_alive(info.get("pid")):
        state.clear_local_server()
        return None
    return info


def _tail(path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def wait_until_ready(client: SplClient, pid: int | None = None, timeout: float = 900.0,
                     progress: Progress | None = stderr_progress) -> dict:
    """Poll ``/health`` until the model is loaded; show the server's progress line meanwhile."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if pid is not None and not state.pid_alive(pid):
            log = _tail(state.log_file(), 40).splitlines()
            errors = [line for line in log if "error" in line.lower()]
            why = errors[-1].strip() if errors else (log[-1].strip() if log else "no output")
            raise Unavailable(f"the spl server exited while starting ({why}); see `spl server logs`")
        try:
            health = client.health(timeout=2.0)
        except UserError:
            health = {"status": "starting", "progress": "starting the server"}
        if health.get("status") == "ok":
            if progress and last is not None:
                _end_progress()
            return health
        if health.get("status") == "error":
            raise Unavailable(f"the spl server failed to load the model: {health.get('error')}")
        line = f"spl: {health.get('progress') or health.get('status')}…"
        # On a terminal the line is redrawn with the seconds ticking; in a log, once per stage.
        key = line if sys.stderr.isatty() else re.sub(r" \(\d+s\)", "", line)
        if progress and key != last:
            progress(line)
        last = key
        if time.monotonic() > deadline:
            raise Unavailable(f"the spl server did not become ready in {timeout:.0f}s; see `spl server logs`")
        time.sleep(0.25)


def start(options: ServeOptions, progress: Progress | None = stderr_progress, timeout: float = 900.0) -> dict:
    """Start ``spl serve`` detached (pid + log under the state dir); return once ``/health`` is ok."""
    with _start_lock():
        existing = running_local()
        if existing:
            raise Conflict(f"an spl server is already running (pid {existing['pid']}, {existing['url']}); "
                           "`spl server stop` stops it")
        probe = SplClient(options.url(), api_key=options.api_key)
        try:
            if probe.is_up():
                raise Conflict(f"something already answers at {options.url()}; choose another --port")
        finally:
            probe.close()
        log_path = state.log_file()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if options.api_key:
            env["SPL_API_KEY"] = options.api_key
        else:
            env.pop("SPL_API_KEY", None)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "superlinear.cli.main", "serve", *options.to_args()]
        with open(log_path, "ab") as log:
            log.write(f"\n--- spl server start {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, close_fds=True)
        info = {
            "pid": proc.pid, "url": options.url(), "log": str(log_path), "started_at": time.time(),
            "options": options.as_dict(),
        }
        if options.api_key:
            info["api_key"] = options.api_key
        state.write_local_server(info)
        client = SplClient(options.url(), api_key=options.api_key)
        try:
            health = wait_until_ready(client, pid=proc.pid, timeout=timeout, progress=progress)
        except BaseException:
            _terminate(proc.pid, grace=5.0)
            state.clear_local_server()
            raise
        finally:
            client.close()
        info["health"] = health
        return info


def _terminate(pid: int, grace: float) -> bool:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL. True if it stopped by itself."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not state.pid_alive(pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    return False


def stop(timeout: float = 120.0) -> dict:
    """Stop the local server gracefully: its open sessions are snapshotted before it exits."""
    info = running_local()
    if not info:
        raise Unavailable("no local spl server is running")
    sessions = None
    client = SplClient(info["url"], api_key=info.get("api_key"))
    try:
        sessions = client.health(timeout=2.0).get("sessions")
    except UserError:
        pass
    finally:
        client.close()
    graceful = _terminate(info["pid"], grace=timeout)
    state.clear_local_server()
    return {"pid": info["pid"], "url": info["url"], "graceful": graceful, "sessions": sessions}


def status() -> dict:
    """What runs where: the local server (if any), the connected URL, and its /health."""
    local = running_local()
    connected = state.connected()
    client = SplClient()
    result: dict = {"url": client.base_url, "local": None, "connected": connected.get("url") if connected else None}
    if local:
        result["local"] = {k: local[k] for k in ("pid", "url", "log", "started_at") if k in local}
    try:
        result["health"] = client.health(timeout=3.0)
        result["up"] = result["health"].get("status") == "ok"
    except UserError as exc:
        result["health"] = None
        result["up"] = False
        result["error"] = exc.message
    finally:
        client.close()
    return result


def ensure_server(model: str = "default", progress: Progress | None = stderr_progress,
                  options: ServeOptions | None = None) -> SplClient:
    """A client for a server that answers: the configured one, or a local one started now.

    Uses ``$SPL_SERVER_URL`` / ``spl server connect`` when set (and fails with ``Unavailable`` if
    that server does not answer: a remote server is never replaced by a local one); otherwise
    starts ``spl server start --model MODEL`` in the background, showing a progress line while the
    model loads. The caller owns (and should close) the returned client.
    """
    client = SplClient()
    try:
        health = client.health(timeout=3.0)
    except UserError:
        health = None
    if health and health.get("status") == "ok":
        return client
    if health and health.get("status") in ("loading", "starting"):
        wait_until_ready(client, progress=progress)
        return client
    remote = os.environ.get("SPL_SERVER_URL") or (state.connected() or {}).get("url")
    if remote:
        client.close()
        raise Unavailable(f"the spl server at {remote} does not answer; start it, or "
                          "`spl server connect --forget` to use a local one")
    client.close()
    opts = options or ServeOptions(model=model)
    with _start_lock():
        pass  # wait out a start that another process has under way
    info = running_local()
    if info:
        client = SplClient(info["url"], api_key=info.get("api_key"))
        wait_until_ready(client, pid=info["pid"], progress=progress)
        return client
    try:
        info = start(opts, progress=progress)
    except Conflict:
        info = running_local()  # another process won the race
        if not info:
            raise
    client = SplClient(info["url"], api_key=info.get("api_key"))
    wait_until_ready(client, progress=progress)
    return client
