"""The model side of RAG, the superlinear way.

Ingest: the documents go once into a long context — a workspace session on the server whose
first (system) message holds every document — and that session is snapshotted (``/save``); the
snapshot id is kept in the workspace manifest. Ask: the snapshot is loaded into a fresh session
(no re-prefill: its cache comes back from disk), and the question is sent with the retrieved
passages numbered ``[1]…[k]``; the answer cites them and the numbers map to ``path:lines``.

When the documents do not fit the context budget (the session's length minus room for
questions and answers), or no context was built, questions are answered from the retrieved
passages alone ("retrieval-only").
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from superlinear.errors import NotFound, TooLarge, UserError

from .files import file_hash, read_lines
from .retrieval import Passage
from .workspace import Workspace, display_path

CHARS_PER_TOKEN = 3.2  # conservative for English and code with BPE tokenizers; the server's count is used after
ANSWER_TOKENS = 256
PASSAGE_CHARS = 900  # each retrieved passage as quoted in the question

SYSTEM_CONTEXT = (
    "You answer questions about the documents below. Use only what they say. Cite the numbered "
    "passages given with each question like [1] or [2]. If the documents do not contain the "
    "answer, say so.\n\n"
)
SYSTEM_PASSAGES = (
    "You answer questions from the numbered passages the user gives. Use only what they say and cite "
    "them like [1] or [2]. If they do not contain the answer, say so."
)


def render_documents(workspace: Workspace) -> tuple[str, list[str]]:
    """All documents as one text (a header per file), from the files as ingested; a file that
    changed on disk since is left out and listed, so the context never disagrees with the index."""
    parts, stale = [], []
    files = workspace.files()
    for path in sorted(files):
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError:
            stale.append(path)
            continue
        if file_hash(data) != files[path].get("sha256"):
            stale.append(path)
            continue
        lines, _kind = read_lines(p, data)
        body = "\n".join(text for _, text in lines).strip()
        if body:
            parts.append(f"=== {display_path(path)} ===\n{body}\n")
    return "\n".join(parts), stale


def question_message(question: str, passages: list[Passage]) -> str:
    if not passages:
        return f"Question: {question}\n(No passage matched the question.)"
    blocks = []
    for i, p in enumerate(passages, start=1):
        text = p.text if len(p.text) <= PASSAGE_CHARS else p.text[:PASSAGE_CHARS] + " …"
        blocks.append(f"[{i}] {p.citation}\n{text}")
    return ("Passages:\n\n" + "\n\n".join(blocks)
            + f"\n\nQuestion: {question}\nAnswer briefly and cite the passages you use, like [1].")


def cited_numbers(answer: str, n_passages: int) -> list[int]:
    found: list[int] = []
    for group in re.findall(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]", answer):
        for number in re.split(r"\s*[,;]\s*", group):
            value = int(number)
            if 1 <= value <= n_passages and value not in found:
                found.append(value)
    return found


def context_budget(max_seq_len: int, k: int, max_chars: int) -> int:
    """Tokens the documents may take: the session length less room for a question with its k passages
    and the answer."""
    per_passage = min(max_chars, PASSAGE_CHARS) / CHARS_PER_TOKEN + 16
    reserve = int(k * per_passage + ANSWER_TOKENS + 128)
    return max(0, max_seq_len - reserve)


def build_context(workspace: Workspace, client, *, max_seq_len: int | None = None, k: int = 5,
                  progress=None) -> dict:
    """Prefill the documents into a new session, snapshot it, record it in the manifest.

    Returns the context record (``mode`` "context") or, when the documents do not fit,
    ``{"mode": "retrieval-only", "reason": ...}`` (and the manifest's context is cleared).
    """
    old = workspace.manifest.get("context") or {}
    text, stale = render_documents(workspace)
    if not text.strip():
        workspace.set_context(None)
        _drop_snapshot(client, old.get("snapshot_id"))
        return {"mode": "retrieval-only", "reason": "no documents"}
    system = SYSTEM_CONTEXT + "Documents:\n\n" + text
    session = client.create_session(max_seq_len=max_seq_len)
    session_id = session["id"]
    limit = int(session.get("max_seq_len") or max_seq_len or 0)
    budget = context_budget(limit, k, workspace.manifest["chunking"]["max_chars"]) if limit else None
    estimate = int(len(system) / CHARS_PER_TOKEN)
    try:
        if budget is not None and estimate > budget * 1.6:
            # Far too large: do not even try the prefill.
            raise TooLarge(f"about {estimate} tokens of documents > budget {budget}")
        if progress:
            progress(f"prefilling the documents (~{estimate} tokens) into session {session_id}…")
        started = time.perf_counter()
        result = client.chat([{"role": "system", "content": system}], session_id=session_id,
                             max_tokens=1, temperature=0.0)
        prefill_s = time.perf_counter() - started
        tokens = int((result.usage or {}).get("prompt_tokens") or 0)
        if budget is not None and tokens > budget:
            raise TooLarge(f"{tokens} tokens of documents > budget {budget}")
        # Keep only the documents: drop the one token generated to run the prefill.
        try:
            client.rollback(session_id, 1)
        except UserError:
            pass  # an older server: the context keeps the tiny reply, which does no harm
        info = client.get_session(session_id)
        snap = client.save_session(session_id, title=f"rag workspace {workspace.name}",
                                   description=f"documents of spl rag workspace {workspace.name!r}",
                                   tags=["rag", f"rag:{workspace.name}"])
    except TooLarge as exc:
        _delete_session(client, session_id)
        workspace.set_context(None)
        _drop_snapshot(client, old.get("snapshot_id"))
        return {"mode": "retrieval-only", "reason": f"documents do not fit the context ({exc.message})",
                "estimate_tokens": estimate, "budget_tokens": budget}
    except BaseException:
        _delete_session(client, session_id)
        raise
    _delete_session(client, session_id)
    snapshot_id = snap.get("id") or snap.get("snapshot_id")
    context = {
        "mode": "context",
        "snapshot_id": snapshot_id,
        "tokens": int(info.get("position") or tokens),  # what the snapshot holds
        "position": info.get("position"),
        "max_seq_len": limit or info.get("max_seq_len"),
        "budget_tokens": budget,
        "prefill_s": round(prefill_s, 3),
        "model": (result.raw or {}).get("model"),
        "server": getattr(client, "base_url", None),
        "corpus_hash": workspace.version,
        "stale_files": stale,
    }
    workspace.set_context(context)
    if old.get("snapshot_id") and old.get("snapshot_id") != snapshot_id:
        _drop_snapshot(client, old.get("snapshot_id"))
    return context


def context_is_current(workspace: Workspace) -> bool:
    context = workspace.manifest.get("context") or {}
    return bool(context.get("snapshot_id")) and context.get("corpus_hash") == workspace.version


def _chat(client, messages: list[dict], on_text=None, **options):
    """One turn; streamed to ``on_text(delta)`` when given (the CLI prints the answer as it comes)."""
    options.setdefault("repetition_detection", True)  # small models loop: stop them early
    if on_text is None:
        return client.chat(messages, **options)
    from superlinear.plugins.client import collect

    def events():
        for event in client.chat_stream(messages, **options):
            if event.type == "text" and event.text:
                on_text(event.text)
            yield event

    return collect(events())


def answer(workspace: Workspace, client, question: str, passages: list[Passage], *,
           max_tokens: int = ANSWER_TOKENS, temperature: float = 0.0, session_id: str | None = None,
           on_text=None) -> dict:
    """Answer from the workspace context (snapshot) when there is a current one, else from the
    passages alone. With ``session_id`` (the `spl docs` REPL) the question goes to that session."""
    message = {"role": "user", "content": question_message(question, passages)}
    context = workspace.manifest.get("context") or {}
    mode, note, loaded = "retrieval-only", None, None
    started = time.perf_counter()
    if session_id is not None:
        result = _chat(client, [message], on_text, session_id=session_id, max_tokens=max_tokens,
                       temperature=temperature)
        mode = "context" if context_is_current(workspace) else "session"
    elif context_is_current(workspace):
        try:
            loaded = client.load_snapshot(context["snapshot_id"])["id"]
        except NotFound:
            note = (f"the context snapshot {context['snapshot_id']} is gone: answering from the passages "
                    "(re-run `spl rag ingest` to rebuild it)")
        if loaded:
            try:
                result = _chat(client, [message], on_text, session_id=loaded, max_tokens=max_tokens,
                               temperature=temperature)
                mode = "context"
            finally:
                _delete_session(client, loaded)
    elif context.get("snapshot_id"):
        note = "the documents changed since the context was built: answering from the passages"
    if mode == "retrieval-only":
        result = _chat(client, [{"role": "system", "content": SYSTEM_PASSAGES}, message], on_text,
                       max_tokens=max_tokens, temperature=temperature)
    text = result.content.strip()
    cited = cited_numbers(text, len(passages))
    return {
        "answer": text,
        "mode": mode,
        "note": note,
        "cited": cited,
        "usage": result.usage,
        "timings": result.timings,
        "seconds": round(time.perf_counter() - started, 3),
        "snapshot_id": context.get("snapshot_id") if mode == "context" else None,
    }


def _delete_session(client, session_id: str | None) -> None:
    if not session_id:
        return
    try:
        client.delete_session(session_id)
    except UserError:
        pass


def _drop_snapshot(client, snapshot_id: str | None) -> None:
    if not snapshot_id:
        return
    try:
        client.delete_snapshot(snapshot_id)
    except UserError:
        pass
