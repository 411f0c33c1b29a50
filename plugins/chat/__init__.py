"""Built-in plugin ``chat``: ``spl chat``, a prompt_toolkit REPL on a server session, and its
slash commands (each a bus command; other plugins add more with ``register_slash_commands``).

Embedding the REPL (``spl docs`` does this)::

    from superlinear.plugins.chat import ChatRepl, ChatSettings, connect

    client = connect(url=None)                  # ensure_server() or the --url server
    ChatRepl(client, name="docs:NAME", session_id="docs-NAME",
             extra_slash_commands=[...], prepare_message=fn, banner="...").run()

``prepare_message(text, repl)`` returns the messages to send for the typed ``text`` (a str is
one user message), e.g. the question with retrieved passages.
"""

from __future__ import annotations

import json
import sys
import time

import click

from superlinear.client.completion import complete_session_ids
from superlinear.hookspecs import hookimpl

__all__ = ["ChatRepl", "ChatSettings", "TurnResult", "connect", "ask_once", "main_repl"]


from .connection import connect


def __getattr__(name):  # lazy: `spl --help` must not import prompt_toolkit or httpx
    if name in ("ChatRepl", "ChatSettings", "TurnResult"):
        from . import repl

        return getattr(repl, name)
    raise AttributeError(name)


def _reconnector(url: str | None, model: str | None, port: int | None = None):
    def reconnect():
        return connect(url, model, port=port)

    return reconnect


def ask_once(client, text: str, *, session_id: str | None = None, settings=None, as_json: bool = False,
             out=None, err=None) -> int:
    """Answer one message: stream it to ``out`` (footer on ``err``), or print one JSON object."""
    from superlinear.api import Done, TextDelta, chat_turn
    from superlinear.api import commands as api
    from superlinear.bus import Context, dispatch
    from superlinear.errors import Unavailable

    from .render import StreamRenderer, TurnStats, format_footer
    from .repl import ChatSettings

    out = out or sys.stdout
    err = err or sys.stderr
    settings = settings or ChatSettings(show_reasoning=False)
    options = settings.request_options()
    fresh = True
    if session_id:  # just the new message(s), appended to the session's transcript
        from superlinear.errors import NotFound

        options["session_mode"] = "append"
        try:
            fresh = not client.get_session(session_id).get("message_count")
        except NotFound:
            client.create_session(session_id)
    messages = []
    if settings.system and fresh:  # a system prompt opens a conversation, never joins one
        messages.append({"role": "system", "content": settings.system})
    messages.append({"role": "user", "content": text})
    renderer = StreamRenderer(out, show_reasoning=False, color=False)
    done = None
    started = time.perf_counter()
    stream = dispatch(api.Chat(chat_turn(messages, session_id=session_id, **options)), Context(api=client))
    try:
        for event in stream:
            if isinstance(event, TextDelta) and not as_json:
                renderer.content_delta(event.text)
            elif isinstance(event, Done):
                done = event
    finally:
        stream.close()
    if done is None or done.finish_reason is None:
        raise Unavailable("the server closed the stream before the reply ended (server gone?)")
    stats = TurnStats.from_usage(done.usage, done.timings, finish_reason=done.finish_reason,
                                 elapsed_s=time.perf_counter() - started)
    message = done.message or {}
    if as_json:
        out.write(json.dumps({
            "content": message.get("content") or "",
            "reasoning_content": message.get("reasoning_content") or "",
            "tool_calls": message.get("tool_calls") or [],
            "finish_reason": done.finish_reason,
            "session_id": session_id,
            "usage": done.usage or {},
            "timings": done.timings or {},
            "url": client.base_url,
        }) + "\n")
        out.flush()
        return 0
    renderer.end_line()
    err.write(format_footer(stats) + "\n")
    err.flush()
    return 0


def main_repl(*, url: str | None = None, model: str | None = None, new: bool = False,
              session_id: str | None = None, settings=None, port: int | None = None) -> int:
    from .repl import ChatRepl

    client = connect(url, model, port=port)
    if session_id and not new:
        _require_session(client, session_id)
    repl = ChatRepl(client, session_id=session_id, new=new, settings=settings,
                    reconnect=_reconnector(url, model, port))
    return repl.run()


def _require_session(client, session_id: str) -> None:
    """A session named on the command line must exist (a typo must not start a new one)."""
    import difflib

    from superlinear.errors import NotFound

    try:
        client.get_session(session_id)
        return
    except NotFound:
        pass
    known = [s.get("id") for s in client.list_sessions()["sessions"] if isinstance(s.get("id"), str)]
    close = difflib.get_close_matches(session_id, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise NotFound(f"no session {session_id!r}: {hint}`spl chat --new --session {session_id}` starts it",
                   param="session_id")


@click.command("chat")
@click.option("--url", default=None, help="Server to talk to (default: the configured one, else a "
              "local server started now).")
@click.option("--model", default=None, help="Model of a local server started now (default: $SPL_MODEL, the "
              "config file, 'default'); a running server that serves another one is refused.")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port of a local server started now (default: $SPL_PORT, the config file, 8787).")
@click.option("--new", "new", is_flag=True, help="Start a fresh session instead of resuming the last one "
              "(with --session ID: one with that id).")
@click.option("--session", "session_id", default=None, metavar="ID", shell_complete=complete_session_ids,
              help="Use this existing session (with --new or --once: created if missing).")
@click.option("--once", "once", default=None, metavar="TEXT",
              help="Answer one message and exit ('-' reads it from stdin). Without --session it "
              "uses no session.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print one JSON object.")
@click.option("--system", default=None, help="System prompt.")
@click.option("--temp", "temperature", type=click.FloatRange(0.0, 2.0), default=None, help="Temperature.")
@click.option("--max-tokens", type=click.IntRange(0), default=None,
              help="Cap on tokens per reply (default 1024; 0: no cap). /max changes it in the chat.")
@click.option("--no-think", is_flag=True, help="Hide reasoning and ask the model not to think.")
@click.option("--plain", is_flag=True, help="Print replies as they come, without rendering Markdown.")
def chat_command(url, model, port, new, session_id, once, as_json, system, temperature, max_tokens, no_think,
                 plain):
    """Chat with the model in the terminal (resumes your last session).

    Enter sends, Alt-Enter adds a line, Ctrl-C stops a reply, Ctrl-D quits; /help inside lists
    the slash commands.
    """
    from . import state
    from .repl import ChatSettings

    if max_tokens is None and once is None:  # what /max set last time, unless told otherwise
        max_tokens = state.remembered_max_tokens("chat")
    cap = {} if max_tokens is None else {"max_tokens": max_tokens or None}
    settings = ChatSettings(system=system, temperature=temperature, show_reasoning=not no_think,
                            thinking=False if no_think else None, markdown=not plain, **cap)
    if as_json and once is None:
        raise click.UsageError("--json needs --once")
    if once is not None:
        text = sys.stdin.read() if once == "-" else once
        if not text.strip():
            raise click.UsageError("--once needs a non-empty message")
        client = connect(url, model, port=port)
        try:
            return ask_once(client, text, session_id=session_id, settings=settings, as_json=as_json)
        finally:
            client.close()
    if not sys.stdin.isatty():
        raise click.UsageError("spl chat needs a terminal; use --once TEXT (or --once -) for scripts")
    return main_repl(url=url, model=model, new=new, session_id=session_id, settings=settings, port=port)


@hookimpl
def register_commands(register):
    register(chat_command)


@hookimpl
def register_slash_commands(register):
    from .builtin import ALL_COMMANDS

    for command in ALL_COMMANDS:
        register(command)
