"""The API's operations as bus commands: each runs against the API the dispatch context is
bound to (``Context(api=...)``: in process or over HTTP), so the CLI, the REPL's slash
commands, rag and plugins share one path and the bus's middleware (errors, tracing) wraps
every operation. Results are the API's (``superlinear.api.types``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from superlinear.bus import Command, Context
from superlinear.errors import InvalidRequest

from .types import ChatTurn, Completion


@dataclass(frozen=True)
class ApiCommand(Command):
    """A command that is one API operation: ``run`` calls it on the bound API."""

    name: ClassVar[str] = "api"

    def run(self, ctx: Context) -> Any:
        if ctx.api is None:
            raise InvalidRequest(f"{self.name}: no API to run it against (dispatch with Context(api=...))")
        return self.call(ctx.api)

    def call(self, api) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Chat(ApiCommand):
    """One turn: its events (an iterator; close it to cancel the turn)."""

    name = "chat"
    turn: ChatTurn

    def call(self, api):
        return api.chat(self.turn)


@dataclass(frozen=True)
class Complete(ApiCommand):
    name = "complete"
    completion: Completion

    def call(self, api):
        return api.complete(self.completion)


@dataclass(frozen=True)
class Tokenize(ApiCommand):
    name = "tokenize"
    source: str | tuple[dict, ...] = ""
    add_special: bool = True
    add_generation_prompt: bool = True
    with_pieces: bool = False

    def call(self, api):
        source = self.source if isinstance(self.source, str) else list(self.source)
        return api.tokenize(source, add_special=self.add_special, add_generation_prompt=self.add_generation_prompt,
                            with_pieces=self.with_pieces)


@dataclass(frozen=True)
class Detokenize(ApiCommand):
    name = "detokenize"
    ids: tuple[int, ...] = ()

    def call(self, api):
        return api.detokenize(list(self.ids))


# -- sessions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CreateSession(ApiCommand):
    name = "session.create"
    session_id: str | None = None
    max_seq_len: int | None = None
    ephemeral: bool = False

    def call(self, api):
        return api.create_session(self.session_id, self.max_seq_len, ephemeral=self.ephemeral)


@dataclass(frozen=True)
class GetSession(ApiCommand):
    name = "session.get"
    session_id: str = ""

    def call(self, api):
        return api.get_session(_need(self.session_id, "session id"))


@dataclass(frozen=True)
class ListSessions(ApiCommand):
    name = "session.list"

    def call(self, api):
        return api.list_sessions()


@dataclass(frozen=True)
class History(ApiCommand):
    name = "session.history"
    session_id: str = ""

    def call(self, api):
        return api.history(_need(self.session_id, "session id"))


@dataclass(frozen=True)
class Fork(ApiCommand):
    name = "session.fork"
    session_id: str = ""
    new_id: str | None = None

    def call(self, api):
        return api.fork(_need(self.session_id, "session id"), self.new_id)


@dataclass(frozen=True)
class Rollback(ApiCommand):
    """Keep the first ``n_messages`` messages (negative: drop the last ``-n_messages``)."""

    name = "session.rollback"
    session_id: str = ""
    n_messages: int = 0

    def call(self, api):
        return api.rollback(_need(self.session_id, "session id"), self.n_messages)


@dataclass(frozen=True)
class Resize(ApiCommand):
    name = "session.resize"
    session_id: str = ""
    max_seq_len: int = 0

    def call(self, api):
        return api.resize(_need(self.session_id, "session id"), self.max_seq_len)


@dataclass(frozen=True)
class Save(ApiCommand):
    """Snapshot a session; the snapshot's info."""

    name = "session.save"
    session_id: str = ""
    title: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()

    def call(self, api):
        return api.save(_need(self.session_id, "session id"), title=self.title, description=self.description,
                        tags=list(self.tags) or None)


@dataclass(frozen=True)
class CloseSession(ApiCommand):
    name = "session.close"
    session_id: str = ""

    def call(self, api):
        return api.close_session(_need(self.session_id, "session id"))


# -- snapshots --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ListSnapshots(ApiCommand):
    name = "snapshot.list"
    tag: str | None = None
    include_session_state: bool = False

    def call(self, api):
        return api.list_snapshots(self.tag, self.include_session_state)


@dataclass(frozen=True)
class GetSnapshot(ApiCommand):
    name = "snapshot.get"
    snapshot_id: str = ""

    def call(self, api):
        return api.get_snapshot(_need(self.snapshot_id, "snapshot id"))


@dataclass(frozen=True)
class UpdateSnapshot(ApiCommand):
    """Change a snapshot's title, description or tags (None: unchanged)."""

    name = "snapshot.update"
    snapshot_id: str = ""
    title: str | None = None
    description: str | None = None
    tags: tuple[str, ...] | None = None

    def call(self, api):
        fields = {"title": self.title, "description": self.description,
                  "tags": list(self.tags) if self.tags is not None else None}
        return api.update_snapshot(_need(self.snapshot_id, "snapshot id"),
                                   **{k: v for k, v in fields.items() if v is not None})


@dataclass(frozen=True)
class DeleteSnapshot(ApiCommand):
    name = "snapshot.delete"
    snapshot_id: str = ""

    def call(self, api):
        return api.delete_snapshot(_need(self.snapshot_id, "snapshot id"))


@dataclass(frozen=True)
class ExportSnapshot(ApiCommand):
    """Write a snapshot to one file; ``on_bytes(done, total)`` follows the transfer."""

    name = "snapshot.export"
    snapshot_id: str = ""
    dest: str = ""
    on_bytes: Callable[[int, int | None], None] | None = field(default=None, compare=False, repr=False)

    def call(self, api) -> Path:
        return api.export_snapshot(_need(self.snapshot_id, "snapshot id"), _need(self.dest, "file"),
                                   on_bytes=self.on_bytes)


@dataclass(frozen=True)
class ImportSnapshot(ApiCommand):
    name = "snapshot.import"
    file: str = ""
    snapshot_id: str | None = None
    replace: bool = False
    on_bytes: Callable[[int, int | None], None] | None = field(default=None, compare=False, repr=False)

    def call(self, api):
        return api.import_snapshot(_need(self.file, "file"), snapshot_id=self.snapshot_id, replace=self.replace,
                                   on_bytes=self.on_bytes)


@dataclass(frozen=True)
class Load(ApiCommand):
    """A session holding a snapshot's state (``ephemeral``: never written to disk)."""

    name = "snapshot.load"
    snapshot_id: str = ""
    session_id: str | None = None
    force: bool = False
    max_seq_len: int | None = None
    ephemeral: bool = False

    def call(self, api):
        return api.load(_need(self.snapshot_id, "snapshot id"), session_id=self.session_id, force=self.force,
                        max_seq_len=self.max_seq_len, ephemeral=self.ephemeral)


def _need(value: str, what: str) -> str:
    if not value:
        raise InvalidRequest(f"give a {what}")
    return value


__all__ = ["ApiCommand", "Chat", "CloseSession", "Complete", "CreateSession", "DeleteSnapshot", "Detokenize",
           "ExportSnapshot", "Fork", "GetSession", "GetSnapshot", "History", "ImportSnapshot", "ListSessions",
           "ListSnapshots", "Load", "Resize", "Rollback", "Save", "Tokenize", "UpdateSnapshot"]
