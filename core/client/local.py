"""The local server: start (detached, health-checked), stop (graceful), status, and
``ensure_server()`` for commands that need a server and should start one if none answers.

"Ours" is the server recorded in the state dir's ``server.json``, and only while the process
with the recorded pid is still the one recorded (start time + command line; a pid reused by
another process is never signalled or waited for) and its ``/health`` reports that pid. A
server that answers on the configured port without being ours belongs to someone else: no
command uses it unless the user points at it (``spl server connect URL``, ``$SPL_SERVER_URL``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from superlinear import process
from superlinear.errors import Conflict, InvalidRequest, Unavailable, UserError
from superlinear.settings.options import ServeOptions, resolve_options

from . import state
from .api import SplClient, resolve_api_key, resolve_target
from .state import running_local, verified_identity

Progress = Callable[[str], None]

# Set for the `spl serve` that `spl server start` launches: the parent writes server.json.
DETACHED_ENV = "SPL_SERVE_DETACHED"


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


def _record(pid: int, url: str, options: ServeOptions, cmdline: list[str] | None = None, **extra) -> dict:
    info = {"pid": pid, "url": url, "started_at": time.time(), "options": options.as_dict(),
            "process": process.identity(pid, cmdline=cmdline), **extra}
    if options.api_key:
        info["api_key"] = options.api_key
    return info


@contextlib.contextmanager
def registered(options: ServeOptions):
    """While a foreground ``spl serve`` runs, record it in ``server.json`` (unless a local
    server is recorded already), so the other commands use it and ``spl server stop`` stops it."""
    if os.environ.get(DETACHED_ENV) == "1":
        yield None  # launched by `spl server start`, which records it
        return
    with _start_lock():
        existing = running_local()
        if existing is None:
            state.write_local_server(_record(os.getpid(), options.url(), options, foreground=True))
    if existing is not None:
        print(f"spl: note: your local server at {existing['url']} (pid {existing['pid']}) stays the one the "
              f"other commands use; point them here with SPL_SERVER_URL={options.url()}", flush=True)
    try:
        yield existing
    finally:
        if existing is None:
            state.clear_local_server(pid=os.getpid())


# -- what answers on a port ---------------------------------------------------------------------
def _bind_host(host: str) -> str:
    return "" if host in ("0.0.0.0", "::") else host


def port_taken(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails (uvicorn binds with SO_REUSEADDR too, so a port in
    TIME_WAIT counts as free)."""
    if port == 0:
        return False
    try:
        with socket.create_server((_bind_host(host), port)):
            return False
    except OSError:
        return True


def free_port(host: str) -> int:
    with socket.create_server((_bind_host(host), 0)) as s:
        return s.getsockname()[1]


def describe_other(url: str, health: dict | None = None) -> str:
    """``another spl server (pid 123, user bob, model default)`` or ``another program``."""
    if health is None:
        try:
            with SplClient(url, api_key="") as probe:
                health = probe.health(timeout=1.0)
        except UserError:
            return "another program"
    pid = health.get("pid")
    user = process.owner(pid) if isinstance(pid, int) else None
    parts = [f"pid {pid}" if pid else None, f"user {user}" if user else None,
             f"model {health.get('model')}" if health.get("model") else None]
    details = ", ".join(p for p in parts if p)
    return f"another spl server ({details})" if details else "another spl server"


def _choose_port(options: ServeOptions, port_chosen: bool) -> ServeOptions:
    """``options`` with a port we can bind: the chosen one, or (when the port was not chosen and
    the default one is taken by someone else) a free one, said on stderr."""
    if options.port == 0:
        return dataclasses.replace(options, port=free_port(options.host))
    if not port_taken(options.host, options.port):
        return options
    what = describe_other(options.url())
    if port_chosen:
        raise Conflict(f"port {options.port} is taken by {what}, not a server of yours; choose another "
                       "port (--port, $SPL_PORT or [server] port in the config file)")
    chosen = dataclasses.replace(options, port=free_port(options.host))
    print(f"spl: port {options.port} is taken by {what}; starting your server at {chosen.url()} "
          "(--port or $SPL_PORT chooses the port)", file=sys.stderr, flush=True)
    return chosen


# -- start, wait, stop --------------------------------------------------------------------------
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
        line = f"spl: {_conversion_bar(health.get('conversion'))}{health.get('progress') or health.get('status')}…"
        # On a terminal the line is redrawn with the seconds ticking; in a log, once per stage.
        key = line if sys.stderr.isatty() else re.sub(r" \(\d+s\)", "", line)
        if progress and key != last:
            progress(line)
        last = key
        if time.monotonic() > deadline:
            raise Unavailable(f"the spl server did not become ready in {timeout:.0f}s; see `spl server logs`")
        time.sleep(0.25)


