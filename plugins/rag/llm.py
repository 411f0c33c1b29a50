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

import time
from pathlib import Path

from superlinear.api import Done, PrefillProgress, TextDelta, chat_turn
from superlinear.engine import RepetitionConfig
from superlinear.errors import NotFound, TooLarge, UserError

from .answers import AnswerStream, check_answer
from .files import file_hash, read_lines
from .retrieval import Passage
from .workspace import Workspace, display_path

# Room kept per retrieved passage (they differ per question, so they are not counted ahead):
# conservative for English and code with BPE tokenizers. The documents themselves are counted.
CHARS_PER_TOKEN = 3.2
ANSWER_TOKENS = 256
PASSAGE_CHARS = 900  # each retrieved passage as quoted in the question
# A question's answer that says a 20-token sentence twice is looping (a chat reply may repeat more).
ANSWER_REPETITION = RepetitionConfig(tail_len=40, min_repeats=2, max_period=128)

# A small model follows an example far better than an instruction: show it one cited answer.
_HOW_TO_CITE = (
    "Put the number of the passage you used in square brackets, like [2]. If the passages do not "
    "contain the answer, say so.\n\nExample:\n[1] (sky.txt) The sky is blue.\n[2] (grass.txt) Grass is "
    "green.\nQuestion: What color is grass?\nAnswer: Grass is green [2]."
)
SYSTEM_CONTEXT = (
    "You answer questions about the documents below. Use only what they say. Each question comes "
    "with numbered passages from them; answer in one or two sentences. " + _HOW_TO_CITE + "\n\n"
)
SYSTEM_PASSAGES = "Answer the question from the numbered passages, in one or two sentences. " + _HOW_TO_CITE


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
        lines = read_lines(p, data).lines
        body = "\n".join(text for _, text in lines).strip()
        if body:
            parts.append(f"=== {display_path(path)} ===\n{body}\n")
    return "\n".join(parts), stale


def question_message(question: str, passages: list[Passage]) -> str:
    """The question after its passages, numbered ``[1]…[k]`` as the answer must cite them."""
    if not passages:
        return f"(No passage matched the question.)\nQuestion: {question}\nAnswer:"
    blocks = []
    for i, p in enumerate(passages, start=1):
        text = p.text if len(p.text) <= PASSAGE_CHARS else p.text[:PASSAGE_CHARS] + " …"
        blocks.append(f"[{i}] ({p.citation}) {text}")
    return "\n\n".join(blocks) + f"\n\nQuestion: {question}\nAnswer:"


def cited_numbers(answer: str, n_passages: int) -> list[int]:
    """The passage numbers ``answer`` cites that were given (in order of first use)."""
    return check_answer(answer, n_passages).cited


