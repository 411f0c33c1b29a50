"""The REPL-only bus commands (``chat.*``) and their handlers.

Like every spl feature they are bus commands, so middleware (errors, tracing, timing) wraps
them and other front ends could reuse them; the REPL they act on travels in the dispatch
context: ``Context(origin="repl", state={"repl": repl})``. Dispatched without a REPL they fail
with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

from superlinear.bus import Command, Context
from superlinear.errors import InvalidRequest


def _repl(ctx: Context):
    repl = ctx.state.get("repl") if ctx else None
    if repl is None:
        raise InvalidRequest("this command only works inside `spl chat`")
    return repl


@dataclass(frozen=True)
class ChatHelp(Command):
    name = "chat.help"
    topic: str = ""


@dataclass(frozen=True)
class ChatNew(Command):
    """Start a fresh session (the settings — system prompt, temperature — carry over)."""

    name = "chat.new"
    session_id: str | None = None


@dataclass(frozen=True)
class ChatSwitch(Command):
    name = "chat.switch"
    session_id: str = ""


@dataclass(frozen=True)
class ChatSystem(Command):
    """Show (``text=None``), set, or clear (``clear=True``) the system prompt."""

    name = "chat.system"
    text: str | None = None
    clear: bool = False


@dataclass(frozen=True)
class ChatTemperature(Command):
    name = "chat.temperature"
    value: float | None = None  # None: show


@dataclass(frozen=True)
class ChatMaxTokens(Command):
    """Show (``value=None``), set, or lift (``value=0``) the cap on tokens per reply."""

    name = "chat.max_tokens"
    value: int | None = None


@dataclass(frozen=True)
class ChatThink(Command):
    """``mode``: ``"on"`` (show reasoning, dimmed), ``"off"`` (hide it and ask the model not to
    think), ``"budget"`` (cap reasoning tokens at ``budget``; 0 lifts the cap), ``""`` (show)."""

    name = "chat.think"
    mode: str = ""
    budget: int | None = None


@dataclass(frozen=True)
class ChatStats(Command):
    name = "chat.stats"


@dataclass(frozen=True)
class ChatExit(Command):
    name = "chat.exit"


@dataclass(frozen=True)
class ChatHead(Command):
    """Show the first ``n`` messages of the current session in full."""

    name = "chat.head"
    n: int = 4


@dataclass(frozen=True)
class ChatTail(Command):
    """Show the last ``n`` messages of the current session in full."""

    name = "chat.tail"
    n: int = 4


def handle_help(command: ChatHelp, ctx: Context) -> str:
    return _repl(ctx).help_text(command.topic)


def handle_new(command: ChatNew, ctx: Context) -> str:
    return _repl(ctx).new_session(command.session_id)


def handle_switch(command: ChatSwitch, ctx: Context) -> str:
    if not command.session_id:
        raise InvalidRequest("usage: /switch ID (/ls lists the sessions)")
    return _repl(ctx).switch_session(command.session_id)


def handle_system(command: ChatSystem, ctx: Context) -> str:
    repl = _repl(ctx)
    if command.clear:
        return repl.set_system(None)
    if command.text is None:
        current = repl.settings.system
        return f"system prompt: {current}" if current else "no system prompt (/system TEXT sets one)"
    return repl.set_system(command.text)


def handle_temperature(command: ChatTemperature, ctx: Context) -> str:
    repl = _repl(ctx)
    if command.value is None:
        value = repl.settings.temperature
        return f"temperature: {value}" if value is not None else "temperature: server default"
    if not 0.0 <= command.value <= 2.0:
        raise InvalidRequest(f"temperature must be between 0 and 2, not {command.value}")
    repl.settings.temperature = command.value
    return f"temperature set to {command.value}"


def handle_max_tokens(command: ChatMaxTokens, ctx: Context) -> str:
    repl = _repl(ctx)
    s = repl.settings
    if command.value is not None:
        if command.value < 0:
            raise InvalidRequest(f"the cap must be a number of tokens (0: no cap), not {command.value}")
        s.max_tokens = command.value or None
        from . import state

        state.remember_max_tokens(repl.name, s.max_tokens)  # kept for the next `spl chat`
    if s.max_tokens is None:
        return "max tokens per reply: no cap (until the session is full; a loop still stops the reply)"
    return f"max tokens per reply: {s.max_tokens}"


def handle_think(command: ChatThink, ctx: Context) -> str:
    s = _repl(ctx).settings
    if command.mode == "on":
        s.show_reasoning, s.thinking = True, None
    elif command.mode == "off":
        s.show_reasoning, s.thinking = False, False
    elif command.mode == "budget":
        if command.budget is None or command.budget < 0:
            raise InvalidRequest("usage: /think budget N (N ≥ 0 tokens; 0 removes the cap)")
        s.reasoning_budget = command.budget or None
        s.show_reasoning, s.thinking = True, None
    elif command.mode:
        raise InvalidRequest(f"unknown /think mode {command.mode!r}: use on, off or budget N")
    shown = "shown (dimmed)" if s.show_reasoning else "hidden, thinking off"
    budget = f", budget {s.reasoning_budget} tokens" if s.reasoning_budget else ""
    return f"reasoning: {shown}{budget}"


def handle_stats(command: ChatStats, ctx: Context) -> str:
    return _repl(ctx).stats_text()


def handle_exit(command: ChatExit, ctx: Context) -> str:
    repl = _repl(ctx)
    repl.running = False
    return ""


def handle_head(command: ChatHead, ctx: Context) -> str:
    return _repl(ctx).show_messages(command.n, from_end=False)


def handle_tail(command: ChatTail, ctx: Context) -> str:
    return _repl(ctx).show_messages(command.n, from_end=True)


HANDLERS = [
    (ChatHelp, handle_help),
    (ChatNew, handle_new),
    (ChatSwitch, handle_switch),
    (ChatSystem, handle_system),
    (ChatTemperature, handle_temperature),
    (ChatMaxTokens, handle_max_tokens),
    (ChatThink, handle_think),
    (ChatStats, handle_stats),
    (ChatExit, handle_exit),
    (ChatHead, handle_head),
    (ChatTail, handle_tail),
]