def _conversion_bar(conversion) -> str:
    """``[#####-----] `` for the default model's one-time conversion (its steps done so far)."""
    try:
        done, total = int(conversion["step"]) - 1, int(conversion["steps"])
    except (TypeError, KeyError, ValueError):
        return ""
    width = 20
    filled = width * max(0, min(done, total)) // max(total, 1)
    return f"[{'#' * filled}{'-' * (width - filled)}] "


def start(options: ServeOptions, progress: Progress | None = stderr_progress, timeout: float = 900.0,
          port_chosen: bool = True) -> dict:
    """Start ``spl serve`` detached (pid + log under the state dir); return once ``/health`` is ok.

    ``port_chosen=False`` (the port is the built-in default): if someone else holds it, a free
    port is used instead, and remembered in ``server.json`` like any other.
    """
    with _start_lock():
        existing = running_local()
        if existing:
            raise Conflict(f"an spl server is already running (pid {existing['pid']}, {existing['url']}); "
                           "`spl server stop` stops it")
        options = _choose_port(options, port_chosen)
        log_path = state.log_file()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if options.api_key:
            env["SPL_API_KEY"] = options.api_key
        else:
            env.pop("SPL_API_KEY", None)
        env["PYTHONUNBUFFERED"] = "1"
        env[DETACHED_ENV] = "1"
        cmd = [sys.executable, "-m", "superlinear.cli.main", "serve", *options.to_args()]
        with open(log_path, "ab") as log:
            log.write(f"\n--- spl server start {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, close_fds=True)
        info = _record(proc.pid, options.url(), options, cmdline=cmd, log=str(log_path))
        state.write_local_server(info)
        client = SplClient(options.url(), api_key=options.api_key)
        try:
            health = wait_until_ready(client, pid=proc.pid, timeout=timeout, progress=progress)
        except BaseException:
            _stop_child(proc, grace=5.0)
            state.clear_local_server(pid=proc.pid)
            raise
        finally:
            client.close()
        info["health"] = health
        return info


def _stop_child(proc: subprocess.Popen, grace: float) -> None:
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)


def stop(timeout: float = 120.0) -> dict:
    """Stop the local server gracefully: its open sessions are snapshotted before it exits."""
    recorded = state.local_server()
    info = running_local()
    ident = verified_identity(info) if info else None
    if not info or ident is None:
        if recorded and recorded.get("pid"):
            raise Unavailable(f"no local spl server is running (pid {recorded['pid']} in {state.server_file()} "
                              "is not the spl server recorded there any more; it was left alone and the "
                              "stale file removed)")
        raise Unavailable("no local spl server is running")
    sessions = None
    client = SplClient(info["url"], api_key=info.get("api_key"))
    try:
        sessions = client.health(timeout=2.0).get("sessions")
    except UserError:
        pass
    finally:
        client.close()
    graceful = process.terminate(ident, grace=timeout)
    state.clear_local_server(pid=info["pid"])
    return {"pid": info["pid"], "url": info["url"], "graceful": graceful, "sessions": sessions}


# -- status -------------------------------------------------------------------------------------
def status() -> dict:
    """What runs where: our local server (if any), the connected URL, and its /health. A server
    that answers where no server of ours runs is reported under ``other``, never as ours."""
    connected = state.connected()
    client = SplClient()
    local = running_local() if client.target.source == "local" else None
    result: dict = {"url": client.base_url, "source": client.target.source, "local": None,
                    "connected": connected.get("url") if connected else None}
    if local:
        result["local"] = {k: local[k] for k in ("pid", "url", "log", "started_at", "foreground") if k in local}
    try:
        health = client.health(timeout=3.0)
    except UserError as exc:
        health = None
        result["error"] = exc.message
    finally:
        client.close()
    if health is not None and not _is_ours(client.target.source, health, local):
        result["other"] = {"url": client.base_url, "pid": health.get("pid"), "model": health.get("model"),
                           "user": process.owner(health.get("pid")) if isinstance(health.get("pid"), int) else None,
                           "description": describe_other(client.base_url, health)}
        result["error"] = "no spl server of yours is running"
        health = None
    result["health"] = health
    result["up"] = bool(health) and health.get("status") == "ok"
    return result


def _is_ours(source: str, health: dict, local: dict | None) -> bool:
    if source == "configured":
        return False  # nothing of ours is recorded, so whatever answers is someone else's
    if source == "local" and local is not None:
        return health.get("pid") in (None, local["pid"])
    return True  # a server the user pointed at


