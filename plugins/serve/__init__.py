"""Built-in plugin ``serve``: the OpenAI-compatible HTTP server and ``spl serve``.

``create_app(Runtime(options))`` builds the FastAPI app (see ``app.py`` for the routes,
docs/server.md for the API). FastAPI and the model are imported only when a server starts,
so ``spl --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from superlinear.bus import Command, Context, dispatch
from superlinear.hookspecs import hookimpl
from superlinear.plugins.client.options import ServeOptions, server_options


@dataclass(frozen=True)
class Serve(Command):
    name = "server.serve"
    options: ServeOptions = ServeOptions()


def build_app(options: ServeOptions):
    """The FastAPI app for ``options`` (the model loads in the background once it starts)."""
    from .app import create_app
    from .runtime import Runtime

    return create_app(Runtime(options))


def _exit_on_load_error(server, runtime) -> None:
    def stop(error: str) -> None:
        print(f"spl: error: cannot load model {runtime.options.model!r}: {error}", flush=True)
        server.should_exit = True

    runtime.on_load_error = stop


def serve(command: Serve, ctx: Context) -> int:
    import logging

    import uvicorn

    from superlinear.plugins.client.local import registered

    options = command.options
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(options)
    auth = "API key required" if options.api_key else "no API key"
    print(f"spl: serving {options.model} on {options.url()} ({auth}); loading the model…", flush=True)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            timeout_graceful_shutdown=5, lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    runtime = app.state.runtime
    _exit_on_load_error(server, runtime)
    with registered(options):  # server.json names this process while it serves
        server.run()
    if runtime.error is not None or not server.started:
        return 2
    return 0


@click.command("serve")
@server_options
def serve_command(options: ServeOptions) -> None:
    """Run the OpenAI-compatible server in the foreground (Ctrl-C stops it; sessions are saved)."""
    code = dispatch(Serve(options=options))
    if code:
        raise SystemExit(code)


@hookimpl
def register_commands(register):
    register(serve_command)


@hookimpl
def register_handlers(register):
    register(Serve, serve)
