"""The registry of sessions: every open session by id, each with its lock; and the rule for the
ids users give to sessions and snapshots.

A ``Session`` wraps one ``superlinear.engine.conversation.Conversation`` (cache + token ids +
transcript + message boundaries) with an id, a lock and timestamps; its conversation is ``None``
while its state lives on disk only (evicted, or listed again after a restart).

Locking: each session has a re-entrant lock (``session.lock``); a chat turn holds it for the
whole turn and every operation on a session takes it too, so work on one session is serialised
while sessions run in parallel. The registry's own lock guards only its table and is never held
while waiting for a session lock.

Ids: an id becomes a directory name in the snapshot store (a session's state is the snapshot
``session-<id>``) and a path segment in URLs, so only a small, safe alphabet is accepted:
letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters, and
never '..'. That rules out path traversal ('../x', '/x', 'a/b'), hidden or temporary names
('.tmp-…'), empty ids and anything a shell or URL would need to quote.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

from superlinear.errors import Conflict, InvalidRequest, NotFound
from superlinear.sessions.budget import SESSION_OVERHEAD_BYTES, SessionMemory

MAX_ID_LEN = 128
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_id(value: object, kind: str = "id", param: str | None = None) -> str:
    """Return ``value`` if it is a safe id, else raise ``InvalidRequest`` saying why."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{kind} must be a string, got {type(value).__name__}", param=param)
    if not value:
        raise InvalidRequest(f"{kind} must not be empty", param=param)
    if len(value) > MAX_ID_LEN:
        raise InvalidRequest(f"{kind} is {len(value)} characters long; at most {MAX_ID_LEN} are allowed",
                             param=param)
    if not _ID_RE.fullmatch(value) or ".." in value:
        raise InvalidRequest(
            f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (no '/', no '..')",
            param=param,
        )
    return value


def new_id(prefix: str) -> str:
    """A fresh id like ``snap-20261125-013000-3f9a1c``: sortable by time, unique in practice."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


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

    @property
    def depth(self) -> int:
        """How many times the lock is held now (by the one thread that can hold it)."""
        return self._depth

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class Session:
    """One conversation kept alive. ``conversation`` is ``None`` while the state lives on disk
    (evicted, or listed again after a restart); ``SessionManager.get`` loads it back.

    ``budget`` (a ``MemoryBudget``) is asked before the cache of any conversation the session
    holds grows. The persistence (``journal.Persistence``) keeps ``state_snapshot``, ``journal``,
    ``disk_info``, ``last_persist_bytes`` and ``persist_error`` up to date."""

    def __init__(self, session_id: str, conversation, *, max_seq_len: int, created_at: float | None = None,
                 budget=None, ephemeral: bool = False):
        self.id = session_id
        self.ephemeral = ephemeral  # never written to disk: not journaled, never evicted
        self.budget = budget
        self._max_seq_len = max_seq_len
        self._conversation = None
        self.conversation = conversation
        self.lock = SessionLock()
        self.created_at = created_at if created_at is not None else time.time()
        self.last_used = time.time()
        self.state_snapshot: str | None = None  # its state on disk (evicted, persisted)
        self.disk_info: dict = {}  # position / message_count of the state on disk
        self.journal = None  # journal.Tracker: what the journal on disk holds (resident)
        self.last_persist_bytes = 0  # bytes the last persist wrote
        self.persist_error: str | None = None  # why the last persist failed (None: it did not)
        self.closed = False

    @property
    def conversation(self):
        return self._conversation

    @conversation.setter
    def conversation(self, conv) -> None:
        """Every conversation a session holds asks the budget before its cache grows; one that
        leaves (to disk, or closed) leaves its length behind."""
        if conv is None and self._conversation is not None:
            self._max_seq_len = self._conversation.max_seq_len
        self._conversation = conv
        if conv is not None and self.budget is not None:
            conv.memory = SessionMemory(self.budget, self)

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
        return int(self.disk_info.get("position", 0))

    @property
    def message_count(self) -> int:
        if self.conversation is not None:
            return len(self.conversation.transcript)
        return int(self.disk_info.get("message_count", 0))

    @property
    def persisted_position(self) -> int | None:
        """Tokens of the state on disk (its journal); None if it was never written."""
        if self.journal is not None:
            return self.journal.position
        if self.state_snapshot:
            return int(self.disk_info.get("position", 0))
        return None

    def nbytes(self) -> int:
        """Bytes of memory (device and host) this session holds now; 0 while on disk."""
        if self.conversation is None:
            return 0
        overhead = self.budget.sizes.overhead if self.budget is not None else SESSION_OVERHEAD_BYTES
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


class SessionInfos(list):
    """``SessionManager.list()``: a list of session info dicts plus the totals."""

    def __init__(self, infos, memory_budget=None, evict_to_disk: bool = False):
        super().__init__(infos)
        self.count = len(infos)
        self.bytes = sum(i["bytes"] for i in infos)
        self.resident = sum(1 for i in infos if i["resident"])
        self.memory_budget = memory_budget
        self.evict_to_disk = evict_to_disk  # past the budget, idle sessions go to disk

    def as_dict(self) -> dict:
        return {"sessions": list(self), "count": self.count, "bytes": self.bytes, "resident": self.resident,
                "memory_budget": self.memory_budget, "evict_to_disk": self.evict_to_disk}


class SessionRegistry:
    """The open sessions by id."""

    def __init__(self):
        self._sessions: dict[str, Session] = {}
        self._lock = threading.RLock()

    def find(self, session_id: str) -> Session | None:
        """The session called ``session_id``, or None (a turn's lookup: nothing is checked)."""
        if not isinstance(session_id, str):
            return None
        with self._lock:
            return self._sessions.get(session_id)

    def lookup(self, session_id: str) -> Session:
        """The session (on disk or in memory; nothing is loaded), or ``NotFound``."""
        session = self.find(session_id)
        if session is None:
            validate_id(session_id, "session id", param="session_id")  # a bad id says why
            raise NotFound(f"no session {session_id!r}", param="session_id")
        return session

    def new_id(self, session_id: str | None) -> str:
        """``session_id`` checked to be valid and free, or a fresh id when None."""
        if session_id is None:
            return new_id("sess")
        validate_id(session_id, "session id", param="session_id")
        if session_id in self:
            raise Conflict(f"session {session_id!r} already exists; pick another id or close it",
                           param="session_id")
        return session_id

    def add(self, session: Session) -> Session:
        if not self.add_unless_taken(session):
            raise Conflict(f"session {session.id!r} already exists", param="session_id")
        return session

    def add_unless_taken(self, session: Session) -> bool:
        """Register ``session`` unless its id is taken; whether it was."""
        with self._lock:
            if session.id in self._sessions:
                return False
            self._sessions[session.id] = session
            return True

    def remove(self, session: Session) -> None:
        """Forget ``session`` (if it is still the one under its id)."""
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]

    def all(self) -> list[Session]:
        """Every open session, oldest first."""
        with self._lock:
            return sorted(self._sessions.values(), key=lambda s: s.created_at)

    def bytes_in_use(self) -> int:
        with self._lock:
            return sum(s.nbytes() for s in self._sessions.values())

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
