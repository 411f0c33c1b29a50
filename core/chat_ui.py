"""What a plugin gives the chat front end (``spl chat``'s REPL) without importing it: slash
commands (the ``register_slash_commands`` hook takes ``SlashCommand`` values), and ``OpenChat``,
the bus command that opens the REPL with a plugin's own additions (``spl docs`` does). The chat
plugin handles ``OpenChat``; the API it runs against is the dispatch context's."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from superlinear.bus import Command
from superlinear.errors import InvalidRequest


@dataclass(frozen=True)
class SlashCommand:
    """A REPL slash command. ``run(argument_text, repl)`` usually dispatches a bus command and
    returns the text to show."""

    name: str  # without the slash
    help: str
    run: Callable[[str, Any], Any]
    usage: str = ""


def split_args(text: str) -> list[str]:
    """A slash command's arguments, split as a shell does; bad quoting is a user error."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise InvalidRequest(f"cannot parse arguments: {exc}") from exc


@dataclass(frozen=True)
class OpenChat(Command):
    """Run the chat REPL until the user leaves; the result is its exit code.

    ``name``: which REPL (its remembered last session and input history); ``session_id``: the
    session to chat in. ``slash_commands`` add to (or override) the registered ones;
    ``prepare_message(text, repl)`` turns the typed text into the turn's messages (a str is one
    user message); ``reply_filter(repl)`` returns None or an object with ``feed(text)``,
    ``finish()`` and ``notes()`` that sees the reply as it streams. ``max_tokens``,
    ``temperature``, ``repetition``: the turns' sampling (None: the chat's defaults)."""

    name: ClassVar[str] = "chat.open"
    repl_name: str = "chat"
    session_id: str | None = None
    banner: str | None = None
    slash_commands: tuple[SlashCommand, ...] = ()
    prepare_message: Callable[[str, Any], Any] | None = field(default=None, compare=False)
    reply_filter: Callable[[Any], Any] | None = field(default=None, compare=False)
    max_tokens: int | None = None
    temperature: float | None = None
    repetition: Any = None
