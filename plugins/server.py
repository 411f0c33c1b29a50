"""Built-in plugin ``server``: ``spl server start|status|stop|logs|connect|config``: the local
server's process (``superlinear.server_process``) and which server the other commands talk to
(``superlinear.client``)."""

from __future__ import annotations

import dataclasses
import time

import click

from superlinear.api.remote import server_root
from superlinear.client import connect, resolve_url, status
from superlinear.errors import Conflict, InvalidRequest, UserError
from superlinear.hookspecs import hookimpl
from superlinear.output import emit, json_option
from superlinear.server_process import files, running_local, start, stop
from superlinear.settings.options import ServeOptions, resolve_options, server_options


# -- what the commands do -------------------------------------------------------------------
def remember_server(url: str | None, api_key: str | None = None, forget: bool = False) -> dict:
    """Point the other commands at the server at ``url`` (``forget``: back to the local one)."""
    if forget:
        files.clear_connected()
        return {"url": resolve_url(), "connected": None}
    if not url:
        raise InvalidRequest("give the server URL, e.g. `spl server connect http://host:8787`")
    url = server_root(url)
    with connect(url, api_key=api_key) as client:
        health = client.health(timeout=5.0)
    files.write_connected(url, api_key)
    return {"url": url, "connected": url, "health": health}


def effective_config() -> dict:
    """The effective server settings, where each comes from, and the config file."""
    from superlinear.settings.config import BY_NAME, config_path

    options, sources = resolve_options()
    values = dataclasses.asdict(options)
    if values.get("api_key"):
        values["api_key"] = "***"  # set, not shown
    settings = {name: {"value": values[name], "source": sources[name], "env": BY_NAME[name].env}
                for name in BY_NAME}
    path = config_path()
    result = {"config_file": str(path), "config_file_exists": path.is_file(), "settings": settings,
              "url": options.url()}
    _with_running_server(result, sources)
    return result


def _with_running_server(result: dict, sources: dict) -> None:
    """Where your local server runs on another port than the settings say (the default port was
    taken when it started), the commands use its port: say so, rather than show the default."""
    from urllib.parse import urlparse

    try:
        local = running_local()
    except UserError:
        return
    if not local:
        return
    result["running"] = {"url": local["url"], "pid": local["pid"]}
    port = urlparse(local["url"]).port
    if port and port != result["settings"]["port"]["value"] and sources["port"] == "default":
        result["settings"]["port"].update(value=port, source="running")
        result["url"] = local["url"]


# -- click -----------------------------------------------------------------------------------
@click.group("server")
def server_group() -> None:
    """Run spl in the background, or point the other commands at a server."""


@server_group.command("start")
@json_option
@server_options
def start_command(options: ServeOptions, option_sources: dict, as_json: bool) -> None:
    """Start a background server (returns once the model is loaded); with one running already,
    say where (exit 0)."""
    try:
        info = start(options, port_chosen=option_sources["port"] != "default")
    except Conflict:
        running = running_local()
        if running is None:
            raise
        _already_running(running, options, option_sources, as_json)
        return
    info.pop("api_key", None)
    health = info.get("health") or {}
    restored = health.get("sessions")
    extra = f", {restored} session(s)" if restored else ""
    emit(info, as_json, f"spl server running at {info['url']} (pid {info['pid']}, model {health.get('model', '?')}"
                         f"{extra}); logs: {info['log']}")


def _already_running(running: dict, options: ServeOptions, sources: dict, as_json: bool) -> None:
    """A start while your server runs does nothing, unless it asked for another model or port
    than that server's (then that server would have to stop first: exit 2)."""
    served = running.get("options") or {}
    for name in ("model", "port"):
        if sources.get(name) not in (None, "default") and served.get(name) not in (None, getattr(options, name)):
            raise Conflict(f"your spl server runs at {running['url']} (pid {running['pid']}) with {name} "
                           f"{served[name]!r}, not {getattr(options, name)!r}: `spl server stop` first")
    info = {k: v for k, v in running.items() if k != "api_key"}
    emit({**info, "already_running": True}, as_json,
         f"spl server already running at {running['url']} (pid {running['pid']}, model {served.get('model', '?')}); "
         "`spl server stop` stops it")