def needed_seq_len(tokens: int, k: int, max_chars: int) -> int:
    """A session length that holds ``tokens`` of documents plus a question and its answer,
    rounded up to a multiple of 1024 (what to pass to ``--max-seq-len``)."""
    reserve = context_reserve(k, max_chars)
    return -(-(tokens + reserve) // 1024) * 1024


def context_reserve(k: int, max_chars: int) -> int:
    """Tokens kept free for a question with its k passages and the answer."""
    per_passage = min(max_chars, PASSAGE_CHARS) / CHARS_PER_TOKEN + 16
    return int(k * per_passage + ANSWER_TOKENS + 128)


def context_budget(max_seq_len: int, k: int, max_chars: int) -> int:
    """Tokens the documents may take: the session length less room for a question with its k passages
    and the answer."""
    return max(0, max_seq_len - context_reserve(k, max_chars))


def build_context(workspace: Workspace, client, *, max_seq_len: int | None = None, k: int = 5,
                  progress=None, on_prefill=None) -> dict:
    """Prefill the documents into a new session, snapshot it, record it in the manifest.
    ``progress(line)`` gets one-line notes; ``on_prefill(prompt_progress)`` the prefill's progress
    (the request is streamed: keep-alives and progress keep it from timing out however long it is).

    Returns the context record (``mode`` "context") or, when the documents do not fit,
    ``{"mode": "retrieval-only", "reason": ...}`` (and the manifest's context is cleared).
    """
    old = workspace.manifest.get("context") or {}
    text, stale = render_documents(workspace)
    if not text.strip():
        workspace.set_context(None, reason="no documents")
        _drop_snapshot(client, old.get("snapshot_id"))
        return {"mode": "retrieval-only", "reason": "no documents"}
    system = SYSTEM_CONTEXT + "Documents:\n\n" + text
    session = client.create_session(max_seq_len=max_seq_len, ephemeral=True)  # only its snapshot is kept
    session_id = session["id"]
    limit = int(session.get("max_seq_len") or max_seq_len or 0)
    max_chars = workspace.manifest["chunking"]["max_chars"]
    budget = context_budget(limit, k, max_chars) if limit else None
    # The server counts the tokens (its tokenizer and template): whether the documents fit is
    # known before any prefill.
    document_tokens = client.tokenize([{"role": "system", "content": system}])["count"]
    needed = None  # tokens of documents when they do not fit
    try:
        if budget is not None and document_tokens > budget:
            needed = document_tokens
            raise TooLarge("documents too large")
        if progress:
            progress(f"prefilling the documents ({document_tokens:,} tokens) into session {session_id}"
                     f"{_time_estimate(client, document_tokens)}…")
        started = time.perf_counter()
        # (a TooLarge now is the server's memory, not the length: its message says so)
        done = _prefill(client, system, session_id, on_prefill)
        prefill_s = time.perf_counter() - started
        tokens = int(done.usage.get("prompt_tokens") or 0)
        if budget is not None and tokens > budget:
            needed = tokens
            raise TooLarge("documents too large")
        if progress:  # the snapshot is written by the server's worker: say so, and who is ahead
            progress(f"saving the context snapshot on the server{_waiting_note(client)}…")
        # Keep only the documents: drop the one token generated to run the prefill.
        try:
            client.rollback(session_id, 1)
        except UserError:
            pass  # an older server: the context keeps the tiny reply, which does no harm
        info = client.get_session(session_id)
        snap = client.save(session_id, title=f"rag workspace {workspace.name}",
                                   description=f"documents of spl rag workspace {workspace.name!r}",
                                   tags=["rag", f"rag:{workspace.name}"])
    except TooLarge as exc:
        _delete_session(client, session_id)
        if needed is None:  # the server refused something else (memory): say what it said
            reason = f"the context could not be built: {exc.message}"
        else:
            reason = does_not_fit_reason(needed, session_len=limit,
                                         reserve=context_reserve(k, max_chars),
                                         suggest=needed_seq_len(needed, k, max_chars), limits=_length_limits(client))
        workspace.set_context(None, reason=reason)
        _drop_snapshot(client, old.get("snapshot_id"))
        return {"mode": "retrieval-only", "reason": reason, "document_tokens": document_tokens,
                "needed_tokens": needed, "budget_tokens": budget, "max_seq_len": limit or None}
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
        "model": _model_name(client),
        "server": getattr(client, "base_url", None),
        "corpus_hash": workspace.version,
        "stale_files": stale,
    }
    workspace.set_context(context)
    if old.get("snapshot_id") and old.get("snapshot_id") != snapshot_id:
        _drop_snapshot(client, old.get("snapshot_id"))
    return context


def _prefill(client, system: str, session_id: str, on_prefill=None) -> Done:
    """The documents into the session: one streamed turn of one token (its prefill's progress
    goes to ``on_prefill``; the stream's keep-alives keep a long one from timing out)."""
    done = None
    turn = chat_turn([{"role": "system", "content": system}], session_id=session_id, max_tokens=1, temperature=0.0)
    for event in _chat_events(client, turn):
        if isinstance(event, PrefillProgress) and on_prefill is not None:
            on_prefill(event)
        elif isinstance(event, Done):
            done = event
    return done


def _chat_events(client, turn):
    """A turn's events, dispatched on the bus against ``client`` (the API rag runs on)."""
    from superlinear.bus import Context, dispatch
    from superlinear.protocol import Chat

    return dispatch(Chat(turn), Context(api=client))


def _waiting_note(client) -> str:
    """" (it is busy with 2 other requests: waiting for them)" when the server has other work."""
    try:
        queued = int(client.health(timeout=2.0).get("queued") or 0)
    except (UserError, AttributeError, ValueError):
        return ""
    if queued <= 0:
        return ""
    return f" (it is busy with {queued} other request{'s' if queued > 1 else ''}: waiting for them)"


def _time_estimate(client, tokens: int) -> str:
    """", about 2 min 10 s at …" from the server's last measured prefill ("" when unknown)."""
    from superlinear.client.progress import time_estimate

    try:
        estimate = time_estimate(tokens, client.prefill_speed())
    except (UserError, AttributeError):
        return ""
    return f": {estimate}" if estimate else ""


def _model_name(client) -> str | None:
    try:
        return client.health().get("model")
    except UserError:
        return None


def _length_limits(client) -> dict[str, int]:
    """The longest sessions worth advising, from ``/v1/models``: ``trained`` (``max_model_len``, the
    context the model was trained for) and ``memory`` (``max_seq_len_limit``, the longest session
    the server's memory budget holds), each left out when the server does not say."""
    try:
        card = (client.models() or [{}])[0]
    except (UserError, AttributeError, LookupError, TypeError):
        return {}
    limits = {"trained": card.get("max_model_len"), "memory": card.get("max_seq_len_limit")}
    return {name: value for name, value in limits.items() if isinstance(value, int) and value > 0}


