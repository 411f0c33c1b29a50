"""The model side of rag against an in-memory stand-in for the server (same client methods,
same session-chat rule): the documents are prefilled once and snapshotted, each question loads
the snapshot (no re-prefill) with numbered passages, citations map to path:lines, too-large
documents fall back to retrieval-only, stale contexts are not used. The real server is
exercised in test_rag_e2e.py."""

from __future__ import annotations

import itertools
import re

import pytest
from rag_corpus import copy_click, copy_click_docs

from superlinear.api import Done, PrefillProgress, TextDelta
from superlinear.bus import Context, dispatch
from superlinear.errors import NotFound, TooLarge
from superlinear.plugins.rag import commands, llm
from superlinear.plugins.rag.commands import RagAsk, RagIngest
from superlinear.plugins.rag.workspace import Workspace


class FakeServer:
    """Sessions hold messages; a token is 4 characters; the reply cites passage [1]."""

    def __init__(self, default_max_seq_len: int = 8192, trained: int = 1 << 20, memory_limit: int = 1 << 20):
        self.default = default_max_seq_len
        self.trained, self.memory_limit = trained, memory_limit  # what /v1/models and /health say
        self.sessions: dict[str, dict] = {}
        self.snapshots: dict[str, dict] = {}
        self.prefilled_chars = 0
        self.calls: list[tuple[str, str | None, list[dict]]] = []
        self.ids = itertools.count(1)
        self.base_url = "http://fake"
        self.queued = 0  # other requests /health reports waiting or running

    @staticmethod
    def tokens(messages) -> int:
        return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)

    def tokenize(self, messages, **kw) -> dict:
        return {"count": self.tokens(messages)}

    def create_session(self, session_id=None, max_seq_len=None, ephemeral=False):
        self.created_ephemeral = ephemeral
        sid = session_id or f"s{next(self.ids)}"
        self.sessions[sid] = {"messages": [], "max_seq_len": max_seq_len or self.default, "ephemeral": ephemeral}
        return self.get_session(sid)

    def get_session(self, session_id):
        sid = session_id
        if sid not in self.sessions:
            raise NotFound(f"no session {sid}")
        s = self.sessions[sid]
        return {"id": sid, "position": self.tokens(s["messages"]), "max_seq_len": s["max_seq_len"],
                "message_count": len(s["messages"]), "ephemeral": s.get("ephemeral", False)}

    def close_session(self, session_id):
        sid = session_id
        info = self.get_session(sid)
        del self.sessions[sid]
        return info

    def chat(self, turn):
        """The turn's events as the real API yields them (progress first, as the engine does)."""
        messages, session_id = turn.request.messages, turn.session_id
        self.calls.append(("chat", session_id, messages))
        reply = "The answer is in the passages [1]." if turn.request.sampling.max_tokens != 1 else "O"
        if session_id is None:
            usage_messages = messages
        else:
            s = self.sessions[session_id]
            if self.tokens(s["messages"] + messages) > s["max_seq_len"]:
                raise TooLarge("context_length_exceeded")
            s["messages"] = s["messages"] + messages + [{"role": "assistant", "content": reply}]
            usage_messages = s["messages"][:-1]
        self.prefilled_chars += sum(len(m["content"]) for m in messages)
        yield PrefillProgress(0, 2, 0, 0.0)
        yield TextDelta(reply)
        yield Done("stop", {"role": "assistant", "content": reply}, {"prompt_tokens": self.tokens(usage_messages)}, {})

    def health(self, timeout=None):
        return {"status": "ok", "model": "fake", "queued": self.queued}

    def models(self):
        return [{"id": "fake", "max_model_len": self.trained, "max_seq_len_limit": self.memory_limit}]

    def rollback(self, session_id, n):
        sid = session_id
        self.sessions[sid]["messages"] = self.sessions[sid]["messages"][:n]
        return self.get_session(sid)

    def save(self, session_id, title=None, description=None, tags=None):
        sid = session_id
        snap = f"snap{next(self.ids)}"
        self.snapshots[snap] = {"id": snap, "messages": list(self.sessions[sid]["messages"]),
                                "max_seq_len": self.sessions[sid]["max_seq_len"], "tags": tags}
        return {"id": snap, "title": title}

    def get_snapshot(self, snapshot_id):
        snap = snapshot_id
        if snap not in self.snapshots:
            raise NotFound(f"no snapshot {snap}")
        return self.snapshots[snap]

    def delete_snapshot(self, snapshot_id):
        snap = snapshot_id
        self.get_snapshot(snap)
        del self.snapshots[snap]
        return {"id": snap, "deleted": True}

    def load(self, snapshot_id, session_id=None, force=False, max_seq_len=None, ephemeral=False):
        snap = snapshot_id
        self.get_snapshot(snap)
        sid = session_id or f"s{next(self.ids)}"
        self.sessions[sid] = {"messages": list(self.snapshots[snap]["messages"]),
                              "max_seq_len": self.snapshots[snap]["max_seq_len"], "ephemeral": ephemeral}
        self.loads = getattr(self, "loads", []) + [(snap, ephemeral)]
        return self.get_session(sid)

    def close(self):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("SPL_WORKSPACES_DIR", str(tmp_path / "workspaces"))
    return FakeServer()


