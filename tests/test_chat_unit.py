"""The pieces of `spl chat` without a server: parsing, completion, rendering, state, and the
REPL's turn logic against an in-memory fake client (the real REPL in a terminal against a real
server is tests/test_chat_repl.py)."""

from __future__ import annotations

import io
import json

import pytest
from prompt_toolkit.document import Document

from superlinear.api import Done, TextDelta
from superlinear.chat_ui import SlashCommand
from superlinear.engine import RepetitionConfig
from superlinear.errors import InvalidRequest, NotFound, Unavailable
from superlinear.plugins.chat import remembered as chat_state
from superlinear.plugins.chat.render import StreamRenderer, TurnStats, format_footer
from superlinear.plugins.chat.repl import ChatRepl, ChatSettings
from superlinear.plugins.chat.slash import (
    SlashCompleter,
    SlashRegistry,
    UnknownSlashCommand,
    argument_kinds,
    parse_int,
    parse_line,
)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NO_COLOR", "1")


# -- parsing -------------------------------------------------------------------------------------
def test_parse_line():
    assert parse_line("/save my title ") == ("save", "my title")
    assert parse_line("  /HELP") == ("help", "")
    assert parse_line("hello /save") is None
    assert parse_line("//not a command") is None
    assert parse_line("/") is None
    assert parse_line("/usr/bin/env is a path") is None


def test_parse_int():
    assert parse_int("", "n", default=4) == 4
    assert parse_int(" 7 ", "n") == 7
    with pytest.raises(InvalidRequest, match="whole number"):
        parse_int("x", "n")
    with pytest.raises(InvalidRequest, match="at least 1"):
        parse_int("0", "n", minimum=1)


def _cmd(name, usage=""):
    return SlashCommand(name, f"help of {name}", lambda text, repl: f"{name}:{text}", usage)


def test_registry_prefix_and_unknown():
    reg = SlashRegistry([_cmd("history"), _cmd("help"), _cmd("save")])
    assert reg.get("sa").name == "save"
    assert reg.get("history").name == "history"
    with pytest.raises(UnknownSlashCommand, match="did you mean /help, /history"):
        reg.get("h")
    with pytest.raises(UnknownSlashCommand, match="unknown command /bogus; /help"):
        reg.get("bogus")
    reg.add(SlashCommand("save", "override", lambda t, r: "x"))
    assert reg.get("save").help == "override"
    assert reg.names() == ["history", "help", "save"]


def test_argument_kinds():
    assert argument_kinds("/load SNAP") == ["snapshot"]
    assert argument_kinds("/rm ID…") == ["id*"]
    assert argument_kinds("/switch SESSION") == ["session"]
    assert argument_kinds("/think on|off|budget N") == [["on", "off", "budget"], None]
    assert argument_kinds("/save [title]") == [None]


def _completions(completer, text):
    return [c.text for c in completer.get_completions(Document(text), None)]


def test_completer():
    reg = SlashRegistry([_cmd("load", "/load SNAP"), _cmd("rm", "/rm SESSION…"),
                         _cmd("think", "/think on|off|budget N"), _cmd("rollback", "/rollback N")])
    ids = {"session": ["s-aaa", "s-abb", "t-1"], "snapshot": ["snap1", "snap2"]}
    completer = SlashCompleter(reg, lambda kind: ids[kind])
    assert _completions(completer, "/r") == ["/rm", "/rollback"]
    assert _completions(completer, "/load sn") == ["snap1", "snap2"]
    assert _completions(completer, "/rm s-a") == ["s-aaa", "s-abb"]
    assert _completions(completer, "/rm s-aaa s-") == ["s-abb"]  # repeating, no duplicates
    assert _completions(completer, "/think o") == ["on", "off"]
    assert _completions(completer, "/rollback ") == []
    assert _completions(completer, "hello /lo") == []

    def broken(kind):
        raise Unavailable("server gone")

    assert _completions(SlashCompleter(reg, broken), "/load ") == []  # never breaks typing


