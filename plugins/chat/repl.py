"""``ChatRepl``: the interactive loop of ``spl chat`` (and of ``spl docs``, with extras).

The REPL only talks to the server through the API (``superlinear.connect``). A turn sends just the new message(s)
with the session id and ``session_mode="append"``, so the server's session is the one source of
truth; ``/system`` on a non-empty session resends the transcript with the new system prompt
(``session_mode="replace"``) and the server rolls back to the common prefix.

Embedding (what ``spl docs`` does)::

    from superlinear.plugins.chat import ChatRepl

    repl = ChatRepl(client, name="docs:handbook", session_id="docs-handbook",
                    extra_slash_commands=[SlashCommand("sources", "...", run)],
                    prepare_message=add_passages, banner="handbook: 12 files")
    repl.run()
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import KW_ONLY, InitVar, dataclass
from typing import Any, Protocol, TextIO

from superlinear import protocol as api
from superlinear.api import Done, Event, ReasoningDelta, TextDelta, chat_turn
from superlinear.bus import Context, dispatch
from superlinear.chat_ui import SlashCommand
from superlinear.client.progress import PrefillBar, watch_prefill
from superlinear.engine import RepetitionConfig
from superlinear.errors import InvalidRequest, NotFound, Unavailable, UserError

from . import remembered as chat_state
from .render import StreamRenderer, Styler, TurnStats, format_footer, use_color

# prepare_message(text, repl) -> the messages to send for this turn (a str is one user message).
PrepareMessage = Callable[[str, "ChatRepl"], "list[dict] | str"]


class ReplyFilter(Protocol):
    """Sits between the server's reply and the screen (``spl docs`` checks citations with one)."""

    def feed(self, text: str) -> str: ...  # what to show now of the reply so far
    def finish(self) -> str: ...  # the rest, once the reply is complete
    def notes(self) -> list[str]: ...  # lines to print after the reply


# reply_filter(repl) -> a ReplyFilter for the turn about to stream (None: show the reply as it is).
MakeReplyFilter = Callable[["ChatRepl"], "ReplyFilter | None"]


DEFAULT_MAX_TOKENS = 1024  # a reply longer than this is rarely wanted, and a looping one stops here


@dataclass
class ChatSettings:
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # superlinear.defaults.NO_CAP: no cap
    show_reasoning: bool = True
    thinking: bool | None = None  # False: ask the template not to think (chat_template_kwargs)
    reasoning_budget: int | None = None
    repetition: bool | dict | RepetitionConfig = True  # stop a reply that loops
    markdown: bool = True  # render replies as Markdown on a terminal

    def request_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if self.max_tokens is not None:
            options["max_tokens"] = self.max_tokens
        if self.repetition:
            rep = self.repetition
            options["repetition"] = (rep if isinstance(rep, RepetitionConfig) else
                                     RepetitionConfig(**rep) if isinstance(rep, dict) else RepetitionConfig())
        if self.reasoning_budget is not None:
            options["reasoning_budget"] = self.reasoning_budget
        if self.thinking is False:
            options["chat_template_kwargs"] = {"enable_thinking": False}
        return options


@dataclass
class TurnResult:
    content: str
    reasoning: str
    stats: TurnStats
    cancelled: bool = False
    session_id: str | None = None
    message: dict | None = None


@contextlib.contextmanager
def quiet_terminal(stream: TextIO | None = None):
    """While a reply streams: no echo of typed keys (they wait for the next prompt) and no "^C";
    Ctrl-C still interrupts (ISIG stays on) but keeps the typed-ahead keys (NOFLSH: by default
    the terminal flushes its input queue on an interrupt)."""
    stream = stream or sys.stdin
    try:
        import termios

        fd = stream.fileno()
        saved = termios.tcgetattr(fd) if stream.isatty() else None
    except (ImportError, AttributeError, ValueError, OSError):
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
    quiet[3] |= termios.NOFLSH  # Ctrl-C must not throw away what was typed ahead
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except termios.error:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, saved)