def ctx_for(server) -> Context:
    return Context(api=server)


def test_ingest_builds_context_snapshot_and_ask_loads_it(tmp_path, server):
    docs = copy_click_docs(tmp_path / "docs")
    out = dispatch(RagIngest((str(docs),), "readme"), ctx_for(server))
    context = out["context"]
    assert context["mode"] == "context" and context["snapshot_id"] in server.snapshots
    assert context["tokens"] > 100 and not server.sessions  # the build session was closed
    snap_messages = server.snapshots[context["snapshot_id"]]["messages"]
    assert [m["role"] for m in snap_messages] == ["system"]  # the one-token reply was rolled back
    assert "Interface Creation Kit" in snap_messages[0]["content"]
    assert Workspace.open("readme").manifest["context"]["snapshot_id"] == context["snapshot_id"]

    prefilled = server.prefilled_chars
    answer = dispatch(RagAsk("What does Click stand for? Creation Kit", "readme", k=2), ctx_for(server))
    assert answer["mode"] == "context" and answer["snapshot_id"] == context["snapshot_id"]
    # The question went to a session loaded from the snapshot, with only the new user message.
    kind, sid, messages = server.calls[-1]
    assert sid is not None and [m["role"] for m in messages] == ["user"]
    assert server.loads[-1] == (context["snapshot_id"], True)  # ephemeral: nothing of it goes to disk
    assert server.created_ephemeral  # the documents' session too: only its snapshot is written
    assert server.prefilled_chars - prefilled == len(messages[0]["content"])  # no re-prefill
    assert "[1] " in messages[0]["content"] and "README.md:" in messages[0]["content"]
    assert answer["cited"] == [1]
    first = answer["citations"][0]
    assert first["cited"] and first["path"].endswith("README.md")
    assert re.search(r"README\.md:\d+(-\d+)?$", first["citation"])
    assert not server.sessions  # the question's session was closed

    # Re-ingest with nothing changed reuses the snapshot; --rebuild replaces (and deletes) it.
    again = dispatch(RagIngest((str(docs),), "readme"), ctx_for(server))["context"]
    assert again["reused"] and again["snapshot_id"] == context["snapshot_id"]
    rebuilt = dispatch(RagIngest((), "readme", rebuild=True), ctx_for(server))["context"]
    assert rebuilt["snapshot_id"] != context["snapshot_id"]
    assert list(server.snapshots) == [rebuilt["snapshot_id"]]

    removed = commands.remove_workspace("readme", api=server)
    assert removed["snapshot_removed"] and not server.snapshots


def test_ingest_says_what_it_waits_for_after_the_prefill(tmp_path, server):
    docs = copy_click_docs(tmp_path / "docs")
    server.queued = 2
    notes: list[str] = []
    dispatch(RagIngest((str(docs),), "busy", status=notes.append), ctx_for(server))
    assert notes[-1] == ("saving the context snapshot on the server (it is busy with 2 other requests: "
                         "waiting for them)…"), notes