# -- rendering -----------------------------------------------------------------------------------
def test_footer_from_usage_and_timings():
    stats = TurnStats.from_usage(
        {"prompt_tokens": 12, "completion_tokens": 34},
        {"prefill_tokens_per_s": 850.4, "decode_tokens_per_s": 41.23, "tokens_reused": 120},
        elapsed_s=1.42, finish_reason="stop")
    assert format_footer(stats) == "[12 → 34 tokens · prefill 850 tok/s · decode 41.2 tok/s · 120 reused · 1.4 s]"
    cached = TurnStats.from_usage({"prompt_tokens": 5, "completion_tokens": 1,
                                   "prompt_tokens_details": {"cached_tokens": 3}}, {}, finish_reason="length")
    assert format_footer(cached) == "[5 → 1 tokens · prefill – tok/s · decode – tok/s · 3 reused · length]"


def test_renderer_dims_reasoning_and_separates_answer():
    out = io.StringIO()
    r = StreamRenderer(out, color=True)
    r.reasoning_delta("let me ")
    r.reasoning_delta("think")
    r.content_delta("\nParis")
    r.content_delta(".")
    r.end_line()
    text = out.getvalue()
    assert "\x1b[2mthinking: \x1b[0m\x1b[2mlet me \x1b[0m" in text
    assert text.endswith("think\x1b[0m\n\n\nParis.\n")
    assert r.text == "\nParis." and r.at_line_start


def test_renderer_hides_reasoning_and_strips_leading_newlines():
    out = io.StringIO()
    r = StreamRenderer(out, show_reasoning=False, color=False)
    r.reasoning_delta("secret")
    r.content_delta("\n\nHi")
    r.notice("[cancelled]")
    assert out.getvalue() == "Hi\n[cancelled]\n"


# -- state ---------------------------------------------------------------------------------------
def test_last_session_roundtrip(tmp_path):
    assert chat_state.last_session("chat") is None
    chat_state.remember_session("chat", "s1", "http://a")
    chat_state.remember_session("docs:x", "d1", "http://a")
    assert chat_state.last_session("chat") == "s1"
    assert chat_state.last_session("chat", "http://a") == "s1"
    assert chat_state.last_session("chat", "http://b") is None  # another server
    assert chat_state.last_session("docs:x") == "d1"
    chat_state.remember_session("chat", None)
    assert chat_state.last_session("chat") is None
    assert chat_state.history_file("docs:a b").name == "docs_a_b"
    (tmp_path / "state" / "chat.json").write_text("not json")
    assert chat_state.last_session("chat") is None


