"""``spl docs NAME``: the `spl chat` REPL in a workspace session.

The session ``docs-NAME`` starts from the workspace's context snapshot (the documents already
prefilled) and is resumed if it exists; each message gets the passages retrieved for it,
numbered for citation. Slash commands: ``/add PATH…`` ingests more files and rebuilds the
context (rag's ingest command, through the REPL's API), ``/sources`` lists the files,
``/rag k N | retriever NAME | off | on`` tunes retrieval, ``/reset`` goes back to the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from superlinear.chat_ui import OpenChat, SlashCommand, split_args
from superlinear.errors import InvalidRequest, UserError

from . import commands, llm
from .answers import AnswerStream
from .commands import RagIngest
from .retrieval import available_retrievers, search
from .workspace import Workspace


@dataclass
class DocsState:
    workspace: str
    session_id: str
    k: int = 5
    retriever: str = "bm25"
    enabled: bool = True
    last_passages: list = field(default_factory=list)


def reset_session(client, state: DocsState) -> str:
    """Put the workspace session back to the ingested documents (or empty without a context)."""
    ws = Workspace.open(state.workspace)
    try:
        client.close_session(state.session_id)
    except UserError:
        pass
    if llm.context_is_current(ws):
        snapshot_id = ws.manifest["context"]["snapshot_id"]
        client.load(snapshot_id, session_id=state.session_id, force=True)
        return f"session {state.session_id} reset to snapshot {snapshot_id} ({ws.manifest['context']['tokens']} tokens)"
    client.create_session(state.session_id)
    return f"session {state.session_id} reset (no context snapshot: answers come from the passages)"


class Docs:
    """What `spl docs` adds to the chat REPL, over one workspace session (``state``): its slash
    commands, the passages put into each message, the check of each reply's citations."""

    def __init__(self, state: DocsState):
        self.state = state

    def rag_setting(self, setting: str) -> str:
        """``k N`` | ``retriever NAME`` | ``off`` | ``on`` | ``""`` (show)."""
        state, words = self.state, setting.split()
        if not words:
            pass
        elif words[0] == "off":
            state.enabled = False
        elif words[0] == "on":
            state.enabled = True
        elif words[0] == "k" and len(words) == 2 and words[1].isdigit() and int(words[1]) >= 1:
            state.k = int(words[1])
            state.enabled = True
        elif words[0] == "retriever" and len(words) == 2:
            if words[1] not in available_retrievers():
                raise InvalidRequest(f"unknown retriever {words[1]!r} (available: "
                                     f"{', '.join(sorted(available_retrievers()))})")
            state.retriever = words[1]
            state.enabled = True
        else:
            raise InvalidRequest("usage: /rag k N | retriever NAME | off | on")
        return f"retrieval {'on' if state.enabled else 'off'}: k={state.k}, retriever={state.retriever}"

    def reset(self, repl) -> str:
        note = reset_session(repl.client, self.state)
        repl.adopt(self.state.session_id)  # continue on the reset session
        return note

    def add(self, text: str, repl) -> str:
        paths = split_args(text)
        if not paths:
            raise InvalidRequest("usage: /add PATH…")
        result = repl.dispatch(RagIngest(tuple(paths), self.state.workspace))
        r = result["report"]
        c = result.get("context") or {}
        line = (f"{len(r['added'])} added, {len(r['updated'])} updated, {r['unchanged']} "
                f"unchanged, {len(r['skipped'])} skipped -> {r['files']} files, {r['chunks']} passages")
        if c.get("snapshot_id"):
            line += f"; context rebuilt: {c.get('tokens')} tokens in snapshot {c['snapshot_id']} (/reset to use it)"
        else:
            line += f"; {c.get('mode', 'retrieval-only')}: {c.get('reason', '')}"
        return line

    def sources(self, text: str, repl) -> str:
        result = commands.sources(self.state.workspace)
        lines = [f"{f['path']}  ({f.get('lines')} lines, {f.get('chunks')} passages)" for f in result["files"]]
        return "\n".join(lines) or "no documents (/add PATH…)"

    def slash_commands(self) -> list[SlashCommand]:
        return [
            SlashCommand("add", "Ingest files or folders into this workspace", self.add, usage="/add PATH…"),
            SlashCommand("sources", "List the workspace's files", self.sources, usage="/sources"),
            SlashCommand("rag", "Retrieval settings", lambda text, repl: self.rag_setting(text.strip()),
                         usage="/rag k N|retriever NAME|off|on"),
            SlashCommand("reset", "Back to the ingested documents (drops this conversation)",
                         lambda text, repl: self.reset(repl), usage="/reset"),
        ]

    def prepare_message(self, text: str, repl):
        """The typed question plus the passages retrieved for it (numbered for citation)."""
        state = self.state
        if not state.enabled:
            state.last_passages = []
            return text
        ws = Workspace.open(state.workspace)
        passages = search(ws, text, state.k, state.retriever) if text.strip() else []
        state.last_passages = passages
        message = llm.question_message(text, passages)
        if not llm.context_is_current(ws) and not repl.history():
            return [{"role": "system", "content": llm.SYSTEM_PASSAGES}, {"role": "user", "content": message}]
        return message

    def reply_filter(self, repl) -> CheckedReply | None:
        """A checker for the turn about to stream, when it was sent with passages."""
        state = self.state
        return CheckedReply(state.last_passages) if state.enabled and state.last_passages else None


