"""``ChatService``: every user action on a loaded model, once, below all front ends.

The HTTP routes call it (on the server's worker thread for whatever touches a cache); the
CLI and the REPL reach it through those routes; tests use it in process. It owns no thread
and no queue: each method runs where it is called and raises ``UserError`` for what a user
can cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from superlinear.engine.types import ChatRequest, Done
from superlinear.errors import Conflict, InvalidRequest, NotFound, TooLarge, Unavailable, UserError

from .events import ChatEvent, Persisted, Started

log = logging.getLogger("spl.service")
SCRATCH_START = 16384  # tokens; grows to the default max_seq_len when a request needs it
MAX_IDLE_SCRATCH = 2  # scratch conversations kept between requests (each holds its last prompt's cache)
MODEL_ALIASES = ("default",)  # accepted as a request's "model" whatever the server serves


@dataclass(frozen=True)
class ChatTurn:
    """One chat request: the engine request with the messages the client sent, and the session
    (if any) they continue by the session rule (``merge_session_messages``)."""

    request: ChatRequest
    session_id: str | None = None
    session_mode: str = "auto"  # auto | append | replace


class ChatService:
    """Chat turns, sessions and snapshots over one model, its ``SessionManager`` and its
    ``SnapshotStore``. ``persist_turns``: journal a session after every turn and change (False:
    only on shutdown and eviction, the manager's business)."""

    def __init__(self, model, manager, store, *, persist_turns: bool = True, chunk_size: int | None = None,
                 aliases: tuple[str, ...] = (), served_name: str | None = None, max_model_len: int | None = None):
        self.model = model
        self.manager = manager
        self.store = store
        self.persist_turns = persist_turns
        self.chunk_size = chunk_size
        # Conversations of requests without a session: kept between requests (a client that
        # resends a growing history reuses its prefix); one per request running at once.
        self._scratch_idle: list = []
        self.restored: list[str] = []  # the sessions a previous run left, listed again at start
        # the names a request's "model" may give: the served name (vLLM's --served-model-name), the
        # model's own, "default", how it was loaded; the first is the one /v1/models reports
        self.model_names = tuple(dict.fromkeys((*filter(None, [served_name]), model.name, *MODEL_ALIASES, *aliases)))
        self.context_limit = max_model_len  # the operator's --max-model-len (None: the trained context)

    # -- the model -----------------------------------------------------------------------------
    def check_model(self, requested: str | None) -> None:
        """``NotFound`` (``model_not_found``, as vLLM answers) unless ``requested`` names the
        model served (its name or an alias) or is left out."""
        if requested is not None and requested not in self.model_names:
            raise NotFound(f"The model {requested!r} does not exist; this server serves "
                           f"{self.model_names[0]!r} (also called {', '.join(map(repr, self.model_names[1:]))})",
                           param="model", code="model_not_found")

    @property
    def model_name(self) -> str:
        """The name the server reports for its model."""
        return self.model_names[0]

    def max_model_len(self) -> int | None:
        """The context length the operator set (``max_seq_len``, vLLM's ``--max-model-len``), else
        the one the model was trained for (its ``max_position_embeddings``); None when neither
        says. The memory limit is ``manager.max_seq_len_limit()``."""
        return self.context_limit or self.model.info().get("max_position_embeddings") or None

    # -- chat --------------------------------------------------------------------------------
    def chat(self, turn: ChatTurn, *, cancel: threading.Event | None = None) -> Iterator[ChatEvent]:
        """Run one turn; yields its events (``events.py``), ``Started`` first, the moment the
        prompt passed every check and its prefill begins (a server sends its response headers
        then: what fails before has its own status). A session's journal is written before
        ``Done``, so an answer that says ``persisted`` survives any crash; a failed or cancelled
        turn leaves the session as before and its journal gets what changed. Run it to the end
        (or close it): a session turn holds the session's lock while it runs."""
        session = None
        if turn.session_id:  # first use of a session id creates it
            session = self.manager.sessions.find(turn.session_id) or self.manager.create(turn.session_id)
        persisted = False
        try:
            lock = session.lock if session is not None else contextlib.nullcontext()
            with lock:
                done = yield from self._turn(turn, session, cancel)
                if session is not None:
                    session.touch()
                    result = self._persist(session)
                    persisted = True
                    yield result
                yield done
        finally:
            if session is not None and not persisted:
                self._persist(session)

    def _turn(self, turn: ChatTurn, session, cancel):
        if session is not None:  # on disk (evicted, restored after a restart): loaded back first
            conv = session.conversation or self.manager.conversation_of(session)
            return (yield from self._turn_on(conv, turn, session, cancel))
        with self.scratch_conversation() as conv:
            return (yield from self._turn_on(conv, turn, None, cancel))

    def _turn_on(self, conv, turn: ChatTurn, session, cancel):
        from superlinear.engine.turn import run_turn

        if session is not None:
            messages, how, _kept = merge_session_messages(list(conv.transcript), turn.request.messages,
                                                          turn.session_mode)
        else:
            messages, how = turn.request.messages, None
        request = dataclasses.replace(turn.request, messages=messages, close_turn=session is not None)
        started = False

        def events() -> Iterator[ChatEvent]:
            # The engine's first event comes once the prompt passed every check and its cache
            # is allocated: the turn has started then.
            nonlocal started
            for event in run_turn(conv, request, cancel=cancel):
                if not started:
                    started = True
                    yield Started(how)
                yield event

        try:
            return (yield from _until_done(events()))
        except TooLarge:
            if session is not None or started or not self._grow_scratch(conv):
                raise
            return (yield from _until_done(events()))

    # -- plain text and tokens ------------------------------------------------------------------
    def complete(self, prompt: str | list[int], sampling, *, repetition=None, echo: bool = False,
                 cancel: threading.Event | None = None) -> Iterator[ChatEvent]:
        """A plain text completion of ``prompt`` (a string or token ids; no chat template) on the
        scratch conversation: ``TextDelta`` events (and ``Logprobs``, when asked: the prompt's
        too with ``echo``), then ``Done``."""
        from superlinear.engine.completion import DEFAULT_MAX_TOKENS, prompt_ids, run_completion

        ids = prompt_ids(self.model.tokenizer, prompt)
        with self.scratch_conversation() as conv:
            if len(ids) + (sampling.max_tokens or DEFAULT_MAX_TOKENS) > conv.max_seq_len:
                self._grow_scratch(conv)
            yield from run_completion(conv, ids, sampling, repetition=repetition, echo=echo, cancel=cancel)

    def tokenize(self, source: str | list[dict], *, add_special: bool = True, add_generation_prompt: bool = True,
                 with_pieces: bool = False) -> dict:
        """``{"tokens", "count", "max_model_len", "max_seq_len_limit"}`` (+ ``pieces``) of a text or
        of chat messages rendered with the template (as a turn prefills them)."""
        from superlinear.engine import tokens

        tok = self.model.tokenizer
        if isinstance(source, str):
            ids = tokens.tokenize_text(tok, source, add_special)
        else:
            ids = tokens.tokenize_messages(tok, source, add_generation_prompt)
        out = {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len(),
               "max_seq_len_limit": self.manager.max_seq_len_limit()}
        if with_pieces:
            out["pieces"] = tokens.pieces(tok, ids)
        return out

    def detokenize(self, ids: list) -> str:
        from superlinear.engine import tokens

        tok = self.model.tokenizer
        return tokens.detokenize(tok, tokens.check_ids(tok, ids))

    @contextlib.contextmanager
    def scratch_conversation(self):
        """A conversation for a request without a session, for the request's duration: the one
        used last when it is free (its cache keeps the previous prompt: a client that resends a
        growing history reuses its prefix), a new one when requests run at once."""
        if self._scratch_idle:
            conv = self._scratch_idle.pop()
        else:
            from superlinear.engine.conversation import Conversation

            conv = Conversation(self.model, min(self.manager.default_max_seq_len, SCRATCH_START),
                                chunk_size=self.chunk_size)
        try:
            yield conv
        finally:
            # the most recent first; past MAX_IDLE_SCRATCH the others' caches are freed
            self._scratch_idle = [*self._scratch_idle, conv][-MAX_IDLE_SCRATCH:]

    def _grow_scratch(self, conv) -> bool:
        """Give a scratch conversation the full default max_seq_len; False if it has it."""
        limit = self.manager.default_max_seq_len
        if conv.max_seq_len >= limit:
            return False
        conv.resize(limit)
        return True

    # -- sessions ------------------------------------------------------------------------------
    def persist(self, session_id: str | None) -> Persisted:
        """Make a session durable after a turn or a change, before the answer goes out
        (``Persistence.persist`` writes only what changed). A failure is logged and returned;
        the turn or change itself stands, the journal keeps its last good state and the next
        persist retries. Without ``persist_turns``, ``ok`` is False."""
        if not session_id or not self.persist_turns:
            return Persisted(False)
        try:
            session = self.manager.lookup(session_id)
        except NotFound:  # closed meanwhile
            return Persisted(False)
        return self._persist(session)

    def _persist(self, session) -> Persisted:
        if not self.persist_turns or session.ephemeral:
            return Persisted(False)
        session_id = session.id
        try:
            self.manager.persistence.persist(session)
        except NotFound:  # closed meanwhile
            return Persisted(False)
        except UserError as exc:
            log.error("spl: could not persist session %s: %s", session_id, exc.message)
            return Persisted(False, exc)
        except Exception as exc:  # noqa: BLE001 - durability must not fail a finished turn
            log.exception("spl: could not persist session %s", session_id)
            return Persisted(False, Unavailable(f"could not persist session {session_id!r}: "
                                                f"{type(exc).__name__}: {exc}".splitlines()[0],
                                                code="persist_failed"))
        return Persisted(True)

    def _persisted(self, session) -> dict:
        self._persist(session)
        return session.info()

    def create_session(self, session_id: str | None = None, max_seq_len: int | None = None, *,
                       ephemeral: bool = False) -> dict:
        """``ephemeral``: nothing of the session is ever written to disk (a throwaway turn)."""
        return self._persisted(self.manager.create(session_id, max_seq_len, ephemeral=ephemeral))

    def list_sessions(self) -> dict:
        """``{"sessions": [info...], "count", "bytes", "resident", "memory_budget", "evict_to_disk"}``."""
        return self.manager.list().as_dict()

    def session_info(self, session_id: str) -> dict:
        return self.manager.info(session_id)

    def history(self, session_id: str) -> list[dict]:
        """The transcript; a session on disk (evicted, or restored after a restart) is read from
        its state snapshot without loading it or waiting for a turn it runs."""
        session = self.manager.lookup(session_id)
        conv = session.conversation
        if conv is not None:
            return list(conv.transcript)
        if not session.state_snapshot:
            return []
        try:
            data = self.store.read_transcript(session.state_snapshot)  # hash-checked
        except (OSError, ValueError, UserError):
            return []
        messages = data.get("transcript", data.get("messages")) if isinstance(data, dict) else data
        return messages if isinstance(messages, list) else []

    def close_session(self, session_id: str) -> dict:
        return self.manager.close(session_id)

    def fork_session(self, session_id: str, new_id: str | None = None) -> dict:
        return self._persisted(self.manager.fork(session_id, new_id))

    def rollback(self, session_id: str, n_messages: int) -> dict:
        """Keep the first ``n_messages`` messages; a negative number drops the last ``-n``."""
        if n_messages < 0:
            n_messages = max(0, self.manager.info(session_id)["message_count"] + n_messages)
        info = self.manager.rollback(session_id, n_messages)
        self.persist(session_id)
        return info

    def resize(self, session_id: str, max_seq_len: int) -> dict:
        info = self.manager.resize(session_id, max_seq_len)
        self.persist(session_id)
        return info

    def save(self, session_id: str, *, title: str | None = None, description: str | None = None,
             tags: list[str] | None = None) -> dict:
        """Snapshot a session; returns the snapshot's view."""
        snapshot_id = self.manager.save(session_id, title=title, description=description, tags=tags)
        return snapshot_view(self.store.get(snapshot_id))

    def load(self, snapshot_id: str, *, session_id: str | None = None, force: bool = False,
             max_seq_len: int | None = None, ephemeral: bool = False) -> dict:
        """Load a snapshot into a new session (or ``session_id``; an existing one needs ``force``).
        ``ephemeral``: the session is never written to disk."""
        return self._persisted(self.manager.load(snapshot_id, session_id=session_id, force=force,
                                                 max_seq_len=max_seq_len, ephemeral=ephemeral))

    # -- snapshots -----------------------------------------------------------------------------
    def list_snapshots(self, tag: str | None = None, include_session_state: bool = False) -> list[dict]:
        from superlinear.sessions import SESSION_STATE_TAG

        items = self.store.list(tag=tag)
        if not include_session_state:
            items = [m for m in items if SESSION_STATE_TAG not in (m.get("tags") or [])]
        return [snapshot_view(m) for m in items]

    def get_snapshot(self, snapshot_id: str) -> dict:
        return snapshot_view(self.store.get(snapshot_id))

    def update_snapshot(self, snapshot_id: str, **fields: Any) -> dict:
        """Change title, description or tags (``SnapshotStore.patch``'s fields)."""
        self._refuse_session_state(snapshot_id, "changed")
        return snapshot_view(self.store.patch(snapshot_id, **fields))

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._refuse_session_state(snapshot_id, "deleted")
        self.store.delete(snapshot_id)

    def export_snapshot(self, snapshot_id: str, dest: str | Path) -> Path:
        self._refuse_session_state(snapshot_id, "exported")
        self.store.get(snapshot_id)
        return self.store.export(snapshot_id, dest)

    def import_snapshot(self, file: str | Path, *, snapshot_id: str | None = None, replace: bool = False,
                        name: str | None = None) -> dict:
        return snapshot_view(self.store.import_(file, snapshot_id=snapshot_id, replace=replace, name=name))

    def _refuse_session_state(self, snapshot_id: str, what: str) -> None:
        """A live session's own journal is written after every turn: changing, deleting or
        exporting it from outside would leave that session naming files it lost."""
        owner = self.manager.state_owner(snapshot_id)
        if owner is not None:
            raise Conflict(f"snapshot {snapshot_id!r} is the live state of session {owner!r} and cannot be "
                           f"{what}; save the session for a snapshot of its own, or close the session",
                           param="snapshot_id")


def _until_done(events: Iterator[ChatEvent]):
    """Yield every event but the last (``Done``), which is returned: it goes out once the
    session is persisted."""
    done = None
    for event in events:
        if isinstance(event, Done):
            done = event
        else:
            yield event
    if done is None:
        raise RuntimeError("the turn ended without a Done event")
    return done


def snapshot_view(manifest: dict) -> dict:
    """A snapshot as the API shows it: the manifest without its file list, plus its size."""
    view = {k: v for k, v in manifest.items() if k != "files"}
    view["object"] = "snapshot"
    files = manifest.get("files") or {}
    view["bytes"] = sum(int(f.get("bytes", 0)) for f in files.values() if isinstance(f, dict))
    return view


# -- the session rule ------------------------------------------------------------------------------
# Which conversation a chat request with a ``session_id`` continues. The request's messages are
# matched against the session's transcript T (docs/server.md):
# - they start with all of T (the client resent the history): only the new tail is prefilled;
# - they share no leading message with T (the client sent only the new messages): appended to T;
# - they share a prefix with T and then differ (an edit, a regenerate): the session rolls back to
#   the common prefix and continues from the request's messages.
# ``session_mode: "append"`` always appends, ``"replace"`` always takes the messages as the whole
# conversation (rolling back as far as needed).

def _norm(message: dict) -> tuple:
    calls = tuple(
        (c.get("function", {}).get("name"), _norm_args(c.get("function", {}).get("arguments")))
        for c in message.get("tool_calls") or []
    )
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    role = "system" if message.get("role") == "developer" else message.get("role")
    return (role, (content or "").strip(), calls, message.get("tool_call_id") or None)


def _norm_args(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.dumps(json.loads(args), sort_keys=True)
        except ValueError:
            return args.strip()
    return json.dumps(args, sort_keys=True)


def common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if _norm(x) != _norm(y):
            break
        n += 1
    return n


def merge_session_messages(transcript: list[dict], messages: list[dict], mode: str = "auto"
                           ) -> tuple[list[dict], str, int]:
    """The whole conversation the session should hold for this turn.

    Returns ``(messages, how, kept)``: ``how`` is ``new`` / ``extend`` / ``append`` / ``rollback``,
    ``kept`` the number of transcript messages kept as they are.
    """
    if not transcript:
        return list(messages), "new", 0
    if mode == "append":
        return [*transcript, *messages], "append", len(transcript)
    p = common_prefix(transcript, messages)
    if p == len(transcript):
        if p == len(messages) and transcript[-1].get("role") == "assistant":
            raise InvalidRequest("the messages add nothing to the session's transcript (they equal it); "
                                 "send the next user message", param="messages")
        return [*transcript, *messages[p:]], "extend", p
    if mode == "replace" or p > 0:
        return [*transcript[:p], *messages[p:]], "rollback", p
    return [*transcript, *messages], "append", len(transcript)