# -- the REPL against a fake client --------------------------------------------------------------
class FakeClient:
    """Just enough of a server's API: sessions with transcripts, a streamed echo reply."""

    base_url = "http://fake"

    def __init__(self):
        self.sessions: dict[str, list[dict]] = {}
        self.requests: list[dict] = []
        self.snapshots: dict[str, list[dict]] = {}
        self.down = False
        self.interrupt_after: int | None = None
        self.interrupt_at_done = False
        self._n = 0

    def _check(self):
        if self.down:
            raise Unavailable("cannot reach the spl server at http://fake (ConnectError)")

    def health(self, timeout=None):
        self._check()
        return {"status": "ok", "model": "fake"}

    def create_session(self, session_id=None, max_seq_len=None, ephemeral=False):
        self._check()
        self._n += 1
        sid = session_id or f"sess{self._n}"
        self.sessions[sid] = []
        return {"id": sid}

    def get_session(self, session_id):
        sid = session_id
        self._check()
        if sid not in self.sessions:
            raise NotFound(f"unknown session {sid!r}")
        return {"id": sid, "message_count": len(self.sessions[sid]), "position": 10 * len(self.sessions[sid])}

    def history(self, session_id):
        sid = session_id
        self.get_session(sid)
        return list(self.sessions[sid])

    def list_sessions(self):
        return {"sessions": [{"id": s, "position": 0, "max_seq_len": 64, "message_count": len(m)}
                             for s, m in self.sessions.items()]}

    def list_snapshots(self, tag=None, include_session_state=False):
        return [{"id": s, "title": "t"} for s in self.snapshots]

    def close_session(self, session_id):
        sid = session_id
        self.get_session(sid)
        del self.sessions[sid]
        return {"id": sid}

    def delete_snapshot(self, snapshot_id):
        snap = snapshot_id
        if snap not in self.snapshots:
            raise NotFound(f"no snapshot {snap!r}")
        del self.snapshots[snap]
        return {"id": snap}

    def save(self, session_id, title=None, description=None, tags=None):
        sid = session_id
        self.get_session(sid)
        snap = f"snap{len(self.snapshots) + 1}"
        self.snapshots[snap] = list(self.sessions[sid])
        return {"id": snap, "title": title, "session": {"position": 10 * len(self.sessions[sid])}}

    def load(self, snapshot_id, session_id=None, force=False, max_seq_len=None, ephemeral=False):
        snap = snapshot_id
        if snap not in self.snapshots:
            raise NotFound(f"no snapshot {snap!r}")
        info = self.create_session(session_id)
        self.sessions[info["id"]] = list(self.snapshots[snap])
        return self.get_session(info["id"])

    def fork(self, session_id, new_id=None):
        sid = session_id
        self.get_session(sid)
        info = self.create_session(new_id)
        self.sessions[info["id"]] = list(self.sessions[sid])
        return self.get_session(info["id"])

    def rollback(self, session_id, n_messages):
        sid = session_id
        self.get_session(sid)
        messages = self.sessions[sid]
        del messages[n_messages if n_messages >= 0 else len(messages) + n_messages:]
        return self.get_session(sid)

    def chat(self, turn):
        messages, session_id, r = turn.request.messages, turn.session_id, turn.request
        options = {"session_mode": turn.session_mode, "temperature": r.sampling.temperature,
                   "repetition": r.repetition, "reasoning_budget": r.reasoning_budget,
                   "chat_template_kwargs": r.chat_template_kwargs}
        if r.sampling.max_tokens is not None:
            options["max_tokens"] = r.sampling.max_tokens
        self.requests.append({"messages": messages, "session_id": session_id, **options})
        self._check()
        if session_id is not None and session_id not in self.sessions:
            raise NotFound(f"unknown session {session_id!r}")
        transcript = self.sessions.setdefault(session_id, [])
        mode = options.get("session_mode", "auto")
        assert mode in ("append", "replace", "auto")
        if mode == "replace":
            transcript[:] = []
        reply = "echo: " + messages[-1]["content"]
        words = reply.split(" ")
        for i, word in enumerate(words):
            if self.interrupt_after is not None and i == self.interrupt_after:
                raise KeyboardInterrupt
            yield TextDelta((" " if i else "") + word)
        transcript.extend(messages)
        transcript.append({"role": "assistant", "content": reply})
        if self.interrupt_at_done:  # Ctrl-C after the server stored the turn, before "done" came
            raise KeyboardInterrupt
        yield Done("stop", {"role": "assistant", "content": reply},
                   {"prompt_tokens": 7, "completion_tokens": len(words), "cached_tokens": 3},
                   {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0})


def make_repl(client=None, **kwargs):
    out = io.StringIO()
    repl = ChatRepl(client or FakeClient(), out=out, **kwargs)
    return repl, out


def test_new_then_resume_last_session():
    client = FakeClient()
    repl, out = make_repl(client)
    assert repl.open_session() == "new session sess1"
    repl.handle("hello there")
    assert "echo: hello there" in out.getvalue()
    assert "[7 → 3 tokens · prefill 100 tok/s · decode 10.0 tok/s · 3 reused" in out.getvalue()
    again, _ = make_repl(client)
    assert again.open_session().startswith("resumed session sess1 (2 messages")
    fresh, _ = make_repl(client, new=True)
    assert fresh.open_session() == "new session sess2"
    named, _ = make_repl(client, session_id="mine")
    assert named.open_session() == "new session mine" and "mine" in client.sessions


def test_slash_commands_and_errors():
    client = FakeClient()
    repl, out = make_repl(client)
    repl.open_session()
    repl.handle("/bogus")
    repl.handle("/temp 0.3")
    repl.handle("/temp 9")
    repl.handle("/think off")
    repl.handle("/think budget x")
    repl.handle("/switch nope")
    repl.handle("question")
    text = out.getvalue()
    assert "error: unknown command /bogus; /help lists the commands" in text
    assert "temperature set to 0.3" in text
    assert "error: temperature must be between 0 and 2" in text
    assert "reasoning: hidden, thinking off" in text
    assert "error: budget must be a whole number" in text
    assert "error: unknown session 'nope'" in text
    request = client.requests[-1]
    assert request["session_mode"] == "append"
    assert request["temperature"] == 0.3
    assert request["chat_template_kwargs"] == {"enable_thinking": False}
    assert request["messages"] == [{"role": "user", "content": "question"}]
    repl.handle("/tail 1")
    assert "[2] assistant\necho: question" in out.getvalue()
    repl.handle("/exit")
    assert repl.running is False