def does_not_fit_reason(needed: int, *, session_len: int, reserve: int, suggest: int,
                        limits: dict[str, int] | None = None) -> str:
    """One line: how many tokens the documents need against what the session holds, and what to
    do. A longer session is advised only when the model was trained for it and the memory
    budget allows it (``limits``, ``_length_limits``); otherwise it says which limit is in the way."""
    need = (f"the documents need {needed} tokens (+{reserve} for a question and its answer) but the "
            f"session holds {session_len}")
    passages = "questions are answered from the retrieved passages alone"
    limits = limits or {}
    trained, memory = limits.get("trained"), limits.get("memory")
    if trained is not None and suggest > trained:
        return (f"{need}, and the model was trained on {trained} tokens: {passages} (ingest fewer or "
                "smaller files to keep them in the context)")
    if memory is not None and suggest > memory:
        return (f"{need}, and the server's memory budget allows sessions of {memory} tokens: {passages} "
                "(a larger --memory-budget on the server, or fewer files, keeps them in the context)")
    if not limits:
        return f"{need}: {passages}"
    return f"{need}: ingest again with --max-seq-len {suggest} to keep them in the context; until then {passages}"


def context_is_current(workspace: Workspace) -> bool:
    context = workspace.manifest.get("context") or {}
    return bool(context.get("snapshot_id")) and context.get("corpus_hash") == workspace.version


def _chat(client, messages: list[dict], n_passages: int, on_text=None, **options):
    """One turn, its answer checked against the ``n_passages`` given (``answers``): returns
    ``(text, Done, CheckedAnswer)``. Streamed to ``on_text(delta)`` when given (the CLI prints the
    answer as it comes), and what streams is the checked text."""
    options.setdefault("repetition", ANSWER_REPETITION)  # small models loop: stop them early
    checked = AnswerStream(n_passages)
    text, done = [], None
    for event in _chat_events(client, chat_turn(messages, **options)):
        if isinstance(event, TextDelta):
            text.append(event.text)
            shown = checked.feed(event.text)
            if shown and on_text is not None:
                on_text(shown)
        elif isinstance(event, Done):
            done = event
    rest = checked.finish()
    if rest and on_text is not None:
        on_text(rest)
    return "".join(text), done, checked.result


def answer(workspace: Workspace, client, question: str, passages: list[Passage], *,
           max_tokens: int = ANSWER_TOKENS, temperature: float = 0.0, session_id: str | None = None,
           on_text=None) -> dict:
    """Answer from the workspace context (snapshot) when there is a current one, else from the
    passages alone. With ``session_id`` (the `spl docs` REPL) the question goes to that session."""
    message = {"role": "user", "content": question_message(question, passages)}
    context = workspace.manifest.get("context") or {}
    mode, note, loaded, outcome = "retrieval-only", None, None, None
    options = {"max_tokens": max_tokens, "temperature": temperature}
    started = time.perf_counter()
    if session_id is not None:
        outcome = _chat(client, [message], len(passages), on_text, session_id=session_id, **options)
        mode = "context" if context_is_current(workspace) else "session"
    elif context_is_current(workspace):
        try:
            # ephemeral: the loaded context is never written back to disk (nothing but the answer changes)
            loaded = client.load(context["snapshot_id"], ephemeral=True)["id"]
        except NotFound:
            note = (f"the context snapshot {context['snapshot_id']} is gone: answering from the passages "
                    "(re-run `spl rag ingest` to rebuild it)")
        if loaded:
            try:
                outcome = _chat(client, [message], len(passages), on_text, session_id=loaded, **options)
                mode = "context"
            finally:
                _delete_session(client, loaded)
    elif context.get("snapshot_id"):
        note = "the documents changed since the context was built: answering from the passages"
    else:
        # why there is no context (what the ingest said; `spl rag info` keeps it)
        note = "retrieval-only: " + (workspace.manifest.get("retrieval_only_reason")
                                     or "no context was built; answering from the retrieved passages")
    if outcome is None:
        outcome = _chat(client, [{"role": "system", "content": SYSTEM_PASSAGES}, message], len(passages),
                        on_text, **options)
    content, done, checked = outcome
    out = {
        "answer": checked.text.strip(),
        "mode": mode,
        "note": note,
        "cited": checked.cited,
        "invented_citations": checked.invented,
        "trimmed_repetition": checked.trimmed,
        "answer_notes": checked.notes(len(passages)),
        "finish_reason": done.finish_reason,
        "usage": done.usage,
        "timings": done.timings,
        "seconds": round(time.perf_counter() - started, 3),
        "snapshot_id": context.get("snapshot_id") if mode == "context" else None,
    }
    if checked.text.strip() != content.strip():
        out["raw_answer"] = content  # what the model said, before the checks
    return out


def _delete_session(client, session_id: str | None) -> None:
    _quietly(client.close_session, session_id)


def _drop_snapshot(client, snapshot_id: str | None) -> None:
    _quietly(client.delete_snapshot, snapshot_id)


def _quietly(remove, item_id: str | None) -> None:
    """Remove what a failed or finished step leaves; a server that is gone or an item already
    removed changes nothing."""
    if item_id:
        try:
            remove(item_id)
        except UserError:
            pass
