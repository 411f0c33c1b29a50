"""`spl docs NAME`: the chat REPL in the workspace session, driven in-process (no terminal)
against the in-memory server of test_rag_llm: the session starts from the context snapshot,
messages get retrieved passages, /rag, /sources, /add and /reset work through the bus."""

from __future__ import annotations

import io

import pytest
from rag_corpus import copy_click_docs
from test_rag_llm import FakeServer

from superlinear.api import Done, TextDelta, chat_turn
from superlinear.bus import Context, dispatch
from superlinear.errors import InvalidRequest
from superlinear.plugins.chat import ChatRepl, ChatSettings
from superlinear.plugins.rag import docs as docs_mod
from superlinear.plugins.rag import llm
from superlinear.plugins.rag.commands import RagIngest


class Server(FakeServer):
    reply = "The answer is in the passages [1]."

    def history(self, session_id):
        sid = session_id
        return list(self.sessions[sid]["messages"])

    def chat(self, turn):
        """The reply in pieces of four characters, stored in the session as the server would."""
        self.turn = turn
        session = self.sessions[turn.session_id]
        session["messages"] = session["messages"] + turn.request.messages + [{"role": "assistant",
                                                                              "content": self.reply}]
        for i in range(0, len(self.reply), 4):
            yield TextDelta(self.reply[i:i + 4])
        yield Done("stop", {"role": "assistant", "content": self.reply}, {"prompt_tokens": 9, "completion_tokens": 5},
                   {})


@pytest.fixture
def repl(tmp_path, monkeypatch):
    monkeypatch.setenv("SPL_WORKSPACES_DIR", str(tmp_path / "ws"))
    monkeypatch.setenv("SPL_STATE_DIR", str(tmp_path / "state"))
    server = Server()
    docs = copy_click_docs(tmp_path / "docs")
    dispatch(RagIngest((str(docs),), "click"), Context(api=server))
    state = docs_mod.DocsState("click", "docs-click", k=2)
    docs_mod.reset_session(server, state)
    docs = docs_mod.Docs(state)
    r = ChatRepl(server, name="docs:click", session_id=state.session_id,
                 extra_slash_commands=docs.slash_commands(), prepare_message=docs.prepare_message,
                 out=io.StringIO(), reply_filter=docs.reply_filter,
                 settings=ChatSettings(max_tokens=docs_mod.DOCS_MAX_TOKENS, repetition=llm.ANSWER_REPETITION))
    r.docs = docs
    r.server = server
    r.tmp = tmp_path
    return r


def test_session_starts_from_the_snapshot_and_messages_get_passages(repl):
    history = repl.server.history("docs-click")
    assert [m["role"] for m in history] == ["system"] and "Pallets" in history[0]["content"]
    messages = turn(repl, "Who holds the copyright?")
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert "[1] " in messages[0]["content"] and "LICENSE.txt:" in messages[0]["content"]
    assert len(repl.docs.state.last_passages) == 2


def turn(repl, text: str) -> list[dict]:
    """The messages `spl docs` sends for ``text`` (what its prepare_message hook makes of it)."""
    prepared = repl.docs.prepare_message(text, repl)
    return [{"role": "user", "content": prepared}] if isinstance(prepared, str) else prepared


def said(repl) -> str:
    text = repl.out.getvalue()
    repl.out.seek(0)
    repl.out.truncate()
    return text


def test_rag_settings(repl):
    repl.run_slash("/rag k 1")
    assert repl.docs.state.k == 1
    repl.run_slash("/rag retriever light")
    assert repl.docs.state.retriever == "light"
    assert "[2] " not in turn(repl, "copyright")[0]["content"]
    repl.run_slash("/rag off")
    assert turn(repl, "plain question")[0]["content"] == "plain question"
    with pytest.raises(InvalidRequest):
        repl.run_slash("/rag retriever nope")
    with pytest.raises(InvalidRequest):
        repl.run_slash("/rag sideways")
    assert "retrieval off" in said(repl)


def test_sources_add_and_reset(repl):
    repl.run_slash("/sources")
    out = said(repl)
    assert "README.md" in out and "LICENSE.txt" in out
    extra = repl.tmp / "notes.md"
    extra.write_text("# Notes\nThe walrus option makes every command louder.\n")
    old_snapshot = dict(repl.server.snapshots)
    repl.run_slash(f"/add {extra}")
    out = said(repl)
    assert "1 added" in out and "context rebuilt" in out
    assert set(repl.server.snapshots) != set(old_snapshot)
    assert "notes.md:" in turn(repl, "walrus option")[0]["content"]
    # A turn, then /reset drops it: back to the (new) documents.
    list(repl.server.chat(chat_turn([{"role": "user", "content": "hi"}], session_id="docs-click")))
    assert len(repl.server.history("docs-click")) == 3
    repl.run_slash("/reset")
    history = repl.server.history("docs-click")
    assert [m["role"] for m in history] == ["system"] and "walrus" in history[0]["content"]
    assert "reset to snapshot" in said(repl)


def test_a_bad_rag_setting_is_refused(repl):
    with pytest.raises(InvalidRequest, match="usage: /rag"):
        repl.docs.rag_setting("k zero")


def test_retrieval_only_workspace_gets_a_system_prompt_on_the_first_turn(tmp_path, monkeypatch):
    monkeypatch.setenv("SPL_WORKSPACES_DIR", str(tmp_path / "ws"))
    monkeypatch.setenv("SPL_STATE_DIR", str(tmp_path / "state"))
    server = Server()
    docs = copy_click_docs(tmp_path / "docs")
    dispatch(RagIngest((str(docs),), "plain", llm=False))
    state = docs_mod.DocsState("plain", "docs-plain", k=1)
    assert "no context snapshot" in docs_mod.reset_session(server, state)
    r = ChatRepl(server, name="docs:plain", session_id=state.session_id, out=io.StringIO())
    r.docs = docs_mod.Docs(state)
    first = turn(r, "Who holds the copyright?")
    assert [m["role"] for m in first] == ["system", "user"] and "LICENSE.txt:" in first[1]["content"]
    list(server.chat(chat_turn(first, session_id=state.session_id)))
    assert [m["role"] for m in turn(r, "And the license?")] == ["user"]


def test_a_reply_cites_only_passages_it_was_given(repl):
    repl.server.reply = "Pallets holds it [1][7]. See also [2, 9]."
    repl.handle("Who holds the copyright?")
    out = said(repl)
    assert "Pallets holds it [1]. See also [2]." in out and "[7]" not in out.split("dropped")[0]
    assert "dropped citations of passages that were not given: [7], [9] (given: [1]-[2])" in out
    passages = repl.docs.state.last_passages
    assert f"sources: [1] {passages[0].citation}, [2] {passages[1].citation}" in out
    # The reply was sent with the answer defaults: a cap and the repetition stop.
    assert repl.server.turn.request.sampling.max_tokens == docs_mod.DOCS_MAX_TOKENS
    assert repl.server.turn.request.repetition == llm.ANSWER_REPETITION
    repl.server.reply = "I do not know."
    repl.handle("What does the license say about warranty?")
    assert "no passage cited (2 were given" in said(repl)
