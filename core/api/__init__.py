"""The API: every operation a user or a plugin performs on a model, typed, with two
implementations: ``LocalApi`` (in process: it owns the model's worker thread) and ``RemoteApi``
(HTTP, against ``spl serve``). Both return the same results and yield the same events::

    import superlinear
    api = superlinear.connect("local")            # or connect("http://host:8787")
    info = api.create_session()
    for event in api.chat(chat_turn([{"role": "user", "content": "hi"}], session_id=info["id"])):
        ...                                       # Started, PrefillProgress, TextDelta, ..., Done

The bus (``superlinear.bus``) dispatches these operations as commands to the API it is bound
to (``superlinear.api.commands``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .events import Done, Event, Persisted, PrefillProgress, ReasoningDelta, Started, TextDelta, ToolCallsEvent
from .types import ChatTurn, Completion, SessionInfo, SessionListing, SnapshotInfo, Tokens, chat_turn


class Api(Protocol):
    """What ``LocalApi`` and ``RemoteApi`` both do."""

    def chat(self, turn: ChatTurn) -> Iterator[Event]: ...
    def complete(self, completion: Completion) -> Iterator[Event]: ...
    def tokenize(self, source: str | list[dict], *, add_special: bool = True, add_generation_prompt: bool = True,
                 with_pieces: bool = False) -> Tokens: ...
    def detokenize(self, ids: list[int]) -> str: ...
    def create_session(self, session_id: str | None = None, max_seq_len: int | None = None, *,
                       ephemeral: bool = False) -> SessionInfo: ...
    def get_session(self, session_id: str) -> SessionInfo: ...
    def list_sessions(self) -> SessionListing: ...
    def history(self, session_id: str) -> list[dict]: ...
    def fork(self, session_id: str, new_id: str | None = None) -> SessionInfo: ...
    def rollback(self, session_id: str, n_messages: int) -> SessionInfo: ...
    def resize(self, session_id: str, max_seq_len: int) -> SessionInfo: ...
    def save(self, session_id: str, *, title: str | None = None, description: str | None = None,
             tags: list[str] | None = None) -> SnapshotInfo: ...
    def close_session(self, session_id: str) -> SessionInfo: ...
    def list_snapshots(self, tag: str | None = None, include_session_state: bool = False) -> list[SnapshotInfo]: ...
    def skipped_snapshots(self) -> list[dict]: ...
    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo: ...
    def update_snapshot(self, snapshot_id: str, **fields: Any) -> SnapshotInfo: ...
    def delete_snapshot(self, snapshot_id: str) -> None: ...
    def export_snapshot(self, snapshot_id: str, dest: str | Path, on_bytes=None) -> Path: ...
    def import_snapshot(self, file: str | Path, *, snapshot_id: str | None = None, replace: bool = False,
                        on_bytes=None) -> SnapshotInfo: ...
    def load(self, snapshot_id: str, *, session_id: str | None = None, force: bool = False,
             max_seq_len: int | None = None, ephemeral: bool = False) -> SessionInfo: ...
    def close(self) -> Any: ...


def connect(target: str | None = None, *, api_key: str | None = None, **options: Any) -> Api:
    """An API: ``"local"`` loads a model in this process (``options``: ``LocalOptions``' fields;
    the model defaults to ``$SPL_MODEL``, else ``"default"``); a URL talks to that server.
    ``None``: ``$SPL_SERVER_URL`` when set, else local."""
    target = target or os.environ.get("SPL_SERVER_URL") or "local"
    if target == "local":
        from .local import LocalApi, LocalOptions

        options.setdefault("model", os.environ.get("SPL_MODEL") or "default")
        return LocalApi.open(LocalOptions(**options))
    from .remote import RemoteApi

    return RemoteApi(target, api_key if api_key is not None else os.environ.get("SPL_API_KEY"), **options)


def collect_text(events: Iterator[Event]) -> tuple[str, Done]:
    """Run a turn to its end: its answer text and its ``Done``."""
    text, done = [], None
    for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Done):
            done = event
    if done is None:
        raise RuntimeError("the events ended without Done")
    return "".join(text), done


__all__ = ["Api", "ChatTurn", "Completion", "Done", "Event", "Persisted", "PrefillProgress", "ReasoningDelta",
           "SessionInfo", "SessionListing", "SnapshotInfo", "Started", "TextDelta", "Tokens", "ToolCallsEvent",
           "chat_turn", "collect_text", "connect"]