DOCS_MAX_TOKENS = 512  # a reply over the documents is an answer, not an essay


class CheckedReply:
    """The REPL's view of an answer: citations checked against the passages sent with the
    question and a loop cut (``answers.AnswerStream``), then the cited sources listed."""

    def __init__(self, passages: list) -> None:
        self.passages = passages
        self.stream = AnswerStream(len(passages))

    def feed(self, text: str) -> str:
        return self.stream.feed(text)

    def finish(self) -> str:
        return self.stream.finish()

    def notes(self) -> list[str]:
        result = self.stream.result
        lines = result.notes(len(self.passages))
        if result.cited:
            lines.append("sources: " + ", ".join(f"[{n}] {self.passages[n - 1].citation}" for n in result.cited))
        else:
            lines.append(f"no passage cited ({len(self.passages)} were given; /tail 2 shows them)")
        return lines


def run_docs(name: str, *, url: str | None = None, k: int = 5, retriever: str = "bm25",
             max_tokens: int | None = None, temperature: float | None = None) -> int:
    from superlinear import connect
    from superlinear.bus import Context, dispatch
    from superlinear.server_process import stderr_progress

    ws = Workspace.open(name)
    if retriever not in available_retrievers():
        raise InvalidRequest(f"unknown retriever {retriever!r}")
    client = connect(url, start=True, progress=stderr_progress)
    state = DocsState(name, f"docs-{name}", k=k, retriever=retriever)
    try:
        client.get_session(state.session_id)
        opened = f"resumed session {state.session_id} (/reset goes back to the documents)"
    except UserError:
        opened = reset_session(client, state)
    info = ws.info()
    banner = (f"docs {name}: {info['files']} files, {info['chunks']} passages; {opened}\n"
              f"each message gets {k} passages from {retriever}; /add, /sources, /rag, /reset")
    docs = Docs(state)
    chat = OpenChat(repl_name=f"docs:{name}", session_id=state.session_id, banner=banner,
                    slash_commands=tuple(docs.slash_commands()), prepare_message=docs.prepare_message,
                    reply_filter=docs.reply_filter, max_tokens=max_tokens or DOCS_MAX_TOKENS,
                    temperature=temperature, repetition=llm.ANSWER_REPETITION)
    try:
        return dispatch(chat, Context(api=client))
    finally:
        client.close()
