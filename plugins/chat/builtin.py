"""The built-in slash commands of ``spl chat``.

Each one parses its argument text. The REPL's own settings and moves (``/temp``, ``/max``,
``/new``, ``/exit``…) are plain methods of the REPL; operations on sessions and snapshots
(``/save``, ``/load``, ``/fork``, ``/rollback``, ``/ls``, ``/rm``) dispatch the API's commands
(``superlinear.protocol``) against the REPL's API, the very ones `spl session …` and
`spl snapshot …` dispatch, and format their results here.
"""

from __future__ import annotations

from superlinear import protocol as api
from superlinear.chat_ui import SlashCommand, split_args
from superlinear.defaults import NO_CAP, typed_cap
from superlinear.errors import InvalidRequest

from .slash import parse_int


def _help(text, repl):
    return repl.help_text(text.strip())


def _new(text, repl):
    return repl.new_session(text.strip() or None)


def _switch(text, repl):
    session_id = text.strip()
    if not session_id:
        raise InvalidRequest("usage: /switch ID (/ls lists the sessions)")
    return repl.switch_session(session_id)


def _system(text, repl):
    text = text.strip()
    if not text:
        current = repl.settings.system
        return f"system prompt: {current}" if current else "no system prompt (/system TEXT sets one)"
    if text.lower() in ("off", "none", "clear", "-"):
        return repl.set_system(None)
    return repl.set_system(text)


def _temp(text, repl):
    text = text.strip()
    s = repl.settings
    if not text:
        return f"temperature: {s.temperature}" if s.temperature is not None else "temperature: server default"
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest(f"temperature must be a number, not {text!r}") from None
    if not 0.0 <= value <= 2.0:
        raise InvalidRequest(f"temperature must be between 0 and 2, not {value}")
    s.temperature = value
    return f"temperature set to {value}"


def _max(text, repl):
    text = text.strip().lower()
    s = repl.settings
    if text:
        s.max_tokens = NO_CAP if text in ("off", "none", "no") else typed_cap(parse_int(text, "max tokens", minimum=0))
        from . import remembered

        remembered.remember_max_tokens(repl.name, s.max_tokens)  # kept for the next `spl chat`
    if s.max_tokens is None:
        return "max tokens per reply: no cap (until the session is full; a loop still stops the reply)"
    return f"max tokens per reply: {s.max_tokens}"


def _think(text, repl):
    args = split_args(text)
    s = repl.settings
    mode = args[0].lower() if args else ""
    if mode == "budget":
        if len(args) != 2:
            raise InvalidRequest("usage: /think budget N")
        s.reasoning_budget = parse_int(args[1], "budget", minimum=0) or None
        s.show_reasoning, s.thinking = True, None
    elif len(args) > 1:
        raise InvalidRequest("usage: /think on|off|budget N")
    elif mode == "on":
        s.show_reasoning, s.thinking = True, None
    elif mode == "off":
        s.show_reasoning, s.thinking = False, False
    elif mode:
        raise InvalidRequest(f"unknown /think mode {mode!r}: use on, off or budget N")
    shown = "shown (dimmed)" if s.show_reasoning else "hidden, thinking off"
    budget = f", budget {s.reasoning_budget} tokens" if s.reasoning_budget else ""
    return f"reasoning: {shown}{budget}"


def _stats(text, repl):
    return repl.stats_text()


def _exit(text, repl):
    repl.running = False
    return ""


def _head(text, repl):
    return repl.show_messages(parse_int(text, "n", default=4, minimum=1), from_end=False)


def _tail(text, repl):
    return repl.show_messages(parse_int(text, "n", default=4, minimum=1), from_end=True)


# -- operations on sessions and snapshots: the API's commands, on the current session --------------
def _ls(text, repl):
    from superlinear.api.composite import list_all
    from superlinear.output import session_table, snapshot_table

    result = list_all(repl.dispatch)
    sessions = session_table(result["sessions"])
    if repl.session_id:  # mark the current session
        sessions = "\n".join(("* " if line.split(" ", 1)[0] == repl.session_id else "  ") + line
                             for line in sessions.splitlines())
    return sessions + "\n\n" + snapshot_table(result["snapshots"])