def test_system_prompt_is_sent_first_and_resent_on_change():
    client = FakeClient()
    repl, _ = make_repl(client, settings=ChatSettings(system="be brief"))
    repl.open_session()
    repl.handle("one")
    assert client.requests[-1]["messages"][0] == {"role": "system", "content": "be brief"}
    repl.handle("two")
    assert client.requests[-1]["messages"] == [{"role": "user", "content": "two"}]
    repl.handle("/system be verbose")
    repl.handle("three")
    assert client.requests[-1]["session_mode"] == "replace"
    sent = client.requests[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "be verbose"}
    assert [m["content"] for m in sent[1:]] == ["one", "echo: one", "two", "echo: two", "three"]


def test_ctrl_c_cancels_the_reply_not_the_repl():
    client = FakeClient()
    repl, out = make_repl(client)
    repl.open_session()
    client.interrupt_after = 2
    repl.handle("a long question please")
    assert out.getvalue().rstrip().endswith("[cancelled]")
    client.interrupt_after = None
    repl.handle("again")
    assert "echo: again" in out.getvalue()


def test_ctrl_c_as_the_reply_ends_leaves_no_half_turn():
    client = FakeClient()
    repl, out = make_repl(client)
    repl.open_session()
    repl.handle("first")
    client.interrupt_at_done = True
    repl.handle("second")
    assert out.getvalue().rstrip().endswith("[cancelled]")
    assert [m["content"] for m in client.sessions["sess1"]] == ["first", "echo: first"]
    client.interrupt_at_done = False
    repl.handle("third")
    assert [m["content"] for m in client.sessions["sess1"]][-2:] == ["third", "echo: third"]


def test_replies_are_capped_and_stop_looping_by_default_and_max_changes_the_cap():
    client = FakeClient()
    repl, out = make_repl(client)
    repl.open_session()
    repl.handle("one")
    assert client.requests[-1]["max_tokens"] == 1024 and client.requests[-1]["repetition"] == RepetitionConfig()
    repl.handle("/max")
    repl.handle("/max 64")
    repl.handle("two")
    assert client.requests[-1]["max_tokens"] == 64
    repl.handle("/max off")
    repl.handle("three")
    assert "max_tokens" not in client.requests[-1]
    repl.handle("/max -3")
    repl.handle("/max lots")
    text = out.getvalue()
    assert "max tokens per reply: 1024" in text and "max tokens per reply: 64" in text
    assert "max tokens per reply: no cap" in text
    assert "error: max tokens must be at least 0" in text and "error: max tokens must be a whole number" in text


def test_server_gone_then_reconnect():
    client = FakeClient()
    reconnects = []
    repl, out = make_repl(client, reconnect=lambda: reconnects.append(1) or client)
    repl.open_session()
    client.down = True
    repl.handle("hello")
    assert "error: server gone: cannot reach the spl server" in out.getvalue()
    client.down = False
    client.sessions.clear()  # the server came back without the session
    repl.handle("hello again")
    assert reconnects == [1]
    assert "was gone from the server; started it afresh" in out.getvalue()
    assert "echo: hello again" in out.getvalue()


def test_prepare_message_and_extra_commands():
    client = FakeClient()
    extra = SlashCommand("sources", "list sources", lambda text, repl: "3 sources")

    def prepare(text, repl):
        return [{"role": "user", "content": f"[passages]\n{text}"}]

    repl, out = make_repl(client, name="docs:x", session_id="docs-x", extra_slash_commands=[extra],
                          prepare_message=prepare)
    repl.open_session()
    repl.handle("/sources")
    repl.handle("what?")
    assert "3 sources" in out.getvalue()
    assert client.requests[-1]["messages"][0]["content"] == "[passages]\nwhat?"
    assert chat_state.last_session("docs:x") == "docs-x"
    assert "/sources" in repl.help_text()


def test_ask_once_json():
    from superlinear.plugins.chat import ask_once

    out, err = io.StringIO(), io.StringIO()
    assert ask_once(FakeClient(), "hi", as_json=True, out=out, err=err) == 0
    data = json.loads(out.getvalue())
    assert data["content"] == "echo: hi" and data["finish_reason"] == "stop"
    out, err = io.StringIO(), io.StringIO()
    assert ask_once(FakeClient(), "hi", out=out, err=err) == 0
    assert out.getvalue() == "echo: hi\n" and err.getvalue().startswith("[7 → 2 tokens")