@server_group.command("stop")
@json_option
def stop_command(as_json: bool) -> None:
    """Stop the local server; its sessions are snapshotted and come back on the next start."""
    result = stop()
    how = "stopped" if result["graceful"] else "killed (did not stop in time)"
    saved = f"; {result['sessions']} session(s) saved" if result.get("sessions") else ""
    emit(result, as_json, f"spl server (pid {result['pid']}) {how}{saved}")


@server_group.command("status")
@json_option
def status_command(as_json: bool) -> None:
    """Which server the commands use, and whether it answers (exit 1 if not)."""
    result = status()
    emit(result, as_json, None if as_json else format_status(result))
    if not result["up"]:
        raise SystemExit(1)


def format_status(result: dict) -> str:
    lines = []
    health = result.get("health") or {}
    other = result.get("other")
    if result["up"]:
        uptime = health.get("uptime_s")
        lines.append(f"up: {result['url']}  model {health.get('model')}  sessions {health.get('sessions')}"
                     f"  queue {health.get('queued', 0)}  threads {health.get('threads')}"
                     + (f"  uptime {uptime:.0f}s" if uptime else ""))
        sched = health.get("scheduler")
        if sched:
            lines.append(f"scheduler: {sched.get('running')} running ({sched.get('decoding')} decoding, "
                         f"{sched.get('prefilling')} prefilling), {sched.get('waiting')} waiting, last batch "
                         f"{sched.get('batch')}, {sched.get('max_step_tokens')} prefill tokens per step")
    elif other:
        lines.append(f"down: no spl server of yours is running; {other['description']} answers at {other['url']}, "
                     f"not started by you (`spl server connect {other['url']}` to use it)")
    elif health:
        lines.append(f"{health.get('status')}: {result['url']}  {health.get('progress') or ''}".rstrip())
    else:
        lines.append(f"down: {result['url']} ({result.get('error', 'no answer')})")
    if result.get("local"):
        local = result["local"]
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(local.get("started_at", 0)))
        where = "in the foreground" if local.get("foreground") else f"log {local.get('log')}"
        lines.append(f"local server: pid {local['pid']}, started {since}, {where}")
    if result.get("connected"):
        lines.append(f"connected to: {result['connected']} (`spl server connect --forget` to undo)")
    return "\n".join(lines)


@server_group.command("logs")
@click.option("-n", "--lines", "n", type=int, default=50, show_default=True, help="Lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
def logs_command(n: int, follow: bool) -> None:
    """Show the background server's log."""
    path = files.log_file()
    if not path.exists():
        raise UserError(f"no server log yet ({path}); `spl server start` writes it")
    with open(path, errors="replace") as f:
        lines = f.readlines()
        click.echo("".join(lines[-n:]) if n > 0 else "", nl=False)
        while follow:
            line = f.readline()
            if line:
                click.echo(line, nl=False)
            else:
                time.sleep(0.3)


@server_group.command("connect")
@click.argument("url", required=False)
@click.option("--api-key", default=None, help="API key the server requires (stored with the URL).")
@click.option("--forget", is_flag=True, help="Forget the stored URL (use the local server again).")
@json_option
def connect_command(url: str | None, api_key: str | None, forget: bool, as_json: bool) -> None:
    """Make the other commands talk to the server at URL."""
    result = remember_server(url, api_key=api_key, forget=forget)
    if forget:
        text = f"forgot the stored server; commands now use {result['url']}"
    else:
        health = result.get("health") or {}
        text = f"connected to {result['url']} ({health.get('status')}, model {health.get('model')})"
    emit(result, as_json, text)


@server_group.command("config")
@json_option
def config_command(as_json: bool) -> None:
    """Show the server settings in effect and where each comes from (flag > env > config file > default)."""
    result = effective_config()
    exists = "" if result["config_file_exists"] else " (none)"
    lines = [f"config file: {result['config_file']}{exists}"]
    for name, item in result["settings"].items():
        value = "-" if item["value"] is None else item["value"]
        lines.append(f"{name:<16} {value!s:<24} {item['source']:<10} (${item['env']})".rstrip())
    if result.get("running"):
        lines.append(f"your server runs at {result['running']['url']} (pid {result['running']['pid']})")
    emit(result, as_json, "\n".join(lines))


@hookimpl
def register_commands(register):
    from superlinear.client.url_option import with_url_option

    with_url_option(status_command)  # which server answers there
    register(server_group)