def _rm(text, repl):
    ids = split_args(text)
    if not ids:
        raise InvalidRequest("usage: /rm ID… (sessions or snapshots; /ls lists them)")
    from superlinear.api.composite import remove

    removed = remove(repl.dispatch, ids)
    lines = [f"removed {item['kind']} {item['id']}" for item in removed]
    if any(item["kind"] == "session" and item["id"] == repl.session_id for item in removed):
        lines.append(repl.new_session() + " (the current one was removed)")
    return "\n".join(lines)


def _save(text, repl):
    info = repl.dispatch(api.Save(session_id=repl.require_session(), title=text.strip() or None))
    tokens = (info.get("session") or {}).get("position", info.get("position"))
    detail = f", {tokens} tokens" if tokens is not None else ""
    return f"saved snapshot {info['id']} (session {repl.session_id}{detail}); /load {info['id']} restores it"


def _load(text, repl):
    args = split_args(text)
    if len(args) != 1:
        raise InvalidRequest("usage: /load SNAP (/ls lists the snapshots)")
    info = repl.dispatch(api.Load(snapshot_id=args[0]))
    repl.adopt(info["id"])
    return f"loaded snapshot {args[0]} into session {info['id']} ({info.get('position', '?')} tokens)"


def _fork(text, repl):
    args = split_args(text)
    if len(args) > 1:
        raise InvalidRequest("usage: /fork [NEW_ID]")
    source = repl.require_session()
    info = repl.dispatch(api.Fork(session_id=source, new_id=args[0] if args else None))
    repl.adopt(info["id"])
    return f"forked {source} → {info['id']} (now on {info['id']}; /switch {source} goes back)"


def _rollback(text, repl):
    n = parse_int(text, "N")
    info = repl.dispatch(api.Rollback(session_id=repl.require_session(), n_messages=n))
    repl.system_dirty = bool(repl.settings.system) and n == 0
    return (f"session {repl.session_id}: {info.get('message_count', '?')} messages, "
            f"{info.get('position', '?')} tokens")


def _history(text, repl):
    n = parse_int(text, "n", default=0, minimum=0) or None
    return repl.history_lines(last=n)


ALL_COMMANDS = [
    SlashCommand("help", "List the commands (/help CMD for one)", _help, "/help [CMD]"),
    SlashCommand("new", "Start a new session", _new, "/new"),
    SlashCommand("ls", "List sessions and snapshots", _ls, "/ls"),
    SlashCommand("switch", "Continue another session", _switch, "/switch SESSION"),
    SlashCommand("rm", "Remove sessions or snapshots", _rm, "/rm ID…"),
    SlashCommand("save", "Save this session as a snapshot", _save, "/save [title]"),
    SlashCommand("load", "Load a snapshot into a new session and switch to it", _load, "/load SNAP"),
    SlashCommand("fork", "Copy this session and continue on the copy", _fork, "/fork [NEW_ID]"),
    SlashCommand("rollback", "Keep the first N messages (-N drops the last N)", _rollback, "/rollback N"),
    SlashCommand("history", "This session's messages, one line each (the last n)", _history, "/history [n]"),
    SlashCommand("head", "Show the first n messages in full", _head, "/head [n]"),
    SlashCommand("tail", "Show the last n messages in full", _tail, "/tail [n]"),
    SlashCommand("system", "Show, set or clear (off) the system prompt", _system, "/system [TEXT|off]"),
    SlashCommand("temp", "Show or set the sampling temperature", _temp, "/temp [X]"),
    SlashCommand("max", "Show or set the cap on tokens per reply (off: no cap)", _max, "/max [N|off]"),
    SlashCommand("think", "Show reasoning (on), hide it (off), or cap it", _think, "/think on|off|budget N"),
    SlashCommand("stats", "Server, session and last-turn statistics", _stats, "/stats"),
    SlashCommand("exit", "Leave (Ctrl-D too)", _exit, "/exit"),
]
