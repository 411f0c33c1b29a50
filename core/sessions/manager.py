"""SessionManager: the operations on sessions, composed of three parts with a role each:

- ``sessions`` (``registry.SessionRegistry``): which sessions are open, by id, each with its lock;
- ``budget`` (``budget.MemoryBudget``): the bytes they may hold together, eviction when full;
- ``persistence`` (``journal.Persistence``): each session's own state on disk, its journal.

The manager creates, forks, rolls back, resizes, closes sessions, saves them as snapshots and
loads snapshots back. A chat turn needs none of that: it finds its session in the registry and
persists it through the persistence (``ChatService.chat``).

Atomicity: every operation prepares its result (reads and verifies a snapshot, allocates a
cache, clones a state) before it changes anything visible, so a failure leaves the sessions as
they were.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from superlinear.errors import Conflict, InvalidRequest, NotFound, TooLarge
from superlinear.sessions.budget import MemoryBudget, fmt_bytes
from superlinear.sessions.journal import SESSION_STATE_TAG, Persistence, export, restore, session_meta
from superlinear.sessions.memory import free_memory
from superlinear.sessions.registry import Session, SessionInfos, SessionRegistry, validate_id
from superlinear.sessions.snapshots import CorruptSnapshot, SnapshotStore, check_model

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 8192


class SessionManager:
    """``memory_budget``: bytes all resident sessions may hold together; ``"auto"`` (the
    default) is a fraction of the device's free memory measured now (``memory.default_budget``),
    ``None`` no limit. ``evict_to_disk``: past the budget, idle sessions go to disk (else the
    request that needs the memory is refused). ``default_max_seq_len`` defaults to 8192, or less
    when the budget cannot hold a full cache of that length."""

    def __init__(self, model, snapshot_store: SnapshotStore | None = None, memory_budget: int | str | None = "auto",
                 evict_to_disk: bool = False, default_max_seq_len: int | None = None,
                 chunk_size: int | None = None):
        self.model = model
        self.chunk_size = chunk_size
        self.store = snapshot_store if snapshot_store is not None else SnapshotStore()
        self.sessions = SessionRegistry()
        self.persistence = Persistence(self.store, model)
        self.budget = MemoryBudget(model, self.sessions, memory_budget,
                                   evict=self.persistence.evict if evict_to_disk else None)
        # what the parts answer, the manager answers (the same methods, no wrappers)
        self.sizes = self.budget.sizes
        self.lookup = self.sessions.lookup
        self.state_owner = self.sessions.state_owner
        self.bytes_in_use = self.sessions.bytes_in_use
        self.free_bytes = self.budget.free_bytes
        self.max_seq_len_limit = self.budget.max_seq_len_limit
        self.estimate_bytes = self.sizes.fresh  # bytes a fresh session of a max_seq_len holds
        if default_max_seq_len is None:
            default_max_seq_len = min(DEFAULT_MAX_SEQ_LEN, self.max_seq_len_limit())
            if default_max_seq_len < 1:
                raise TooLarge(f"the memory budget ({fmt_bytes(self.memory_budget or 0)}) cannot hold a "
                               "session of even one token; raise the memory budget")
        self.budget.check_len(default_max_seq_len)
        self.default_max_seq_len = default_max_seq_len

    @property
    def memory_budget(self) -> int | None:
        return self.budget.limit

    @property
    def evict_to_disk(self) -> bool:
        return self.budget.evict is not None

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.sessions

    # ------------------------------------------------------------------ building conversations
    def _new_session(self, session_id: str, conv, *, ephemeral: bool = False) -> Session:
        return self.sessions.add(Session(session_id, conv, max_seq_len=conv.max_seq_len, budget=self.budget,
                                         ephemeral=ephemeral))

    def _conversation_from_snapshot(self, snapshot_id: str, max_seq_len: int | None, *,
                                    exclude: Session | None, what: str):
        manifest = self.store.get(snapshot_id)
        check_model(manifest, self.model)
        position = int(manifest["session"]["position"])
        if max_seq_len is None:  # as saved, or as long as this server allows (if it still holds the tokens)
            max_seq_len = max(position, min(int(manifest["session"]["max_seq_len"]), self.max_seq_len_limit()))
        self.budget.check_len(max_seq_len)
        if max_seq_len < position:
            raise InvalidRequest(
                f"max_seq_len {max_seq_len} is smaller than snapshot {snapshot_id!r}'s position "
                f"({position} tokens); use at least {position}", param="max_seq_len")
        need = self.sizes.holding(max_seq_len, position)
        self.budget.reserve(need, exclude=exclude, what=what)  # before reading: refuse early what cannot fit
        manifest, transcript, tensors = self.store.read(snapshot_id, model=self.model)  # hashes checked
        conv = self.budget.allocate(
            need, lambda: self._restore(snapshot_id, transcript, tensors, position, max_seq_len),
            max_seq_len=max_seq_len, exclude=exclude, what=what)
        return manifest, conv

    def _restore(self, snapshot_id: str, transcript, tensors: dict, position: int, max_seq_len: int):
        """A conversation from a snapshot's files. Their hashes matched, but an imported snapshot's
        files are whatever its maker hashed: what does not fit this model is a damaged snapshot."""
        try:
            return restore(self.model, transcript, tensors, position=position, max_seq_len=max_seq_len,
                           chunk_size=self.chunk_size)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise CorruptSnapshot(f"snapshot {snapshot_id!r} does not fit this model ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); it cannot be loaded", param="snapshot_id") from None

    def conversation_of(self, session: Session):
        """The session's conversation, loaded back from its state snapshot if it is on disk
        (evicted, or listed after a restart); the caller holds the session's lock."""
        if session.closed:
            raise NotFound(f"session {session.id!r} was closed", param="session_id")
        if session.resident:
            return session.conversation
        sid = session.state_snapshot
        try:
            manifest, conv = self._conversation_from_snapshot(
                sid, session.max_seq_len, exclude=session, what=f"reloading session {session.id!r}")
        except (NotFound, CorruptSnapshot) as exc:
            raise type(exc)(f"session {session.id!r} is on disk as snapshot {sid!r}, which cannot be "
                            f"loaded ({exc.message}); close the session", param="session_id") from exc
        session.conversation = conv
        # The state snapshot stays: it is the session's durable copy (what a restart after a
        # crash finds), rewritten by the next eviction / persist, deleted by close.
        self.persistence.resume(session, manifest)
        log.info("session %s reloaded from snapshot %s", session.id, sid)
        return conv

    # ------------------------------------------------------------------ operations
    def create(self, session_id: str | None = None, max_seq_len: int | None = None, *,
               ephemeral: bool = False) -> Session:
        """A new session; ``ephemeral``: nothing of it is ever written to disk (a throwaway turn)."""
        from superlinear.engine.conversation import Conversation

        sid = self.sessions.new_id(session_id)
        max_seq_len = self.default_max_seq_len if max_seq_len is None else max_seq_len
        self.budget.check_len(max_seq_len)
        kwargs = {"chunk_size": self.chunk_size} if self.chunk_size else {}
        conv = self.budget.allocate(self.estimate_bytes(max_seq_len),
                                    lambda: Conversation(self.model, max_seq_len, **kwargs), max_seq_len=max_seq_len,
                                    what=f"session {sid!r} (max_seq_len {max_seq_len})")
        return self._new_session(sid, conv, ephemeral=ephemeral)

    def get(self, session_id: str) -> Session:
        """The session, with its state in memory (loaded back from disk if it was evicted or
        listed after a restart)."""
        session = self.lookup(session_id)
        if not session.resident:
            with session.lock:
                self.conversation_of(session)
        session.touch()
        return session

    @contextmanager
    def use(self, session_id: str) -> Iterator[Session]:
        """Hold a session for a piece of work: its lock taken, its state in memory (loaded back
        if it was on disk), so it can be neither evicted nor closed meanwhile::

            with manager.use(sid) as session:
                for event in run_turn(session.conversation, request): ...
        """
        session = self.lookup(session_id)
        with session.lock:
            self.conversation_of(session)
            session.touch()
            yield session
            session.touch()

    def list(self) -> SessionInfos:
        """Info dicts of every session (oldest first); the list also carries the totals
        (``.count``, ``.bytes``, ``.resident``, ``.memory_budget``, ``.evict_to_disk``; ``.as_dict()``)."""
        return SessionInfos([s.info() for s in self.sessions.all()], memory_budget=self.memory_budget,
                            evict_to_disk=self.evict_to_disk)

    def info(self, session_id: str) -> dict:
        return self.lookup(session_id).info()

    def history(self, session_id: str) -> list[dict]:
        """The session's transcript, without loading its state if it is on disk."""
        session = self.lookup(session_id)
        with session.lock:
            if session.resident:
                return [dict(m) for m in session.conversation.transcript]
            meta = self.store.read_transcript(session.state_snapshot)
        return list(meta.get("transcript", [])) if isinstance(meta, dict) else []

    def close(self, session_id: str) -> dict:
        session = self.lookup(session_id)
        with session.lock:
            info = session.info()
            if session.state_snapshot:  # first: a delete the disk refuses leaves the session as it was
                try:
                    self.store.delete(session.state_snapshot)
                except NotFound:
                    pass
            self.sessions.remove(session)
            session.closed = True
            session.conversation = None
        free_memory()
        return info

    def fork(self, session_id: str, new_id: str | None = None, max_seq_len: int | None = None) -> Session:
        """A new session starting from ``session_id``'s state (cache cloned, no re-prefill)."""
        source = self.get(session_id)
        nid = self.sessions.new_id(new_id)
        with source.lock:
            conv = self.conversation_of(source)
            need = max_seq_len or conv.max_seq_len
            if need < conv.position:
                raise InvalidRequest(f"max_seq_len {need} is smaller than the session's position "
                                     f"({conv.position})", param="max_seq_len")
            self.budget.check_len(need)

            def clone():
                other = conv.fork()
                if need != other.max_seq_len:
                    other.resize(need)
                return other

            copy = self.budget.allocate(self.sizes.holding(need, conv.position), clone, max_seq_len=need,
                                        exclude=source, what=f"forking {session_id!r}")
            source.touch()
        return self._new_session(nid, copy)

    def rollback(self, session_id: str, n_messages: int) -> dict:
        """Keep the first ``n_messages`` messages (cache truncated / recurrent state restored
        from the checkpoint at that boundary). Returns the session info."""
        session = self.get(session_id)
        if not isinstance(n_messages, int) or isinstance(n_messages, bool) or n_messages < 0:
            raise InvalidRequest(f"n_messages must be an integer >= 0, got {n_messages!r}",
                                 param="n_messages")
        with session.lock:
            conv = self.conversation_of(session)
            count = len(conv.transcript)
            if n_messages > count:
                raise InvalidRequest(f"session {session_id!r} has {count} messages; cannot roll back to "
                                     f"{n_messages}", param="n_messages")
            if n_messages == 0:  # nothing to render: empty the cache
                conv.sync_tokens([])
                conv.set_transcript([], [], conv.tools, conv.template_kwargs)
            else:
                conv.rollback(count - n_messages)  # the engine's rollback drops the last k messages
            session.touch()
        return session.info()

    def resize(self, session_id: str, max_seq_len: int) -> dict:
        """Change the cache capacity without losing state (up, or down to at least the position)."""
        session = self.get(session_id)
        self.budget.check_len(max_seq_len)
        with session.lock:
            conv = self.conversation_of(session)
            position = conv.position
            if max_seq_len < position:
                raise InvalidRequest(
                    f"cannot resize session {session_id!r} to {max_seq_len} tokens: it already holds "
                    f"{position}; roll back first or pick at least {position}", param="max_seq_len")
            old = conv.max_seq_len
            if max_seq_len != old:
                grow = self.sizes.holding(max_seq_len, position) - self.sizes.holding(old, position)
                self.budget.allocate(grow, lambda: conv.resize(max_seq_len), max_seq_len=max_seq_len,
                                     exclude=session, what=f"resizing {session_id!r} to {max_seq_len}")
                free_memory()
            session.touch()
        return session.info()

    def save(self, session_id: str, title: str | None = None, description: str | None = None,
             tags=None, snapshot_id: str | None = None) -> str:
        """Freeze a session into a new snapshot; returns its id. The session goes on."""
        session = self.get(session_id)
        with session.lock:
            meta, tensors = export(self.conversation_of(session))
            manifest = self.store.save(model=self.model, session=session_meta(session),
                                       transcript=meta, tensors=tensors, title=title,
                                       description=description, tags=tags, snapshot_id=snapshot_id)
            session.touch()
        return manifest["id"]

    def load(self, snapshot_id: str, session_id: str | None = None, force: bool = False,
             max_seq_len: int | None = None, *, ephemeral: bool = False) -> Session:
        """A session holding a snapshot's state: a new one (``session_id`` or a fresh id), or an
        existing one replaced (``force=True``). The snapshot is verified (model, hashes) and
        fully loaded before anything changes, so a failure leaves every session as it was."""
        validate_id(snapshot_id, "snapshot id", param="snapshot_id")
        existing = None
        if session_id is not None:
            validate_id(session_id, "session id", param="session_id")
            existing = self.sessions.find(session_id)
            if existing is not None and not force:
                raise Conflict(f"session {session_id!r} already exists; load with force to replace its "
                               "state, or pick another session id", param="session_id")
        if existing is None:
            sid = self.sessions.new_id(session_id)
            _, conv = self._conversation_from_snapshot(snapshot_id, max_seq_len, exclude=None,
                                                       what=f"loading snapshot {snapshot_id!r}")
            return self._new_session(sid, conv, ephemeral=ephemeral)
        with existing.lock:
            if existing.closed:
                raise NotFound(f"session {session_id!r} was closed", param="session_id")
            _, conv = self._conversation_from_snapshot(
                snapshot_id, max_seq_len, exclude=existing, what=f"loading snapshot {snapshot_id!r}")
            existing.conversation = conv
            self.persistence.restart(existing)
            existing.touch()
        free_memory()
        return existing

    # ------------------------------------------------------------------ durability
    def persist(self, session_id: str) -> str | None:
        """Make one session durable now (``Persistence.persist``); returns its state snapshot id."""
        return self.persistence.persist(self.lookup(session_id))

    def persist_errors(self) -> dict[str, str]:
        """Sessions whose last persist failed: ``{session id: why}``."""
        return {s.id: s.persist_error for s in self.sessions.all() if s.persist_error}

    def persist_all(self, timeout: float | None = 30.0) -> list[str]:
        """On a clean shutdown: bring every open session's journal up to date (tagged
        ``spl:session-state``), so ``restore_index`` lists them again on the next start. Returns
        the session ids written; one busy past ``timeout`` is skipped (and logged)."""
        return self.persistence.persist_all(self.sessions.all(), timeout)

    def restore_index(self) -> list[str]:
        """On start: list the sessions saved by ``persist_all`` (or evicted) again, without
        loading them; each is loaded on its first ``get``. Returns their ids."""
        restored = []
        newest: dict[str, dict] = {}  # a session id listed twice (an older spl's copy): the newest wins
        for manifest in self.store.list(tag=SESSION_STATE_TAG):
            sid = manifest.get("session", {}).get("id")
            if not isinstance(sid, str) or manifest.get("updated_at", "") >= newest.get(sid, {}).get("updated_at", ""):
                newest[sid if isinstance(sid, str) else manifest["id"]] = manifest
        for manifest in newest.values():
            info = manifest.get("session", {})
            sid = info.get("id")
            try:
                validate_id(sid, "session id")
                check_model(manifest, self.model)
            except Exception as exc:
                log.warning("not restoring snapshot %s: %s", manifest.get("id"), exc)
                continue
            session = Session(sid, None, max_seq_len=int(info.get("max_seq_len", self.default_max_seq_len)),
                              created_at=info.get("created_at"), budget=self.budget)
            session.state_snapshot = manifest["id"]
            if isinstance(info.get("last_used"), (int, float)):  # journals of older spl lack it
                session.last_used = float(info["last_used"])
            session.disk_info = {"position": info.get("position", 0),
                                 "message_count": info.get("message_count", 0)}
            if self.sessions.add_unless_taken(session):
                restored.append(sid)
        return restored
