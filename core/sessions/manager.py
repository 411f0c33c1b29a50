"""SessionManager: live conversations with hot caches, a memory budget, snapshots, durability.

A ``Session`` wraps one ``superlinear.engine.conversation.Conversation`` (cache + token ids +
transcript + message boundaries) with an id, a lock and timestamps. The manager owns every
session: it creates, forks, rolls back, resizes, closes them, saves them as snapshots and loads
snapshots back, and keeps the bytes they hold under ``memory_budget``.

Locking: each session has a re-entrant lock (``session.lock``); the server holds it for a whole
turn, and every manager operation on a session takes it too, so work on one session is
serialised while sessions run in parallel. The manager's own table has a separate lock that is
never held while waiting for a session lock.

Atomicity: every operation prepares its result (reads and verifies a snapshot, allocates a
cache, clones a state) before it changes anything visible, so a failure leaves the sessions as
they were.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from superlinear.errors import Conflict, InvalidRequest, NotFound, OverBudget, TooLarge, UserError
from superlinear.sessions.budget import SESSION_OVERHEAD_BYTES, CacheSizes, SessionMemory, fmt_bytes
from superlinear.sessions.ids import new_id, validate_id
from superlinear.sessions.memory import default_budget
from superlinear.sessions.snapshots import SESSION_STATE_TAG, CorruptSnapshot, SnapshotStore, check_model

from . import journal as _journal
from . import saved_state
from .memory import allocate, free_memory

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 8192


class SessionLock:
    """A re-entrant lock that knows how deeply it is held (so eviction can tell an idle session
    from one the calling thread itself is using)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._depth = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self._depth += 1
        return ok

    def release(self) -> None:
        self._depth -= 1
        self._lock.release()

    def locked(self) -> bool:
        return self._depth > 0

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class Session:
    """One conversation kept alive. ``conversation`` is ``None`` while the state lives on disk
    (evicted, or listed again after a restart); ``SessionManager.get`` loads it back."""

    def __init__(self, session_id: str, conversation, *, max_seq_len: int, created_at: float | None = None,
                 manager: SessionManager | None = None, ephemeral: bool = False):
        self.id = session_id
        self.ephemeral = ephemeral  # never written to disk: not journaled, never evicted
        self._manager = manager
        self.conversation = conversation
        self.lock = SessionLock()
        self.created_at = created_at if created_at is not None else time.time()
        self.last_used = time.time()
        self._max_seq_len = max_seq_len
        self.state_snapshot: str | None = None  # its state on disk (evicted, persisted)
        self._disk_info: dict = {}  # position / message_count of the state on disk
        self._journal: _journal.Tracker | None = None  # what the journal on disk holds (resident)
        self.last_persist_bytes = 0  # bytes the last persist wrote
        self.persist_error: str | None = None  # why the last persist failed (None: it did not)
        self.closed = False

    @property
    def conversation(self):
        return self._conversation

    @conversation.setter
    def conversation(self, conv) -> None:
        """Every conversation a session holds asks the manager's budget before its cache grows."""
        self._conversation = conv
        if conv is not None and self._manager is not None:
            conv.memory = SessionMemory(self._manager, self)

    @property
    def resident(self) -> bool:
        return self.conversation is not None

    @property
    def max_seq_len(self) -> int:
        if self.conversation is not None:
            return self.conversation.max_seq_len
        return self._max_seq_len

    @property
    def position(self) -> int:
        if self.conversation is not None:
            return self.conversation.position
        return int(self._disk_info.get("position", 0))

    @property
    def message_count(self) -> int:
        if self.conversation is not None:
            return len(self.conversation.transcript)
        return int(self._disk_info.get("message_count", 0))

    @property
    def persisted_position(self) -> int | None:
        """Tokens of the state on disk (its journal); None if it was never written."""
        if self._journal is not None:
            return self._journal.position
        if self.state_snapshot:
            return int(self._disk_info.get("position", 0))
        return None

    def nbytes(self) -> int:
        """Bytes of memory (device and host) this session holds now; 0 while on disk."""
        if self.conversation is None:
            return 0
        overhead = self._manager.sizes.overhead if self._manager is not None else SESSION_OVERHEAD_BYTES
        return self.conversation.nbytes + overhead

    def touch(self) -> None:
        self.last_used = time.time()

    def info(self) -> dict:
        return {
            "id": self.id,
            "position": self.position,
            "max_seq_len": self.max_seq_len,
            "message_count": self.message_count,
            "bytes": self.nbytes(),
            "resident": self.resident,
            "busy": self.lock.locked(),
            "ephemeral": self.ephemeral,
            "state_snapshot": self.state_snapshot,
            "persisted_position": self.persisted_position,
            "persist_error": self.persist_error,
            "created_at": self.created_at,
            "last_used": self.last_used,
        }

    def __repr__(self) -> str:
        return f"<Session {self.id} position={self.position}/{self.max_seq_len} resident={self.resident}>"