def test_too_large_documents_are_answered_from_passages(tmp_path, server):
    src = copy_click(tmp_path / "click")  # ~450k characters: far over an 8k-token session
    out = dispatch(RagIngest((str(src),), "big"), ctx_for(server))
    assert out["context"]["mode"] == "retrieval-only"
    # The reason says what the documents need, what the session holds, and the option to change.
    reason = out["context"]["reason"]
    needed = out["context"]["needed_tokens"]
    assert re.search(rf"need {needed} tokens \(\+\d+ for a question and its answer\) but the session "
                     r"holds 8192: ingest again with --max-seq-len (\d+)", reason), reason
    suggested = int(re.search(r"--max-seq-len (\d+)", reason).group(1))
    assert suggested % 1024 == 0 and llm.context_budget(suggested, 5, 1200) >= needed
    assert not server.snapshots and not server.sessions
    assert server.prefilled_chars == 0  # not even tried: the server's token count is over the budget
    answer = dispatch(RagAsk("How do I show a progress bar?", "big", k=3), ctx_for(server))
    assert answer["mode"] == "retrieval-only"
    assert answer["note"] == f"retrieval-only: {reason}"  # why, as the ingest said it (and `spl rag info`)
    kind, sid, messages = server.calls[-1]
    assert sid is None and [m["role"] for m in messages] == ["system", "user"]
    assert answer["citations"][0]["path"].endswith("termui.py")
    info = commands.workspace_info("big")
    assert info["mode"] == "retrieval-only" and info["retrieval_only_reason"] == reason


@pytest.mark.parametrize("limit", ["trained", "memory"])
def test_advice_names_no_length_the_model_or_the_memory_cannot_take(tmp_path, server, limit):
    """A corpus needing ~120K tokens on a model trained on 8192 (or a budget of 65536 tokens):
    no --max-seq-len is advised, the limit in the way is named, and each answer's note repeats it."""
    if limit == "trained":
        server.trained = 8192
    else:
        server.memory_limit = 65536
    src = copy_click(tmp_path / "click")
    out = dispatch(RagIngest((str(src),), "big"), ctx_for(server))
    reason = out["context"]["reason"]
    assert out["context"]["mode"] == "retrieval-only" and out["context"]["needed_tokens"] > 65536
    assert "--max-seq-len" not in reason, reason
    if limit == "trained":
        assert "the model was trained on 8192 tokens" in reason, reason
    else:
        assert "memory budget allows sessions of 65536 tokens" in reason, reason
    assert "answered from the retrieved passages" in reason
    answer = dispatch(RagAsk("How do I show a progress bar?", "big", k=3), ctx_for(server))
    assert answer["mode"] == "retrieval-only" and answer["note"] == f"retrieval-only: {reason}"


def test_prefill_over_budget_falls_back(tmp_path, server):
    docs = copy_click_docs(tmp_path / "docs")
    size = sum(len(p.read_text()) for p in docs.iterdir())
    # A session long enough to hold the documents but not the room kept for questions.
    server.default = size // 4 + 200
    out = dispatch(RagIngest((str(docs),), "tight"), ctx_for(server))
    assert out["context"]["mode"] == "retrieval-only" and not server.snapshots and not server.sessions
    assert server.prefilled_chars == 0  # counted first: no prefill was tried
    assert re.search(rf"need {out['context']['needed_tokens']} tokens .* holds {server.default}: "
                     r"ingest again with --max-seq-len \d+", out["context"]["reason"])


def test_stale_context_is_not_used(tmp_path, server):
    docs = copy_click_docs(tmp_path / "docs")
    dispatch(RagIngest((str(docs),), "w"), ctx_for(server))
    (docs / "NEWS.md").write_text("# News\nThe otter release.\n")
    dispatch(RagIngest((), "w", llm=False), ctx_for(server))
    assert not commands.workspace_info("w")["context_current"]
    answer = dispatch(RagAsk("otter release", "w", k=1), ctx_for(server))
    assert answer["mode"] == "retrieval-only" and "changed" in answer["note"]
    assert answer["citations"][0]["path"].endswith("NEWS.md")
    # Ingest with the model again brings the context up to date.
    assert dispatch(RagIngest((), "w"), ctx_for(server))["context"]["mode"] == "context"
    assert dispatch(RagAsk("otter release", "w", k=1), ctx_for(server))["mode"] == "context"


def test_missing_snapshot_falls_back_with_a_note(tmp_path, server):
    docs = copy_click_docs(tmp_path / "docs")
    snap = dispatch(RagIngest((str(docs),), "w"), ctx_for(server))["context"]["snapshot_id"]
    server.delete_snapshot(snap)
    answer = dispatch(RagAsk("license", "w", k=1), ctx_for(server))
    assert answer["mode"] == "retrieval-only" and "gone" in answer["note"]
    # The next ingest notices and rebuilds it.
    assert dispatch(RagIngest((), "w"), ctx_for(server))["context"]["snapshot_id"] in server.snapshots


def test_citation_numbers_are_parsed():
    assert llm.cited_numbers("see [2] and [1, 3]; not [9] nor [x]", 3) == [2, 1, 3]
    assert llm.cited_numbers("no citations", 3) == []
