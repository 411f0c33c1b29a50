"""Slash commands: parsing a line, the registry (built-ins + plugins + extras), completion.

A slash command is a ``superlinear.chat_ui.SlashCommand``; its ``run(argument_text, repl)`` builds a
bus command and dispatches it. Completion of arguments is derived from the ``usage`` string, so a
plugin's command gets it for free: ``SNAP`` completes snapshot ids, ``SESSION`` session ids, ``ID``
either, ``on|off`` style alternatives complete literally (``usage="/think on|off|budget N"``),
and a trailing ``…`` repeats the last kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.document import Document

from superlinear.chat_ui import SlashCommand
from superlinear.errors import InvalidRequest, UserError


class UnknownSlashCommand(UserError):
    pass


def parse_line(line: str) -> tuple[str, str] | None:
    """``"/save my title"`` -> ``("save", "my title")``; not a slash command -> ``None``.

    A line starting with ``//`` is a message that starts with a slash (the first one is dropped
    by the caller), so it is not a command either.
    """
    stripped = line.strip()
    if not stripped.startswith("/") or stripped.startswith("//") or stripped == "/":
        return None
    head, _, rest = stripped[1:].partition(" ")
    if not head or not re.fullmatch(r"[A-Za-z][\w.-]*", head):
        return None  # e.g. "/usr/bin/env is a path" is a message, not a command
    return head.lower(), rest.strip()


def parse_int(text: str, what: str, *, default: int | None = None, minimum: int | None = None) -> int:
    text = text.strip()
    if not text:
        if default is None:
            raise InvalidRequest(f"{what} is required")
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidRequest(f"{what} must be a whole number, not {text!r}") from None
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"{what} must be at least {minimum}")
    return value


class SlashRegistry:
    """Ordered name -> SlashCommand. Later registrations (extras) override earlier ones."""

    def __init__(self, commands: Iterable[SlashCommand] = ()) -> None:
        self._commands: dict[str, SlashCommand] = {}
        for command in commands:
            self.add(command)

    def add(self, command: SlashCommand) -> None:
        self._commands[command.name.lower().lstrip("/")] = command

    def get(self, name: str) -> SlashCommand:
        name = name.lower()
        if name in self._commands:
            return self._commands[name]
        # Unique prefix: "/hist" -> "/history".
        matches = [n for n in self._commands if n.startswith(name)]
        if len(matches) == 1:
            return self._commands[matches[0]]
        hint = f" (did you mean {', '.join('/' + m for m in sorted(matches))}?)" if matches else ""
        raise UnknownSlashCommand(f"unknown command /{name}{hint}; /help lists the commands")

    def names(self) -> list[str]:
        return list(self._commands)

    def __iter__(self):
        return iter(self._commands.values())

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._commands


def argument_kinds(usage: str) -> list[str | list[str]]:
    """Completion kind of each argument from a usage string.

    ``"/load SNAP"`` -> ``["snapshot"]``; ``"/rm ID…"`` -> ``["id*"]`` (repeating);
    ``"/think on|off|budget N"`` -> ``[["on", "off", "budget"], None]``.
    """
    words = usage.split()[1:] if usage.startswith("/") else usage.split()
    kinds: list = []
    for word in words:
        bare = word.strip("[]")
        repeat = bare.endswith("…") or bare.endswith("...")
        bare = bare.rstrip("….")
        kind: str | list[str] | None
        if "|" in bare:
            kind = [alt for alt in bare.split("|") if alt and not alt.isupper()]
        elif "SNAP" in bare:
            kind = "snapshot"
        elif bare in ("SESSION", "SESSION_ID"):
            kind = "session"
        elif bare == "ID":
            kind = "id"  # a session or a snapshot
        else:
            kind = None
        if repeat and isinstance(kind, str):
            kind += "*"
        kinds.append(kind)
    return kinds


class SlashCompleter(Completer):
    """Completes ``/names`` and, after a name, session/snapshot ids or literal alternatives.

    ``ids(kind)`` returns candidate ids for ``"session"``, ``"snapshot"`` or ``"id"``; it is called lazily
    and may raise (server gone): completion then offers nothing.
    """

    def __init__(self, registry: SlashRegistry, ids: Callable[[str], list[str]]) -> None:
        self.registry = registry
        self.ids = ids

    def get_completions(self, document: Document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        if " " not in text:
            prefix = text[1:].lower()
            for command in self.registry:
                if command.name.startswith(prefix):
                    yield Completion("/" + command.name, start_position=-len(text),
                                     display_meta=command.help)
            return
        name, _, rest = text[1:].partition(" ")
        if name.lower() not in self.registry:
            return
        command = self.registry.get(name)
        kinds = argument_kinds(command.usage or "")
        if not kinds:
            return
        words = rest.split(" ")
        current = words[-1]
        index = len(words) - 1
        kind = kinds[index] if index < len(kinds) else None
        if kind is None and kinds and isinstance(kinds[-1], str) and kinds[-1].endswith("*"):
            kind = kinds[-1]
        if kind is None:
            return
        if isinstance(kind, list):
            candidates = kind
        else:
            try:
                candidates = self.ids(kind.rstrip("*"))
            except Exception:  # completion must never break typing
                return
        already = set(words[:-1])
        for candidate in candidates:
            if candidate.startswith(current) and candidate not in already:
                yield Completion(candidate, start_position=-len(current))