# -- ensure_server ------------------------------------------------------------------------------
def check_model(requested: str | None, health: dict, url: str, served: str | None = None,
                local: bool = False) -> None:
    """Refuse a ``--model`` the running server does not serve (``served``: the spec it was
    started with, when known)."""
    if requested is None:
        return
    names = {health.get("model"), served}
    if requested in names or (served and os.path.exists(requested) and os.path.exists(served)
                              and os.path.samefile(requested, served)):
        return
    current = health.get("model") or served or "?"
    how = (f"`spl server stop`, then start it with --model {requested}" if local
           else "start a server with that model and point to it")
    raise InvalidRequest(f"the spl server at {url} serves model {current!r}, not {requested!r}: drop --model, "
                         f"or {how}", param="model")


def _ready_client(url: str, api_key: str | None, progress: Progress | None, unreachable: str | None = None):
    """A client for ``url`` and its /health once ready (waits while the model loads).
    ``unreachable`` replaces the message when nothing answers."""
    client = SplClient(url, api_key=api_key)
    try:
        try:
            health = client.health(timeout=5.0)  # Unavailable with a clear line when nothing answers
        except Unavailable:
            if unreachable is None:
                raise
            raise Unavailable(unreachable) from None
        if health.get("status") in ("loading", "starting"):
            health = wait_until_ready(client, progress=progress)
        elif health.get("status") != "ok":
            raise Unavailable(f"the spl server at {client.base_url} is not ready: {health.get('status')}")
    except BaseException:
        client.close()
        raise
    return client, health


def ensure_server(model: str | None = None, progress: Progress | None = stderr_progress,
                  options: ServeOptions | None = None, url: str | None = None,
                  port: int | None = None) -> SplClient:
    """A client for a server that answers: the one the user named, our local one, or a local one
    started now.

    ``url`` / ``$SPL_SERVER_URL`` / ``spl server connect`` name a server: it must answer (a
    named server is never replaced by a local one). Otherwise our recorded local server is
    used, or ``spl server start`` runs in the background (model and port from ``model``/``port``,
    else the environment, the config file, the defaults), showing a progress line while the
    model loads. ``model`` / ``port``, when given, must match a server that runs already
    (``InvalidRequest``). The caller owns (and should close) the returned client.
    """
    target = resolve_target(url)
    if target.chosen:
        if port is not None:
            raise InvalidRequest(f"--port is for a local server; this command talks to {target.url} "
                                 f"({target.source})", param="port")
        unreachable = None if target.source == "argument" else (
            f"the spl server at {target.url} ({target.source}) does not answer; start it, or "
            "`spl server connect --forget` to use a local one")
        client, health = _ready_client(target.url, resolve_api_key(None, target), progress, unreachable=unreachable)
        _checked(client, lambda: check_model(model, health, target.url))
        return client
    with _start_lock():
        pass  # wait out a start that another process has under way
    info = running_local()
    if info is None:
        opts, sources = (options, {}) if options else resolve_options(model=model, port=port)
        try:
            info = start(opts, progress=progress, port_chosen=sources.get("port", "flag") != "default")
        except Conflict:
            info = running_local()  # another process won the race
            if not info:
                raise
        else:
            if progress is not None:  # a first run: say where the server is and how to leave it
                _end_progress()
                print(f"spl: server started at {info['url']} (pid {info['pid']}); it keeps running for the next "
                      "command: `spl chat` to chat, `spl server stop` to stop it", file=sys.stderr, flush=True)
    return _use_local(info, model, port, progress)


def _use_local(info: dict, model: str | None, port: int | None, progress: Progress | None) -> SplClient:
    url = info["url"]
    if port is not None and not url.endswith(f":{port}"):
        raise InvalidRequest(f"your local spl server runs at {url} (pid {info['pid']}), not on port {port}: "
                             "drop --port, or `spl server stop` first", param="port")
    client = SplClient(url, api_key=info.get("api_key"))

    def verify() -> None:
        health = wait_until_ready(client, pid=info["pid"], progress=progress)  # it may still be starting
        if health.get("pid") not in (None, info["pid"]):
            raise Unavailable(f"{describe_other(url, health)} answers at {url}, not your server (pid "
                              f"{info['pid']}); see `spl server status`")
        check_model(model, health, url, served=(info.get("options") or {}).get("model"), local=True)

    _checked(client, verify)
    return client


def _checked(client: SplClient, check: Callable[[], None]) -> None:
    try:
        check()
    except BaseException:
        client.close()
        raise