def one_line(text: str, width: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: max(1, width - 1)] + "…"


def _terminal_width(stream: TextIO) -> int:
    import shutil

    try:
        if stream.isatty():
            return shutil.get_terminal_size().columns
    except (AttributeError, ValueError):
        pass
    return 100


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    text = content or ""
    if message.get("tool_calls"):
        names = ", ".join((c.get("function") or {}).get("name", "?") for c in message["tool_calls"])
        text = (text + " " if text else "") + f"[tool calls: {names}]"
    return text


def render_turn(events: Iterator[Event], renderer: StreamRenderer,
                shown: ReplyFilter | None = None) -> tuple[Done, TurnStats]:
    """Show one turn's events as they come (the reply through ``shown``, when given) and return
    its ``Done`` and stats: the turn of the REPL and of ``spl chat --once`` alike. The stream is
    closed however this ends (the server then cancels a turn left early, e.g. on Ctrl-C)."""
    started = time.perf_counter()
    done = None
    try:
        for event in events:
            match event:
                case ReasoningDelta(text=text):
                    renderer.reasoning_delta(text)
                case TextDelta(text=text):
                    renderer.content_delta(shown.feed(text) if shown else text)
                case Done():
                    done = event
                    if shown:
                        renderer.content_delta(shown.finish())
    finally:
        events.close()
    renderer.end_line()
    if done is None or done.finish_reason is None:
        raise Unavailable("the server closed the stream before the reply ended (server gone?)")
    stats = TurnStats.from_usage(done.usage, done.timings, elapsed_s=time.perf_counter() - started,
                                 finish_reason=done.finish_reason)
    return done, stats


