"""rag's operations: ``RagIngest`` and ``RagAsk`` are bus commands (the CLI, `spl docs` and any
plugin dispatch them; they run against the API the context is bound to, else a server that
answers); listing, info, removal and sources are plain functions of the workspaces on disk.

Results are plain dicts (JSON-ready). The callbacks a front end passes ride on the command:
``progress(done, total, path)`` for long ingests, ``status(line)`` for one-line notes, ``prefill``
for the context's prefill (``PrefillProgress`` events: ``PrefillBar.update``), ``on_text(delta)``
to stream the answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from superlinear.bus import Command, Context
from superlinear.errors import Conflict, InvalidRequest, NotFound, UserError

from . import llm
from .llm import ANSWER_TOKENS
from .retrieval import DEFAULT_RETRIEVER, available_retrievers, search
from .workspace import DEFAULT_WORKSPACE, Workspace


@dataclass(frozen=True)
class RagIngest(Command):
    name = "rag.ingest"
    paths: tuple[str, ...] = ()
    workspace: str = DEFAULT_WORKSPACE
    globs: tuple[str, ...] = ()
    chunk_chars: int | None = None
    overlap: int | None = None
    llm: bool = True  # build the context snapshot (needs a server)
    max_seq_len: int | None = None  # of the workspace session; the server's default otherwise
    rebuild: bool = False  # rebuild the context even if the documents did not change
    progress: Callable | None = field(default=None, compare=False, repr=False)
    status: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    prefill: Callable | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class RagAsk(Command):
    name = "rag.ask"
    question: str
    workspace: str = DEFAULT_WORKSPACE
    k: int = 5
    retriever: str = DEFAULT_RETRIEVER
    llm: bool = True
    max_tokens: int = ANSWER_TOKENS
    session_id: str | None = None  # answer in this session (the `spl docs` REPL)
    on_text: Callable[[str], None] | None = field(default=None, compare=False, repr=False)


def _client(ctx: Context):
    """The bound API, or one for a server that answers (started locally if need be): ``(api, owned)``."""
    if ctx.api is not None:
        return ctx.api, False
    from superlinear.client import ensure_server

    return ensure_server(), True


def handle_ingest(command: RagIngest, ctx: Context) -> dict:
    existed = Workspace.exists(command.workspace)
    ws = Workspace.create(command.workspace) if command.paths else Workspace.open(command.workspace)
    try:
        return _ingest(ws, command, ctx)
    except BaseException:
        if not existed:  # a failed first ingest (bad path, Ctrl-C…) leaves no empty workspace behind
            with contextlib.suppress(OSError, UserError):
                ws.remove()
        raise


def _ingest(ws: Workspace, command: RagIngest, ctx: Context) -> dict:
    report = ws.ingest(list(command.paths), command.globs, command.chunk_chars, command.overlap,
                       progress=command.progress)
    # Warm the default retriever's index now rather than on the first question.
    from .retrieval import BM25Retriever

    BM25Retriever(ws).ensure_index()
    out = {"report": report.to_dict(), "workspace": ws.info()}
    if not command.llm:
        out["context"] = {"mode": "skipped", "reason": "--no-llm"} if not ws.manifest.get("context") else \
            {**ws.manifest["context"], "current": llm.context_is_current(ws)}
        return out
    try:
        client, owned = _client(ctx)
    except UserError as exc:  # the index is done; only the context could not be built
        out["context"] = {"mode": "retrieval-only", "reason": f"context not built: {exc.message}"}
        return out
    try:
        if ws.manifest.get("context"):
            _check_snapshot_alive(client, ws)
        if llm.context_is_current(ws) and not command.rebuild and not (
                command.max_seq_len and command.max_seq_len != ws.manifest["context"].get("max_seq_len")):
            out["context"] = {**ws.manifest["context"], "reused": True}
            return out
        out["context"] = llm.build_context(ws, client, max_seq_len=command.max_seq_len, progress=command.status,
                                           on_prefill=command.prefill)
    finally:
        if owned:
            client.close()
    out["workspace"] = ws.info()
    return out


def _check_snapshot_alive(client, ws: Workspace) -> None:
    """A context snapshot removed behind our back just means it must be rebuilt."""
    snapshot_id = (ws.manifest.get("context") or {}).get("snapshot_id")
    try:
        client.get_snapshot(snapshot_id)
    except NotFound:
        ws.set_context(None)


def handle_ask(command: RagAsk, ctx: Context) -> dict:
    ws = Workspace.open(command.workspace)
    if not command.question.strip():
        raise InvalidRequest("the question is empty", param="question")
    passages = search(ws, command.question, command.k, command.retriever)
    out = {
        "question": command.question,
        "workspace": ws.name,
        "retriever": command.retriever,
        "k": command.k,
        "passages": [p.to_dict() for p in passages],
        "citations": [{"n": i, **{k: v for k, v in p.to_dict().items() if k != "text"}}
                      for i, p in enumerate(passages, start=1)],
    }
    if not command.llm:
        out["mode"] = "no-llm"
        return out
    client, owned = _client(ctx)
    try:
        result = llm.answer(ws, client, command.question, passages, max_tokens=command.max_tokens,
                            session_id=command.session_id, on_text=command.on_text)
    finally:
        if owned:
            client.close()
    out.update(result)
    for c in out["citations"]:
        c["cited"] = c["n"] in result["cited"]
    return out


def list_workspaces() -> dict:
    out = []
    for name in Workspace.names():
        try:
            out.append(Workspace(name).info())
        except (OSError, ValueError, KeyError) as exc:  # a damaged manifest must not hide the others
            out.append({"name": name, "error": f"unreadable manifest ({type(exc).__name__})"})
    return {"workspaces": out}


def workspace_info(workspace: str = DEFAULT_WORKSPACE) -> dict:
    ws = Workspace.open(workspace)
    info = ws.info()
    info["context_current"] = llm.context_is_current(ws)
    return info


def remove_workspace(workspace: str, keep_snapshot: bool = False, api=None) -> dict:
    """Remove a workspace and (unless ``keep_snapshot``) its context snapshot, through ``api``
    (None: the server the commands talk to)."""
    try:
        ws = Workspace.open(workspace)
        snapshot_id = (ws.manifest.get("context") or {}).get("snapshot_id")
    except Conflict:  # a damaged manifest: remove the folder all the same
        ws, snapshot_id = Workspace(workspace), None
    ws.remove()
    out = {"removed": ws.name, "snapshot_id": snapshot_id, "snapshot_removed": False}
    if snapshot_id and not keep_snapshot:
        from superlinear.client import SplClient

        try:
            (api or SplClient()).delete_snapshot(snapshot_id)
            out["snapshot_removed"] = True
        except UserError as exc:  # server down or snapshot gone: the workspace is removed anyway
            out["snapshot_error"] = exc.message
    return out


def sources(workspace: str = DEFAULT_WORKSPACE) -> dict:
    ws = Workspace.open(workspace)
    from .workspace import display_path

    return {"workspace": ws.name, "roots": ws.manifest.get("roots", []),
            "files": [{"path": display_path(p), "abs_path": p, **meta} for p, meta in sorted(ws.files().items())]}


def retrievers() -> dict:
    return {"retrievers": [{"name": n, "plugin": plugin, "default": n == DEFAULT_RETRIEVER}
                           for n, (plugin, _f) in sorted(available_retrievers().items())]}


HANDLERS = [(RagIngest, handle_ingest), (RagAsk, handle_ask)]
