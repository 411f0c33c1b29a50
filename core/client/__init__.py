"""``connect``: the one way to get the API (``superlinear.api.Api``), in this process or from an
spl server, and which server the spl commands use (``status``).

    import superlinear
    api = superlinear.connect("local")                  # the model in this process (LocalApi)
    api = superlinear.connect("http://host:8787")       # that server (RemoteApi)
    api = superlinear.connect()                         # the server the spl commands talk to
    api = superlinear.connect(start=True)               # ... started in the background if none runs

Which server ``connect()`` means: ``$SPL_SERVER_URL`` > ``spl server connect URL`` > your local
server (``superlinear.server_process``) > none: a server that answers on the configured port
without being yours belongs to someone else and is never used unless named.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from superlinear.errors import Conflict, InvalidRequest, Unavailable, UserError

from .target import DEFAULT_URL, Target, resolve_api_key, resolve_target, resolve_url

Progress = Callable[[str], None]

__all__ = ["DEFAULT_URL", "Target", "connect", "no_server_message", "resolve_api_key", "resolve_target",
           "resolve_url", "status"]


def connect(target: str | None = None, *, start: bool = False, api_key: str | None = None,
            progress: Progress | None = None, **options: Any):
    """The API.

    - ``"local"``: a model loaded in this process (``LocalApi``). ``options``: the fields of
      ``superlinear.api.local.LocalOptions`` (the model defaults to ``$SPL_MODEL``, else
      ``"default"``) and ``worker`` (a server passes its own, whose queue it reports while the
      model loads); ``progress(line)`` hears each loading step.
    - a URL: the spl server there (``RemoteApi``); with ``start``, it must answer and is waited
      for while its model loads.
    - None: the server the spl commands talk to. Without one of yours, ``start=True`` starts one
      in the background (``options``: ``model``, ``port``), otherwise ``Unavailable`` says how to.

    For a server, ``options`` may hold ``timeout`` / ``connect_timeout`` (seconds: per read, to
    connect), and ``model`` / ``port``, which a running server must match (``InvalidRequest``).
    The caller closes what it gets (``api.close()``, or ``with connect(...) as api``).
    """
    if target == "local":
        return _local(progress, **options)
    url = target if not target or "://" in target else f"http://{target}"
    http = {k: options.pop(k) for k in ("timeout", "connect_timeout") if k in options}
    if start:
        return _server_ready(url, api_key, progress, http, **options)
    if options:
        raise TypeError(f"connect(): {', '.join(sorted(options))} only with start=True or 'local'")
    chosen = resolve_target(url)
    if chosen.source == "configured":  # no server of yours runs: never use someone else's
        raise Unavailable(no_server_message(chosen.url))
    return _remote(chosen, api_key, http)


def _local(progress: Progress | None, *, worker=None, **options: Any):
    from superlinear.api.local import LocalApi, LocalOptions, open_service
    from superlinear.api.worker import Worker

    options.setdefault("model", os.environ.get("SPL_MODEL") or "default")
    worker = worker or Worker()
    settings = LocalOptions(**options)
    service = worker.call(lambda: open_service(settings, progress))
    return LocalApi(service, worker=worker)


def _remote(target: Target, api_key: str | None, http: dict):
    from superlinear.api.remote import RemoteApi

    return RemoteApi(target.url, resolve_api_key(api_key, target), target=target, **http)


def no_server_message(url: str) -> str:
    """Why a command has no server to talk to, naming what answers at ``url`` if anything does."""
    from superlinear.server_process import describe_other

    base = "no spl server of yours is running (`spl server start` starts one"
    if not local_port_answers(url):
        return base + ", `spl server connect URL` uses another)"
    return (base + f"); {describe_other(url)} answers at {url}, not started by you: "
            f"`spl server connect {url}` to use it")


def local_port_answers(url: str) -> bool:
    from urllib.parse import urlsplit

    from superlinear.server_process import port_taken

    parts = urlsplit(url)
    return parts.port is not None and port_taken(parts.hostname or "127.0.0.1", parts.port)


# -- status -------------------------------------------------------------------------------------
def status() -> dict:
    """What runs where: our local server (if any), the connected URL, and its /health. A server
    that answers where no server of ours runs is reported under ``other``, never as ours."""
    from superlinear import process
    from superlinear.server_process import describe_other, files

    connected = files.connected()
    target = resolve_target()
    client = _remote(target, None, {})
    local = files.running_local() if target.source == "local" else None
    result: dict = {"url": client.base_url, "source": target.source, "local": None,
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
    if health is not None and not _is_ours(target.source, health, local):
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


# -- a server that answers (connect(start=True)) ------------------------------------------------
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


def _ready_client(target: Target, api_key: str | None, progress: Progress | None, http: dict,
                  unreachable: str | None = None):
    """A client for ``target`` and its /health once ready (waits while the model loads).
    ``unreachable`` replaces the message when nothing answers."""
    from superlinear.server_process import wait_until_ready

    client = _remote(target, api_key, http)
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


def _server_ready(url: str | None, api_key: str | None, progress: Progress | None, http: dict, *,
                  model: str | None = None, port: int | None = None, serve_options=None):
    """A client for a server that answers: the one the user named, our local one, or a local one
    started now.

    ``url`` / ``$SPL_SERVER_URL`` / ``spl server connect`` name a server: it must answer (a
    named server is never replaced by a local one). Otherwise our recorded local server is
    used, or ``spl server start`` runs in the background (model and port from ``model``/``port``,
    else the environment, the config file, the defaults), showing a progress line while the
    model loads. ``model`` / ``port``, when given, must match a server that runs already
    (``InvalidRequest``).
    """
    from superlinear.server_process import end_progress, files, start, start_lock
    from superlinear.settings.options import resolve_options

    target = resolve_target(url)
    if target.chosen:
        if port is not None:
            raise InvalidRequest(f"--port is for a local server; this command talks to {target.url} "
                                 f"({target.source})", param="port")
        unreachable = None if target.source == "argument" else (
            f"the spl server at {target.url} ({target.source}) does not answer; start it, or "
            "`spl server connect --forget` to use a local one")
        client, health = _ready_client(target, api_key, progress, http, unreachable=unreachable)
        _checked(client, lambda: check_model(model, health, target.url))
        return client
    with start_lock():
        pass  # wait out a start that another process has under way
    info = files.running_local()
    if info is None:
        opts, sources = (serve_options, {}) if serve_options else resolve_options(model=model, port=port)
        try:
            info = start(opts, progress=progress, port_chosen=sources.get("port", "flag") != "default")
        except Conflict:
            info = files.running_local()  # another process won the race
            if not info:
                raise
        else:
            if progress is not None:  # a first run: say where the server is and how to leave it
                end_progress()
                print(f"spl: server started at {info['url']} (pid {info['pid']}); it keeps running for the next "
                      "command: `spl chat` to chat, `spl server stop` to stop it", file=sys.stderr, flush=True)
    return _use_local(info, model, port, progress, http)


def _use_local(info: dict, model: str | None, port: int | None, progress: Progress | None, http: dict):
    from superlinear.server_process import describe_other, wait_until_ready

    url = info["url"]
    if port is not None and not url.endswith(f":{port}"):
        raise InvalidRequest(f"your local spl server runs at {url} (pid {info['pid']}), not on port {port}: "
                             "drop --port, or `spl server stop` first", param="port")
    client = _remote(Target(url, "local"), info.get("api_key"), http)

    def verify() -> None:
        health = wait_until_ready(client, pid=info["pid"], progress=progress)  # it may still be starting
        if health.get("pid") not in (None, info["pid"]):
            raise Unavailable(f"{describe_other(url, health)} answers at {url}, not your server (pid "
                              f"{info['pid']}); see `spl server status`")
        check_model(model, health, url, served=(info.get("options") or {}).get("model"), local=True)

    _checked(client, verify)
    return client


def _checked(client, check: Callable[[], None]) -> None:
    try:
        check()
    except BaseException:
        client.close()
        raise