@dataclass(eq=False)
class ChatRepl:
    """An interactive chat on one server session at a time.

    ``client``: the API of a server (``None``: ``superlinear.connect(start=True)`` when the REPL starts).
    ``name``: which REPL this is, for the remembered last session and the input history file.
    ``session_id``: use this session (created if missing); else the last one of ``name``
    (unless ``new``); else a new one. ``extra_slash_commands`` override/add to the registered
    ones; ``prepare_message`` turns the typed text into the turn's messages (e.g. adds
    retrieved passages).
    """

    client: Any = None
    _: KW_ONLY
    name: str = "chat"
    session_id: str | None = None
    new: bool = False
    extra_slash_commands: InitVar[Iterable[SlashCommand]] = ()
    prepare_message: PrepareMessage | None = None
    settings: ChatSettings | None = None  # None: ChatSettings()
    prompt: str = "› "
    banner: str | None = None
    out: TextIO | None = None  # None: stdout
    reconnect: Callable[[], Any] | None = None
    reply_filter: MakeReplyFilter | None = None

    def __post_init__(self, extra_slash_commands: Iterable[SlashCommand]) -> None:
        self.settings = self.settings or ChatSettings()
        self.out = self.out or sys.stdout
        self.style = Styler(use_color(self.out))
        self.running = False
        self.system_dirty = False
        self.last_stats: TurnStats | None = None
        self.turns = 0
        self.server_down = False
        self.registry = self._build_registry(extra_slash_commands)
        self._id_cache: dict[str, tuple[float, list[str]]] = {}
        self._created: set[str] = set()  # sessions this REPL created (empty ones are dropped on leaving)

    # -- slash commands ----------------------------------------------------------------------
    @staticmethod
    def _build_registry(extra: Iterable[SlashCommand]):
        from superlinear.pluginloader import collect

        from .slash import SlashRegistry

        registry = SlashRegistry()
        for _plugin, args, kwargs in collect("register_slash_commands"):
            command = args[0] if args else kwargs.get("command")
            if isinstance(command, SlashCommand):
                registry.add(command)
        for command in extra:
            registry.add(command)
        return registry

    def dispatch(self, command):
        """Dispatch a bus command against this REPL's API, reconnecting first if the server was
        gone (what slash commands call)."""
        return self._call(lambda: dispatch(command, Context(api=self.client)))

    def run_slash(self, line: str) -> bool:
        """Run a slash command line; False when ``line`` is not one."""
        from .slash import parse_line

        parsed = parse_line(line)
        if parsed is None:
            return False
        name, argument = parsed
        command = self.registry.get(name)
        result = command.run(argument, self)
        if isinstance(result, str):
            if result:
                self.say(result)
        elif result is not None:  # a plugin's command may return data
            import json

            self.say(json.dumps(result, indent=2, default=str))
        return True

    def help_text(self, topic: str = "") -> str:
        if topic:
            command = self.registry.get(topic.lstrip("/"))
            return f"{command.usage or '/' + command.name}  {command.help}"
        rows = [(c.usage or "/" + c.name, c.help) for c in self.registry]
        width = min(28, max(len(r[0]) for r in rows)) if rows else 0
        lines = [f"  {usage:<{width}}  {text}" for usage, text in rows]
        lines.append("Enter sends, Alt-Enter adds a line (pastes keep theirs), Ctrl-C stops a reply, "
                     "Ctrl-D quits; //text sends a message that starts with '/'.")
        return "\n".join(lines)

    # -- output --------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.out.write(text.rstrip("\n") + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.say(self.style.dim(text))

    def error(self, text: str) -> None:
        first = text.strip().splitlines()[0] if text.strip() else "failed"
        self.say(self.style.red(f"error: {first}"))

    # -- server and sessions -------------------------------------------------------------------
    @property
    def url(self) -> str | None:
        return getattr(self.client, "base_url", None)

    def _reconnect_if_down(self) -> None:
        """After the server went away: start/find it again (when we may), else just retry."""
        if not self.server_down:
            return
        if self.reconnect is not None:
            client = self.reconnect()
            if client is not None and client is not self.client:
                with contextlib.suppress(Exception):
                    self.client.close()
                self.client = client
        self.server_down = False

    def _call(self, fn: Callable, *args, **kwargs):
        self._reconnect_if_down()
        try:
            return fn(*args, **kwargs)
        except Unavailable:
            self.server_down = True
            raise

    def open_session(self) -> str:
        """Pick the session at start: the given one, the last one, or a new one. Returns a note."""
        if self.client is None:
            from superlinear import connect
            from superlinear.server_process import stderr_progress

            self.client = connect(start=True, progress=stderr_progress)

        if self.session_id:
            wanted = self.session_id
            try:
                info = self.dispatch(api.GetSession(session_id=wanted))
            except NotFound:
                return self.new_session(wanted)
            self.adopt(wanted)
            return self._resumed_note(info)
        last = None if self.new else chat_state.last_session(self.name, self.url)
        if last:
            try:
                info = self.dispatch(api.GetSession(session_id=last))
            except NotFound:
                info = None
            if info is not None:
                self.adopt(last)
                return self._resumed_note(info)
        return self.new_session()

    def _resumed_note(self, info: dict, verb: str = "resumed session") -> str:
        messages = info.get("message_count", info.get("messages"))
        tokens = info.get("position")
        bits = []
        if messages is not None:
            bits.append(f"{messages} messages")
        if tokens is not None:
            bits.append(f"{tokens} tokens")
        detail = f" ({', '.join(bits)})" if bits else ""
        return f"{verb} {self.session_id}{detail}"

    def require_session(self) -> str:
        if not self.session_id:
            raise InvalidRequest("no current session: /new starts one")
        return self.session_id

    def _leave_current(self, next_id: str | None) -> None:
        """Moving to another session: drop the current one if this REPL created it and it is
        still empty (so /new, /load, /fork do not leave unused sessions holding cache memory)."""
        current = self.session_id
        if not current or current == next_id or current not in self._created:
            return
        self._created.discard(current)
        with contextlib.suppress(UserError):
            if self.client.get_session(current).get("message_count", 1) == 0:
                self.client.close_session(current)

    def adopt(self, session_id: str) -> None:
        """Make ``session_id`` (an existing server session) the current one."""
        self._leave_current(session_id)
        self.session_id = session_id
        self.system_dirty = False
        chat_state.remember_session(self.name, session_id, self.url)
        self._id_cache.clear()
        try:  # show the session's own system prompt in /system
            history = self.history()
        except UserError:
            return
        first = history[0] if history else None
        if first and first.get("role") == "system":
            self.settings.system = message_text(first)
        elif history:
            self.settings.system = None
        elif self.settings.system:
            self.system_dirty = True  # a fresh session: send the system prompt with the first turn

    def new_session(self, session_id: str | None = None) -> str:
        info = self.dispatch(api.CreateSession(session_id=session_id))
        new_id = info.get("id") or session_id
        self._leave_current(new_id)
        self._created.add(new_id)
        self.session_id = new_id
        chat_state.remember_session(self.name, new_id, self.url)
        self._id_cache.clear()
        self.system_dirty = bool(self.settings.system)
        return f"new session {new_id}"

    def switch_session(self, session_id: str) -> str:
        info = self.dispatch(api.GetSession(session_id=session_id))
        self.adopt(session_id)
        return self._resumed_note(info, "switched to session")

    def set_system(self, text: str | None) -> str:
        self.settings.system = text
        self.system_dirty = True
        if text is None:
            return "system prompt cleared (applies from your next message)"
        return "system prompt set (applies from your next message)"

    def history(self, *, last: int | None = None, first: int | None = None) -> list[dict]:
        if not self.session_id:
            return []
        messages = self.dispatch(api.History(session_id=self.session_id))
        if first is not None:
            messages = messages[:max(0, first)]
        if last is not None:
            messages = messages[-last:] if last > 0 else []
        return messages

    def history_lines(self, last: int | None = None) -> str:
        """``/history``: one line per message, numbered from 1 (the numbers /rollback takes)."""
        history = self.history()
        if not history:
            return "no messages yet"
        start = max(0, len(history) - last) if last else 0
        width = _terminal_width(self.out) - 16
        lines = []
        for index, message in enumerate(history[start:], start=start + 1):
            role = message.get("role", "?")
            lines.append(f"{index:>4}  {role:<10} {one_line(message_text(message), width)}")
        return "\n".join(lines)

    def show_messages(self, n: int, *, from_end: bool) -> str:
        """``/head`` / ``/tail``: the first/last ``n`` messages in full."""
        if n < 1:
            raise InvalidRequest("n must be at least 1")
        history = self.history()
        if not history:
            return "no messages yet"
        start = max(0, len(history) - n) if from_end else 0
        chosen = history[start:start + n]
        blocks = []
        for index, message in enumerate(chosen, start=start + 1):
            head = self.style.bold(f"[{index}] {message.get('role', '?')}")
            blocks.append(f"{head}\n{message_text(message)}")
        return "\n\n".join(blocks)

    def stats_text(self) -> str:
        lines = [f"server   {self.url}"]
        try:
            health = self._call(lambda: self.client.health(timeout=3.0))
            lines.append(f"model    {health.get('model', '?')}")
        except UserError as exc:
            lines.append(f"model    ? ({exc.message})")
        lines.append(f"session  {self.session_id}")
        if self.session_id:
            from superlinear.output import format_bytes

            info = self.dispatch(api.GetSession(session_id=self.session_id))
            lines.append(f"  tokens   {info.get('position', '?')} of {info.get('max_seq_len', '?')}, "
                         f"{info.get('message_count', '?')} messages, "
                         f"{format_bytes(info.get('bytes'))} of cache")
        s = self.settings
        lines.append(f"settings temperature={s.temperature if s.temperature is not None else 'default'} "
                     f"max_tokens={s.max_tokens or 'no cap'} "
                     f"reasoning={'shown' if s.show_reasoning else 'hidden'}"
                     + (f" budget={s.reasoning_budget}" if s.reasoning_budget else "")
                     + (" system=yes" if s.system else ""))
        if self.last_stats is not None:
            lines.append(f"last turn {format_footer(self.last_stats)}")
        lines.append(f"turns this run: {self.turns}")
        return "\n".join(lines)

    def complete_ids(self, kind: str) -> list[str]:
        """Session or snapshot ids for completion (cached for a few seconds)."""
        cached = self._id_cache.get(kind)
        if cached and time.monotonic() - cached[0] < 5.0:
            return cached[1]
        if kind == "id":
            return self.complete_ids("session") + self.complete_ids("snapshot")
        if kind == "session":
            items = self.client.list_sessions()["sessions"]
        elif kind == "snapshot":
            items = self.client.list_snapshots()
        else:
            return []
        ids = [str(item.get("id")) for item in items if item.get("id")]
        self._id_cache[kind] = (time.monotonic(), ids)
        return ids

    # -- a chat turn -----------------------------------------------------------------------------
    def _turn_messages(self, text: str) -> tuple[list[dict], str]:
        """The messages to send and the server's ``session_mode`` for them: ``"append"`` (just
        the new messages; a repeated first question must not read as an edit), or ``"replace"``
        (the whole transcript with a new system prompt: the server rolls back to the common
        prefix)."""
        prepared = self.prepare_message(text, self) if self.prepare_message else text
        messages = [{"role": "user", "content": prepared}] if isinstance(prepared, str) else list(prepared)
        if not self.system_dirty or any(m.get("role") == "system" for m in messages):
            return messages, "append"  # (a prepare_message hook that adds a system prompt owns it)
        history = self.history()
        body = history[1:] if history and history[0].get("role") == "system" else history
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return system + body + messages, "replace"

    def send(self, text: str, *, out: TextIO | None = None) -> TurnResult:
        """One streamed turn. Ctrl-C (KeyboardInterrupt) closes the stream: the server cancels
        the generation; the REPL stays up."""
        self._reconnect_if_down()  # before self.client is used below
        if not self.session_id:
            self.open_session()
        messages, mode = self._turn_messages(text)
        shown = self.reply_filter(self) if self.reply_filter else None
        renderer = StreamRenderer(out or self.out, show_reasoning=self.settings.show_reasoning,
                                  markdown=self.settings.markdown)
        before = self._message_count()
        started = time.perf_counter()
        # A long prompt (the first of a big session, a long paste) shows a bar with its ETA.
        bar = PrefillBar(speed=getattr(self.client, "prefill_speed", None))
        turn = chat_turn(messages, session_id=self.session_id, session_mode=mode, **self.settings.request_options())
        quiet = quiet_terminal() if self.running else contextlib.nullcontext()
        try:
            with quiet:
                done, stats = render_turn(watch_prefill(self.dispatch(api.Chat(turn)), bar), renderer, shown)
        except Unavailable:
            self.server_down = True
            raise
        except NotFound:
            if renderer.wrote_anything:
                raise
            return self._session_vanished(text, out)
        except KeyboardInterrupt:  # the server drops the cancelled turn: a new system prompt is still pending
            self._drop_cancelled_turn(before)
            renderer.notice("[cancelled]")
            stats = TurnStats(elapsed_s=time.perf_counter() - started, finish_reason="cancelled")
            return TurnResult(renderer.text, "".join(renderer.reasoning), stats, cancelled=True,
                              session_id=self.session_id)
        self.system_dirty = False
        for line in shown.notes() if shown else []:
            self.note(line)
        if done.finish_reason == "length" and self.settings.max_tokens:
            self.note(f"the reply reached the cap of {self.settings.max_tokens} tokens (/max N changes it)")
        self.last_stats = stats
        self.turns += 1
        message = done.message or {}
        return TurnResult(message.get("content", renderer.text) or renderer.text,
                          message.get("reasoning_content", "".join(renderer.reasoning)) or "",
                          stats, session_id=self.session_id, message=message, cancelled=False)

    def _message_count(self) -> int | None:
        try:
            return self.client.get_session(self.session_id).get("message_count")
        except UserError:
            return None  # not there yet (created by the turn) or the server is gone: the turn says

    def _drop_cancelled_turn(self, before: int | None) -> None:
        """Make a cancel atomic: a Ctrl-C that lands as the reply ends may come after the server
        stored the turn. Rolling back to the count before the turn undoes exactly that, and is a
        no-op otherwise; the server runs it after the turn (it waits for the session's lock)."""
        if before is None:
            return
        with contextlib.suppress(UserError):
            self.client.rollback(self.session_id, before)

    def _session_vanished(self, text: str, out: TextIO | None) -> TurnResult:
        """The session is gone (server restarted without it): recreate it once and resend."""
        lost = self.session_id
        self.new_session(lost)
        self.note(f"session {lost} was gone from the server; started it afresh")
        return self.send(text, out=out)

    # -- the loop --------------------------------------------------------------------------------
    def handle(self, line: str) -> None:
        """One line of input: a slash command or a message. Errors become one line."""
        if not line.strip():
            return
        if line.strip() == "/":
            line = "/help"
        try:
            if self.run_slash(line):
                return
            if line.lstrip().startswith("//"):
                line = line.lstrip()[1:]
            result = self.send(line)
            if not result.cancelled:
                self.note(format_footer(result.stats))
        except KeyboardInterrupt:
            self.note("[cancelled]")
        except Unavailable as exc:
            self.server_down = True
            self.error(f"server gone: {exc.message}")
        except UserError as exc:
            self.error(exc.message)
        except Exception as exc:  # a bug (ours or a plugin's): one line, and the REPL stays up
            if os.environ.get("SPL_TRACE") == "1":
                import traceback

                traceback.print_exc()
            self.error(f"internal error: {type(exc).__name__}: {exc} (SPL_TRACE=1 shows the traceback)")

    def _make_prompt_session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        from .slash import SlashCompleter

        bindings = KeyBindings()

        # Enter sends. A paste arrives as one bracketed-paste event, newlines included, so it
        # never sends half a message; Alt-Enter (Esc Enter) adds a line by hand. Ctrl-J stays
        # "send": lines typed ahead while a reply streams reach us as "\n" (cooked terminal).
        @bindings.add("enter")
        @bindings.add("c-j")
        def _send(event):
            event.current_buffer.validate_and_handle()

        @bindings.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        path = chat_state.history_file(self.name)
        history = FileHistory(str(path)) if path else InMemoryHistory()
        completer = SlashCompleter(self.registry, self.complete_ids)
        return PromptSession(history=history, completer=completer, key_bindings=bindings,
                             multiline=True, complete_while_typing=True, complete_in_thread=True,
                             reserve_space_for_menu=6,
                             prompt_continuation=lambda width, line_number, wrap_count: "· ".rjust(width),
                             enable_history_search=False)

    def run(self) -> int:
        """Run until /exit or Ctrl-D. Returns the exit code."""
        self.running = True
        if self.banner:
            self.note(self.banner)
        try:
            opened = self.open_session()
            try:
                model = self.client.health(timeout=3.0).get("model", "?")
            except UserError:
                model = "?"
            self.note(f"model {model} at {self.url}")
            self.note(f"{opened} · /help lists the commands · Ctrl-D quits")
        except UserError as exc:
            self.error(exc.message)
            if isinstance(exc, Unavailable):
                self.server_down = True
        session = self._make_prompt_session()
        while self.running:
            try:
                line = session.prompt(self._prompt)
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                break
            self.handle(line)
        return 0

    def _prompt(self):
        from prompt_toolkit.formatted_text import FormattedText

        label = self.session_id or "no session"
        if len(label) > 20:  # generated ids (sess-DATE-TIME-random): the random tail is enough
            label = label.rsplit("-", 1)[-1][-8:] if "-" in label else label[-8:]
        return FormattedText([("ansibrightblack", f"{label} "), ("bold", self.prompt)])