def test_session_slash_commands_dispatch_the_api_commands(monkeypatch):
    seen = []
    original = ChatRepl.dispatch

    def spy(self, command):
        seen.append(type(command).__name__)
        return original(self, command)

    monkeypatch.setattr(ChatRepl, "dispatch", spy)
    client = FakeClient()
    repl, out = make_repl(client)
    repl.open_session()
    repl.handle("one")
    repl.handle("/save first try")
    assert "saved snapshot snap1 (session sess1, 20 tokens); /load snap1 restores it" in out.getvalue()
    repl.handle("/fork")
    assert "forked sess1 → sess2 (now on sess2" in out.getvalue() and repl.session_id == "sess2"
    repl.handle("/rollback -2")
    assert "session sess2: 0 messages" in out.getvalue()
    repl.handle("/load snap1")
    assert "loaded snapshot snap1 into session sess3" in out.getvalue() and repl.session_id == "sess3"
    repl.handle("/history")
    assert "   1  user       one\n   2  assistant  echo: one" in out.getvalue()
    repl.handle("/ls")
    assert "* sess3" in out.getvalue() and "snap1" in out.getvalue()
    repl.handle("/rm sess3 snap1")
    text = out.getvalue()
    assert "removed session sess3\nremoved snapshot snap1\nnew session sess4 (the current one was removed)" in text
    repl.handle("/load snap1")
    assert "error: no snapshot 'snap1'" in out.getvalue()
    assert {"Save", "Fork", "Rollback", "Load", "History", "ListSessions", "ListSnapshots", "CloseSession",
            "DeleteSnapshot"} <= set(seen)


def test_completion_ids_from_the_server():
    client = FakeClient()
    client.snapshots["snapA"] = []
    repl, _ = make_repl(client)
    repl.open_session()
    assert repl.complete_ids("session") == ["sess1"]
    assert repl.complete_ids("id") == ["sess1", "snapA"]


def test_a_broken_plugin_command_does_not_take_the_repl_down():
    def broken(text, repl):
        raise RuntimeError("boom")

    repl, out = make_repl(extra_slash_commands=[SlashCommand("broken", "x", broken),
                                                SlashCommand("data", "y", lambda t, r: {"a": 1})])
    repl.open_session()
    repl.handle("/broken")
    repl.handle("/data")
    assert "error: internal error: RuntimeError: boom" in out.getvalue()
    assert '"a": 1' in out.getvalue()


def test_leaving_an_empty_session_we_created_drops_it():
    client = FakeClient()
    repl, _ = make_repl(client)
    repl.open_session()          # sess1, empty
    repl.handle("/new")          # sess2; sess1 dropped
    assert list(client.sessions) == ["sess2"]
    repl.handle("hello")
    repl.handle("/new")          # sess3; sess2 has messages: kept
    assert list(client.sessions) == ["sess2", "sess3"]
    repl.handle("/switch sess2")  # sess3 empty: dropped
    assert list(client.sessions) == ["sess2"]
    repl.handle("/new")
    repl.handle("/switch sess2")
    assert list(client.sessions) == ["sess2"]


def test_reconnect_replaces_the_client():
    old, new = FakeClient(), FakeClient()
    repl, out = make_repl(old, reconnect=lambda: new)
    repl.open_session()
    old.down = True
    repl.handle("hello")
    repl.handle("hello again")  # reconnects: the new client (a restarted server without the session)
    assert repl.client is new
    repl.handle("/save")  # slash commands dispatch against the new client too
    assert new.snapshots and not old.snapshots
    assert new.requests and "echo: hello again" in out.getvalue()


def test_ask_once_on_a_session_creates_it_and_appends():
    from superlinear.plugins.chat import ask_once

    client = FakeClient()
    out, err = io.StringIO(), io.StringIO()
    settings = ChatSettings(system="be brief")
    assert ask_once(client, "hi", session_id="s-once", settings=settings, out=out, err=err) == 0
    assert client.requests[-1]["messages"][0]["role"] == "system"
    assert ask_once(client, "hi", session_id="s-once", settings=settings, out=out, err=err) == 0
    assert client.requests[-1]["session_mode"] == "append"
    assert client.requests[-1]["messages"] == [{"role": "user", "content": "hi"}]
    assert [m["content"] for m in client.sessions["s-once"]] == ["be brief", "hi", "echo: hi", "hi", "echo: hi"]
