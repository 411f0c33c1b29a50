"""Built-in plugin ``serve``: the OpenAI-compatible HTTP server and ``spl serve``.

``create_app(Runtime(options))`` builds the FastAPI app (see ``app.py`` for the routes,
docs/server.md for the API). FastAPI and the model are imported only when a server starts,
so ``spl --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import replace

import click

from superlinear.hookspecs import hookimpl
from superlinear.settings.options import ServeOptions, server_options
from superlinear.settings.threads import default_threads, limit_threads_before_torch


def build_app(options: ServeOptions):
    """The FastAPI app for ``options`` (the model loads in the background once it starts)."""
    from .app import create_app
    from .runtime import Runtime

    return create_app(Runtime(options))


def _exit_on_load_error(server, runtime) -> None:
    def stop(error: str) -> None:
        server.should_exit = True  # the error is the last line, once uvicorn has shut down

    runtime.on_load_error = stop


def check_model_known(spec: str) -> None:
    """Raise ``NotFound`` if no loader knows ``spec``; checked before the port is bound, so a
    typo costs one error line (exit 2), not a server that starts and stops. Asking the loaders
    (``can_load``) imports no torch, so the port is still bound at once for a good spec."""
    from superlinear.model.registry import find_loader
    from superlinear.pluginloader import model_loaders

    if find_loader(spec, model_loaders()) is not None:
        return
    from superlinear.model.registry import load_model

    load_model(spec)  # no loader matches: raises its "unknown model" error, loads nothing


def _server_class():
    """uvicorn's server, stopping the same clean way on SIGTERM, SIGINT and SIGHUP.

    uvicorn handles SIGINT and SIGTERM only, and once it has shut down it raises the signal again,
    so the process dies of it (exit -15) before ``serve`` removes its record from server.json;
    SIGHUP (a closed terminal) would kill it at once, with no sessions saved. Here all three set
    ``should_exit`` (a second SIGINT forces the exit, as in uvicorn) and nothing is raised again."""
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def serve(options: ServeOptions) -> int:
    """Serve in the foreground until stopped; the exit code (a failed start raises ``UserError``)."""
    import logging

    import uvicorn

    from superlinear.client.local import registered
    from superlinear.paths import snapshots_dir

    from .store_lock import lock_store

    check_model_known(options.model)
    options = replace(options, threads=options.threads or default_threads())
    limit_threads_before_torch(options.threads)
    store_lock = lock_store(snapshots_dir(), options.url())  # one server per session store
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(options)
    auth = "API key required" if options.api_key else "no API key"
    print(f"spl: serving {options.model} on {options.url()} ({auth}); loading the model…", flush=True)
    from .framing import OpenAIErrorsH11Protocol

    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            timeout_graceful_shutdown=5, lifespan="on", access_log=False,
                            http=OpenAIErrorsH11Protocol)
    server = _server_class()(config)
    runtime = app.state.runtime
    _exit_on_load_error(server, runtime)
    with store_lock, registered(options):  # server.json names this process while it serves
        server.run()
    if runtime.error is not None:
        from superlinear.errors import UserError

        raise UserError(f"{runtime.failed_step or 'starting'} failed: {runtime.error}")
    if not server.started:
        return 2
    return 0


@click.command("serve")
@server_options
def serve_command(options: ServeOptions) -> None:
    """Run the OpenAI-compatible server in the foreground (Ctrl-C stops it; sessions are saved)."""
    code = serve(options)
    if code:
        raise SystemExit(code)


@hookimpl
def register_commands(register):
    register(serve_command)

