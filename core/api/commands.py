"""The API's operations as bus commands: each runs against the API the dispatch context is
bound to (``Context(api=...)``: in process or over HTTP), so the CLI, the REPL's slash
commands, rag and plugins share one path and the bus's middleware (errors, tracing) wraps
every operation. A command's fields are its API method's arguments (tuples go as lists, None
is left out); results are the API's (``superlinear.api.types``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from superlinear.bus import Command, Context
from superlinear.errors import InvalidRequest

from .types import ChatTurn, Completion

OnBytes = Callable[[int, int | None], None]


@dataclass(frozen=True)
class ApiCommand(Command):
    """A command that is one API operation: ``method`` of the bound API, with the fields."""

    name: ClassVar[str] = "api"
    method: ClassVar[str] = ""

    def run(self, ctx: Context) -> Any:
        if ctx.api is None:
            raise InvalidRequest(f"{self.name}: no API to run it against (dispatch with Context(api=...))")
        return self.call(ctx.api)

    def call(self, api) -> Any:
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items() if v is not None}
        return getattr(api, self.method)(**args)


def _bytes_field():
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Chat(ApiCommand):
    """One turn: its events (an iterator; close it to cancel the turn)."""

    name, method = "chat", "chat"
    turn: ChatTurn


@dataclass(frozen=True)
class Complete(ApiCommand):
    name, method = "complete", "complete"
    completion: Completion


@dataclass(frozen=True)
class Tokenize(ApiCommand):
    name, method = "tokenize", "tokenize"
    source: str | tuple[dict, ...]
    add_special: bool = True
    add_generation_prompt: bool = True
    with_pieces: bool = False


@dataclass(frozen=True)
class Detokenize(ApiCommand):
    name, method = "detokenize", "detokenize"
    ids: tuple[int, ...]


# -- sessions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionCommand(ApiCommand):
    """An operation on one session."""

    session_id: str


@dataclass(frozen=True)
class CreateSession(ApiCommand):
    name, method = "session.create", "create_session"
    session_id: str | None = None
    max_seq_len: int | None = None
    ephemeral: bool = False


@dataclass(frozen=True)
class GetSession(SessionCommand):
    name, method = "session.get", "get_session"


@dataclass(frozen=True)
class ListSessions(ApiCommand):
    name, method = "session.list", "list_sessions"


@dataclass(frozen=True)
class History(SessionCommand):
    name, method = "session.history", "history"


@dataclass(frozen=True)
class Fork(SessionCommand):
    name, method = "session.fork", "fork"
    new_id: str | None = None


@dataclass(frozen=True)
class Rollback(SessionCommand):
    """Keep the first ``n_messages`` messages (negative: drop the last ``-n_messages``)."""

    name, method = "session.rollback", "rollback"
    n_messages: int


@dataclass(frozen=True)
class Resize(SessionCommand):
    name, method = "session.resize", "resize"
    max_seq_len: int


@dataclass(frozen=True)
class Save(SessionCommand):
    """Snapshot a session; the snapshot's info."""

    name, method = "session.save", "save"
    title: str | None = None
    description: str | None = None
    tags: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CloseSession(SessionCommand):
    name, method = "session.close", "close_session"


# -- snapshots --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SnapshotCommand(ApiCommand):
    """An operation on one snapshot."""

    snapshot_id: str


@dataclass(frozen=True)
class ListSnapshots(ApiCommand):
    name, method = "snapshot.list", "list_snapshots"
    tag: str | None = None
    include_session_state: bool = False


@dataclass(frozen=True)
class SkippedSnapshots(ApiCommand):
    """The snapshots the last listing left out as unreadable: ``[{"id", "error"}]``."""

    name, method = "snapshot.skipped", "skipped_snapshots"


@dataclass(frozen=True)
class GetSnapshot(SnapshotCommand):
    name, method = "snapshot.get", "get_snapshot"


@dataclass(frozen=True)
class UpdateSnapshot(SnapshotCommand):
    """Change a snapshot's title, description or tags (None: unchanged)."""

    name, method = "snapshot.update", "update_snapshot"
    title: str | None = None
    description: str | None = None
    tags: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DeleteSnapshot(SnapshotCommand):
    name, method = "snapshot.delete", "delete_snapshot"


@dataclass(frozen=True)
class ExportSnapshot(SnapshotCommand):
    """Write a snapshot to one file; ``on_bytes(done, total)`` follows the transfer."""

    name, method = "snapshot.export", "export_snapshot"
    dest: str
    on_bytes: OnBytes | None = _bytes_field()


@dataclass(frozen=True)
class ImportSnapshot(ApiCommand):
    name, method = "snapshot.import", "import_snapshot"
    file: str
    snapshot_id: str | None = None
    replace: bool = False
    on_bytes: OnBytes | None = _bytes_field()


@dataclass(frozen=True)
class Load(SnapshotCommand):
    """A session holding a snapshot's state (``ephemeral``: never written to disk)."""

    name, method = "snapshot.load", "load"
    session_id: str | None = None
    force: bool = False
    max_seq_len: int | None = None
    ephemeral: bool = False


__all__ = ["ApiCommand", "Chat", "CloseSession", "Complete", "CreateSession", "DeleteSnapshot", "Detokenize",
           "ExportSnapshot", "Fork", "GetSession", "GetSnapshot", "History", "ImportSnapshot", "ListSessions",
           "ListSnapshots", "Load", "Resize", "Rollback", "Save", "SessionCommand", "SnapshotCommand", "Tokenize",
           "UpdateSnapshot"]
