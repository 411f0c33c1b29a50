"""The command bus: the API's operations (``superlinear.protocol``) and what plugins add,
as small typed commands dispatched through one middleware chain.

A command either carries its behaviour (``run(ctx)``: the API commands run against the API the
context is bound to, in process or over HTTP) or has a handler a plugin registered through the
``register_handlers`` hook. The CLI, the REPL's slash commands, rag and third-party plugins
dispatch the same commands, so an operation is written once and every dispatch gets the same
middleware (outermost first):
- error mapping: library errors a user can cause (missing file, refused connection...)
  become ``UserError`` with one readable line;
- tracing: with ``SPL_TRACE=1`` each dispatch prints ``trace: <command> <status> <ms>`` on stderr.
UI-only actions (the REPL's ``/exit``, ``/max``) are plain methods of their front end.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from superlinear.errors import Unavailable, UserError


@dataclass(frozen=True)
class Command:
    """Base of all bus commands. Subclasses are frozen dataclasses with a dotted ``name``; one
    that implements ``run`` needs no registered handler."""

    name: ClassVar[str] = "command"

    def run(self, ctx: Context) -> Any:
        raise UnknownCommand(f"no handler for command {self.name!r}")

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.name}({fields})"


@dataclass
class Context:
    """What a command runs against: the API (``superlinear.api.Api``; None: none bound)."""

    api: Any = None


Handler = Callable[[Command, Context], Any]
Middleware = Callable[[Command, Context, Callable[[Command, Context], Any]], Any]


class UnknownCommand(UserError):
    pass


class Bus:
    def __init__(self, middleware: tuple[Middleware, ...] = ()) -> None:
        self._handlers: dict[type[Command], Handler] = {}
        self._middleware = list(middleware)

    def register(self, command_type: type[Command], handler: Handler) -> None:
        if command_type in self._handlers:
            raise ValueError(f"a handler for {command_type.name!r} is already registered")
        self._handlers[command_type] = handler

    def dispatch(self, command: Command, ctx: Context | None = None) -> Any:
        ctx = ctx or Context()

        def call_handler(cmd: Command, c: Context) -> Any:
            handler = self._handlers.get(type(cmd))
            return cmd.run(c) if handler is None else handler(cmd, c)

        call = call_handler
        for middleware in reversed(self._middleware):
            call = _bind(middleware, call)
        return call(command, ctx)


def _bind(middleware: Middleware, call_next: Callable) -> Callable:
    return lambda cmd, ctx: middleware(cmd, ctx, call_next)


def as_user_error(exc: BaseException) -> UserError | None:
    """The ``UserError`` (one clear line) for a library error a user can cause, or None."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return UserError(f"no such file or directory: {exc.filename or exc}")
    if isinstance(exc, PermissionError):
        return UserError(f"permission denied: {exc.filename or exc}")
    if isinstance(exc, IsADirectoryError):
        return UserError(f"is a directory: {exc.filename or exc}")
    if isinstance(exc, ConnectionError):
        return Unavailable(f"cannot connect: {exc}")
    # httpx is optional at import time; map its transport errors by name.
    if type(exc).__module__.startswith("httpx") and "Connect" in type(exc).__name__:
        return Unavailable(f"cannot reach the spl server ({exc})")
    return None


def map_errors(command: Command, ctx: Context, call_next) -> Any:
    """Turn errors a user can cause into ``UserError`` with one clear line."""
    try:
        return call_next(command, ctx)
    except UserError:
        raise
    except Exception as exc:
        mapped = as_user_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


def trace(command: Command, ctx: Context, call_next) -> Any:
    if os.environ.get("SPL_TRACE") != "1":
        return call_next(command, ctx)
    start = time.perf_counter()
    status = "error"
    try:
        result = call_next(command, ctx)
        status = "ok"
        return result
    finally:
        ms = (time.perf_counter() - start) * 1000
        print(f"trace: {command.describe()} {status} {ms:.1f} ms", file=sys.stderr)


_bus: Bus | None = None


def get_bus() -> Bus:
    """The process-wide bus with every plugin's handlers and middleware registered."""
    global _bus
    if _bus is not None:
        return _bus
    from superlinear.pluginloader import collect

    bus = Bus((map_errors, trace))
    for plugin, args, kwargs in collect("register_handlers"):
        try:
            bus.register(*args, **kwargs)
        except ValueError as exc:
            print(f"spl: warning: plugin {plugin!r}: {exc}", file=sys.stderr)
    _bus = bus
    return bus


def dispatch(command: Command, ctx: Context | None = None) -> Any:
    return get_bus().dispatch(command, ctx)