def state_snapshot_id(session_id: str) -> str:
    """The snapshot id under which a session's own state is kept (eviction, shutdown)."""
    sid = f"session-{session_id}"
    if len(sid) > 128:
        sid = "session-" + hashlib.sha256(session_id.encode()).hexdigest()[:40]
    return sid


class SessionManager:
    """``memory_budget``: bytes all resident sessions may hold together; ``"auto"`` (the
    default) is a fraction of the device's free memory measured now (``memory.default_budget``),
    ``None`` no limit. ``default_max_seq_len`` defaults to 8192, or less when the budget cannot
    hold a full cache of that length."""

    def __init__(self, model, snapshot_store: SnapshotStore | None = None, memory_budget: int | str | None = "auto",
                 evict_to_disk: bool = False, default_max_seq_len: int | None = None,
                 chunk_size: int | None = None):
        self.model = model
        self.chunk_size = chunk_size
        self.store = snapshot_store if snapshot_store is not None else SnapshotStore()
        if memory_budget == "auto":
            memory_budget = default_budget(model.device)
        self.memory_budget = int(memory_budget) if memory_budget else None
        self.evict_to_disk = evict_to_disk
        self.sizes = CacheSizes(model)
        longest = self.max_seq_len_limit()
        if default_max_seq_len is None:
            default_max_seq_len = min(DEFAULT_MAX_SEQ_LEN, longest)
            if default_max_seq_len < 1:
                raise TooLarge(f"the memory budget ({fmt_bytes(self.memory_budget or 0)}) cannot hold a "
                               "session of even one token; raise the memory budget")
        self.sizes.check_len(default_max_seq_len, self.memory_budget)
        self.default_max_seq_len = default_max_seq_len
        self._sessions: dict[str, Session] = {}
        self._lock = threading.RLock()
        # Held from the budget check to the end of the allocation, so two threads cannot both
        # pass the check and together overshoot the budget. Never waits for a session lock.
        self._alloc_lock = threading.RLock()

    # ------------------------------------------------------------------ memory
    def estimate_bytes(self, max_seq_len: int) -> int:
        """Bytes a fresh session of ``max_seq_len`` holds (the cache as allocated when created)."""
        return self.sizes.fresh(max_seq_len)

    def max_seq_len_limit(self) -> int:
        """The longest max_seq_len a session may have (the model's limit, a full cache within the budget)."""
        return self.sizes.max_seq_len_for(self.memory_budget)

    def bytes_in_use(self) -> int:
        with self._lock:
            return sum(s.nbytes() for s in self._sessions.values())

    def free_bytes(self) -> int | None:
        """Budget not held by any session (None: no budget)."""
        if self.memory_budget is None:
            return None
        return self.memory_budget - self.bytes_in_use()

    def reserve(self, need: int, *, exclude: Session | None = None, what: str) -> None:
        """Make room for ``need`` more bytes under the budget: evict idle sessions to disk (if
        allowed) or raise ``OverBudget`` (429); ``TooLarge`` (413) if the budget could never
        hold it. ``exclude`` is never evicted (the session being worked on)."""
        if self.memory_budget is None or need <= 0:
            return
        held = exclude.nbytes() if exclude is not None else 0
        if need + held > self.memory_budget:
            raise TooLarge(
                f"{what} needs {fmt_bytes(need)}, more than the whole session memory budget "
                f"({fmt_bytes(self.memory_budget)}) allows{' next to what it holds' if held else ''}; "
                "ask for a smaller max_seq_len or raise the memory budget",
                param="max_seq_len")
        failed: set[str] = set()
        while True:
            with self._lock:
                used = sum(s.nbytes() for s in self._sessions.values())
                if used + need <= self.memory_budget:
                    return
                victims = sorted((s for s in self._sessions.values()
                                  if s.resident and not s.ephemeral and s is not exclude and not s.lock.locked()
                                  and s.id not in failed), key=lambda s: s.last_used)
            hint = ("every other session is busy; try again shortly" if self.evict_to_disk else
                    "close or save idle sessions, or ask for a smaller max_seq_len")
            if not self.evict_to_disk or not victims:
                raise OverBudget(
                    f"{what} needs {fmt_bytes(need)} but sessions already hold {fmt_bytes(used)} of the "
                    f"{fmt_bytes(self.memory_budget)} session memory budget; {hint}", param="max_seq_len")
            victim = victims[0]
            try:
                if not self._evict(victim):
                    failed.add(victim.id)
            except (UserError, OSError) as exc:  # cannot write it out (disk full): keep it, try another
                log.warning("could not evict session %s: %s", victim.id, exc)
                failed.add(victim.id)

    def _evict(self, session: Session) -> bool:
        """Snapshot an idle session to disk and free its memory. False if it became busy."""
        if not session.lock.acquire(blocking=False):
            return False
        try:
            if session.lock._depth > 1 or not session.resident or session.closed:
                return False
            self._persist_locked(session)
            session.conversation = None
            log.info("session %s evicted to snapshot %s", session.id, session.state_snapshot)
            free_memory()
            return True
        finally:
            session.lock.release()

    def _state_id(self, session: Session) -> str:
        """The state snapshot id of a session; never one that holds something else (a user's
        snapshot that happens to be called ``session-<id>``)."""
        if session.state_snapshot:
            return session.state_snapshot
        sid = state_snapshot_id(session.id)
        try:
            manifest = self.store.get(sid)
        except NotFound:
            return sid
        except Exception:  # noqa: BLE001 - damaged: do not overwrite it, use another id
            manifest = {}
        if SESSION_STATE_TAG in manifest.get("tags", ()) and manifest.get("session", {}).get("id") == session.id:
            return sid
        return f"{sid[:110]}-{secrets.token_hex(4)}"

    def _write_state(self, session: Session) -> str:
        """Bring a resident session's journal (its state snapshot) up to date, writing only what
        changed since the last write (``journal.persist``)."""
        sid = self._state_id(session)
        conv = session.conversation
        meta, tensors = saved_state.export(conv)
        tracker, written = _journal.persist(
            self.store, snapshot_id=sid, model=self.model, session=self._session_meta(session),
            created_at=None, conv=conv, meta=meta, tensors=tensors, tracker=session._journal,
            tags=[SESSION_STATE_TAG], title=f"state of session {session.id}")
        session._journal = tracker
        session.state_snapshot = sid
        session._max_seq_len = session.max_seq_len
        session._disk_info = {k: tracker.manifest["session"][k] for k in ("position", "message_count")}
        session.last_persist_bytes = written
        if written:
            log.debug("session %s persisted: %d bytes written, position %d", session.id, written,
                      tracker.position)
        return sid

    def _session_meta(self, session: Session) -> dict:
        # last_used travels with the state: a restart lists every session as last used when it was
        return {"id": session.id, "position": session.position, "max_seq_len": session.max_seq_len,
                "message_count": session.message_count, "created_at": session.created_at,
                "last_used": session.last_used}

    # ------------------------------------------------------------------ building conversations
    def _new_conversation(self, max_seq_len: int, *, exclude: Session | None = None, what: str):
        self._check_len(max_seq_len)
        with self._alloc_lock:
            self.reserve(self.estimate_bytes(max_seq_len), exclude=exclude, what=what)
            return allocate(
                lambda: saved_state.new_conversation(self.model, max_seq_len, self.chunk_size), max_seq_len)

    def _check_len(self, max_seq_len) -> None:
        """A max_seq_len the model supports and the budget can hold once full (else 400 / 413)."""
        self.sizes.check_len(max_seq_len, self.memory_budget)

    def _conversation_from_snapshot(self, snapshot_id: str, max_seq_len: int | None, *,
                                    exclude: Session | None, what: str):
        manifest = self.store.get(snapshot_id)
        check_model(manifest, self.model)
        position = int(manifest["session"]["position"])
        if max_seq_len is None:  # as saved, or as long as this server allows (if it still holds the tokens)
            max_seq_len = max(position, min(int(manifest["session"]["max_seq_len"]), self.max_seq_len_limit()))
        self._check_len(max_seq_len)
        if max_seq_len < position:
            raise InvalidRequest(
                f"max_seq_len {max_seq_len} is smaller than snapshot {snapshot_id!r}'s position "
                f"({position} tokens); use at least {position}", param="max_seq_len")
        need = self.sizes.holding(max_seq_len, position)
        self.reserve(need, exclude=exclude, what=what)  # before reading: refuse early what cannot fit
        manifest, transcript, tensors = self.store.read(snapshot_id, model=self.model)  # hashes checked
        with self._alloc_lock:
            self.reserve(need, exclude=exclude, what=what)
            conv = allocate(lambda: self._restore(snapshot_id, transcript, tensors, position, max_seq_len),
                            max_seq_len)
        return manifest, conv

    def _restore(self, snapshot_id: str, transcript, tensors: dict, position: int, max_seq_len: int):
        """A conversation from a snapshot's files. Their hashes matched, but an imported snapshot's
        files are whatever its maker hashed: what does not fit this model is a damaged snapshot."""
        try:
            return saved_state.restore(self.model, transcript, tensors, position=position, max_seq_len=max_seq_len,
                                       chunk_size=self.chunk_size)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise CorruptSnapshot(f"snapshot {snapshot_id!r} does not fit this model ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); it cannot be loaded", param="snapshot_id") from None

    # ------------------------------------------------------------------ table
    def _register(self, session: Session) -> Session:
        with self._lock:
            if session.id in self._sessions:
                raise Conflict(f"session {session.id!r} already exists", param="session_id")
            self._sessions[session.id] = session
        return session

    def lookup(self, session_id: str) -> Session:
        """The session (on disk or in memory; nothing is loaded), or `NotFound`."""
        validate_id(session_id, "session id", param="session_id")
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}", param="session_id")
        return session

    def _new_session_id(self, session_id: str | None) -> str:
        if session_id is None:
            return new_id("sess")
        validate_id(session_id, "session id", param="session_id")
        with self._lock:
            if session_id in self._sessions:
                raise Conflict(f"session {session_id!r} already exists; pick another id or close it",
                               param="session_id")
        return session_id

    # ------------------------------------------------------------------ public API
    def create(self, session_id: str | None = None, max_seq_len: int | None = None, *,
               ephemeral: bool = False) -> Session:
        """A new session; ``ephemeral``: nothing of it is ever written to disk (a throwaway turn)."""
        sid = self._new_session_id(session_id)
        max_seq_len = self.default_max_seq_len if max_seq_len is None else max_seq_len
        conv = self._new_conversation(max_seq_len, what=f"session {sid!r} (max_seq_len {max_seq_len})")
        return self._register(Session(sid, conv, max_seq_len=max_seq_len, manager=self, ephemeral=ephemeral))

    def get(self, session_id: str) -> Session:
        """The session, with its state in memory (loaded back from disk if it was evicted or
        listed after a restart)."""
        session = self.lookup(session_id)
        if not session.resident:
            with session.lock:
                self._make_resident(session)
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
            self._make_resident(session)
            session.touch()
            yield session
            session.touch()

    def _make_resident(self, session: Session) -> None:
        """Load the session's state back if it is on disk (the caller holds its lock)."""
        if session.closed:
            raise NotFound(f"session {session.id!r} was closed", param="session_id")
        if not session.resident:
            self._reload(session)

    def _reload(self, session: Session) -> None:
        sid = session.state_snapshot
        try:
            manifest, conv = self._conversation_from_snapshot(
                sid, session._max_seq_len, exclude=session, what=f"reloading session {session.id!r}")
        except (NotFound, CorruptSnapshot) as exc:
            raise type(exc)(f"session {session.id!r} is on disk as snapshot {sid!r}, which cannot be "
                            f"loaded ({exc.message}); close the session", param="session_id") from exc
        session.conversation = conv
        session._journal = None
        if _journal.is_journal(manifest):  # the next persist appends to it
            tracker = _journal.Tracker(conv, sid, manifest)
            tracker.meta_bytes = _journal.meta_bytes(saved_state.export(conv)[0])
            session._journal = tracker
        # The state snapshot stays: it is the session's durable copy (what a restart after a
        # crash finds), rewritten by the next eviction / persist, deleted by close.
        log.info("session %s reloaded from snapshot %s", session.id, sid)

    def state_owner(self, snapshot_id: str) -> str | None:
        """The id of the open session whose own state (journal) ``snapshot_id`` is, if any."""
        with self._lock:
            for session in self._sessions.values():
                if session.state_snapshot == snapshot_id:
                    return session.id
        return None

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def list(self) -> SessionInfos:
        """Info dicts of every session (oldest first); the list also carries the totals
        (``.count``, ``.bytes``, ``.resident``, ``.memory_budget``; ``.as_dict()``)."""
        with self._lock:
            sessions = sorted(self._sessions.values(), key=lambda s: s.created_at)
        return SessionInfos([s.info() for s in sessions], memory_budget=self.memory_budget)

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
            with self._lock:
                if self._sessions.get(session_id) is session:
                    del self._sessions[session_id]
            session.closed = True
            session.conversation = None
        free_memory()
        return info

    def fork(self, session_id: str, new_id: str | None = None, max_seq_len: int | None = None) -> Session:
        """A new session starting from ``session_id``'s state (cache cloned, no re-prefill)."""
        source = self.get(session_id)
        nid = self._new_session_id(new_id)
        with source.lock:
            if source.conversation is None:
                source = self.get(session_id)
            need = max_seq_len or source.max_seq_len
            if need < source.position:
                raise InvalidRequest(f"max_seq_len {need} is smaller than the session's position "
                                     f"({source.position})", param="max_seq_len")
            self._check_len(need)
            with self._alloc_lock:
                self.reserve(self.sizes.holding(need, source.position), exclude=source,
                             what=f"forking {session_id!r}")
                conv = allocate(lambda: saved_state.fork(source.conversation, max_seq_len), need)
            source.touch()
        return self._register(Session(nid, conv, max_seq_len=need, manager=self))

    def rollback(self, session_id: str, n_messages: int) -> dict:
        """Keep the first ``n_messages`` messages (cache truncated / recurrent state restored
        from the checkpoint at that boundary). Returns the session info."""
        session = self.get(session_id)
        if not isinstance(n_messages, int) or isinstance(n_messages, bool) or n_messages < 0:
            raise InvalidRequest(f"n_messages must be an integer >= 0, got {n_messages!r}",
                                 param="n_messages")
        with session.lock:
            conv = self._resident(session)
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
        self._check_len(max_seq_len)
        with session.lock:
            conv = self._resident(session)
            position = conv.position
            if max_seq_len < position:
                raise InvalidRequest(
                    f"cannot resize session {session_id!r} to {max_seq_len} tokens: it already holds "
                    f"{position}; roll back first or pick at least {position}", param="max_seq_len")
            old = conv.max_seq_len
            if max_seq_len != old:
                grow = self.sizes.holding(max_seq_len, position) - self.sizes.holding(old, position)
                with self._alloc_lock:
                    self.reserve(grow, exclude=session, what=f"resizing {session_id!r} to {max_seq_len}")
                    allocate(lambda: conv.resize(max_seq_len), max_seq_len)
                session._max_seq_len = max_seq_len
                free_memory()
            session.touch()
        return session.info()

    def _resident(self, session: Session):
        if session.conversation is None:  # evicted between get() and taking the lock
            self._reload(session)
        return session.conversation

    def save(self, session_id: str, title: str | None = None, description: str | None = None,
             tags=None, snapshot_id: str | None = None) -> str:
        """Freeze a session into a new snapshot; returns its id. The session goes on."""
        session = self.get(session_id)
        with session.lock:
            conv = self._resident(session)
            meta, tensors = saved_state.export(conv)
            manifest = self.store.save(model=self.model, session=self._session_meta(session),
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
            with self._lock:
                existing = self._sessions.get(session_id)
            if existing is not None and not force:
                raise Conflict(f"session {session_id!r} already exists; load with force to replace its "
                               "state, or pick another session id", param="session_id")
        if existing is None:
            sid = self._new_session_id(session_id)
            _, conv = self._conversation_from_snapshot(snapshot_id, max_seq_len, exclude=None,
                                                       what=f"loading snapshot {snapshot_id!r}")
            return self._register(Session(sid, conv, max_seq_len=conv.max_seq_len, manager=self,
                                          ephemeral=ephemeral))
        with existing.lock:
            if existing.closed:
                raise NotFound(f"session {session_id!r} was closed", param="session_id")
            _, conv = self._conversation_from_snapshot(
                snapshot_id, max_seq_len, exclude=existing, what=f"loading snapshot {snapshot_id!r}")
            existing.conversation = conv
            existing._max_seq_len = conv.max_seq_len
            # The old journal stays until the next persist replaces it atomically with a whole
            # new one (no tracker): a crash in between finds the session as it was, not gone.
            existing._journal = None
            existing.touch()
        free_memory()
        return existing

    # ------------------------------------------------------------------ durability
    def persist(self, session_id: str) -> str | None:
        """Make one session durable now (the server calls it after every turn and every change):
        its journal gets only what changed since the last persist — the KV rows appended since
        (``new tokens x kv_bytes_per_token``), a small state file (logits, recurrent state) and
        the transcript — then an atomically replaced manifest. Returns the state snapshot id."""
        session = self.lookup(session_id)
        with session.lock:
            if not session.resident or session.ephemeral:
                return session.state_snapshot
            return self._persist_locked(session)

    def _persist_locked(self, session: Session) -> str:
        """``_write_state`` that remembers its failure in ``session.persist_error`` (shown by
        ``info``) until a persist succeeds; the journal on disk keeps its last good state."""
        try:
            sid = self._write_state(session)
        except Exception as exc:
            session.persist_error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            raise
        session.persist_error = None
        return sid

    def persist_errors(self) -> dict[str, str]:
        """Sessions whose last persist failed: ``{session id: why}``."""
        with self._lock:
            return {s.id: s.persist_error for s in self._sessions.values() if s.persist_error}

    def persist_all(self, timeout: float | None = 30.0) -> list[str]:
        """On a clean shutdown: bring every open session's journal up to date (tagged ``spl:session-state``), so
        ``restore_index`` lists them again on the next start. Returns the session ids written.
        A session whose lock cannot be taken within ``timeout`` is skipped (and logged)."""
        written = []
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            if not session.lock.acquire(timeout=-1 if timeout is None else timeout):
                log.warning("session %s busy at shutdown; its state was not saved", session.id)
                continue
            try:
                if session.closed or session.ephemeral:
                    continue
                if session.resident:
                    self._persist_locked(session)
                written.append(session.id)
            except Exception:  # keep saving the others
                log.exception("could not save session %s", session.id)
            finally:
                session.lock.release()
        return written

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
                              created_at=info.get("created_at"), manager=self)
            session.state_snapshot = manifest["id"]
            if isinstance(info.get("last_used"), (int, float)):  # journals of older spl lack it
                session.last_used = float(info["last_used"])
            session._disk_info = {"position": info.get("position", 0),
                                  "message_count": info.get("message_count", 0)}
            with self._lock:
                if sid in self._sessions:
                    continue
                self._sessions[sid] = session
            restored.append(sid)
        return restored



class SessionInfos(list):
    """``SessionManager.list()``: a list of session info dicts plus the totals."""

    def __init__(self, infos, memory_budget=None):
        super().__init__(infos)
        self.count = len(infos)
        self.bytes = sum(i["bytes"] for i in infos)
        self.resident = sum(1 for i in infos if i["resident"])
        self.memory_budget = memory_budget

    def as_dict(self) -> dict:
        return {"sessions": list(self), "count": self.count, "bytes": self.bytes,
                "resident": self.resident, "memory_budget": self.memory_budget}
