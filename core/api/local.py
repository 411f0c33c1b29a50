"""``LocalApi``: the API in process. It owns the model's worker thread: every call that touches
the model or a cache runs there, so any thread (a notebook, a server's event loop through
``asyncio.wrap_future``, a batch job) may call it; listings and snapshot files are read on the
caller's thread and never wait for a turn. ``open_service`` is the one wiring of model,
snapshot store, session manager and service."""

from __future__ import annotations

import functools
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from superlinear.service.chat_service import ChatService, ChatTurn

from .events import Event
from .types import Completion, ModelInfo, SessionInfo, SessionListing, SnapshotInfo, Tokens
from .worker import Job, Worker

_END = object()  # a streaming job's last item


@dataclass(frozen=True)
class LocalOptions:
    """How the in-process API loads its model. ``persist``: ``"turn"`` journals a session after
    every turn (idle sessions then go to disk when memory runs short), ``"shutdown"`` only on
    close (a request that needs memory others hold is refused instead)."""

    model: str = "default"
    served_model_name: str | None = None  # the name the model is reported by (None: its own)
    device: str | None = None
    memory_budget: int | str | None = "auto"
    persist: str = "turn"
    max_seq_len: int | None = None
    chunk_size: int | None = None
    loaders: tuple = ()
    snapshots_dir: str | None = None  # None: superlinear.paths.snapshots_dir()


def open_service(options: LocalOptions, progress: Callable[[str], None] | None = None) -> ChatService:
    """Load the model and wire it to a snapshot store, a session manager and the service; the
    sessions a previous run left are listed again (``service.restored``: their ids)."""
    from superlinear.model import load_model
    from superlinear.sessions import SessionManager, SnapshotStore

    say = progress or (lambda _line: None)
    say(f"loading model {options.model}")
    model = load_model(options.model, device=options.device, loaders=options.loaders)
    say("opening the snapshot store")
    store = SnapshotStore(options.snapshots_dir) if options.snapshots_dir else SnapshotStore()
    say("setting up the sessions (memory budget, max_seq_len)")
    # Past the memory budget, idle sessions go to disk when their journal is kept current
    # anyway (persist "turn": eviction writes little or nothing); otherwise the request that
    # needs the memory is refused.
    manager = SessionManager(model, store, memory_budget=options.memory_budget or "auto",
                             evict_to_disk=options.persist == "turn", default_max_seq_len=options.max_seq_len,
                             chunk_size=options.chunk_size)
    service = ChatService(model, manager, store, persist_turns=options.persist == "turn",
                          chunk_size=options.chunk_size, aliases=(options.model,),
                          served_name=options.served_model_name, max_model_len=options.max_seq_len)
    say("restoring sessions")
    service.restored = manager.restore_index()
    return service


class LocalApi:
    """Every operation of ``superlinear.api.Api`` on a model in this process."""

    def __init__(self, service: ChatService, *, worker: Worker | None = None):
        self.service = service
        self.worker = worker or Worker()

    @property
    def model(self):
        return self.service.model

    def close(self, timeout: float | None = 600.0) -> list[str]:
        """Bring every session's journal up to date and stop the worker; returns the ids saved."""
        self.worker.cancel_all()
        try:
            return self.worker.call(self.service.manager.persist_all, timeout=timeout)
        finally:
            self.worker.stop()

    def __enter__(self) -> LocalApi:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- generation ----------------------------------------------------------------------------
    def submit_chat(self, turn: ChatTurn, emit: Callable[[Any], None]) -> Job:
        """Queue a chat turn; each event goes to ``emit`` on the worker thread (a server's
        bridge to its event loop). ``job.future`` ends when the turn does."""
        return self.worker.submit(lambda job: _drain(self.service.chat(turn, cancel=job.cancel_event), job),
                                  kind="generation", emit=emit, session=turn.session_id)

    def submit_completion(self, completion: Completion, emit: Callable[[Any], None]) -> Job:
        return self.worker.submit(
            lambda job: _drain(self.service.complete(completion.prompt, completion.sampling,
                                                     repetition=completion.repetition, echo=completion.echo,
                                                     cancel=job.cancel_event), job),
            kind="generation", emit=emit)

    def chat(self, turn: ChatTurn) -> Iterator[Event]:
        """One turn's events (``superlinear.api.events``). Closing the iterator early cancels
        the turn: the session keeps the state it had before it."""
        return self._stream(self.submit_chat, turn)

    def complete(self, completion: Completion) -> Iterator[Event]:
        return self._stream(self.submit_completion, completion)

    def _stream(self, submit, request) -> Iterator[Event]:
        events: queue.SimpleQueue = queue.SimpleQueue()
        job = submit(request, events.put)
        job.future.add_done_callback(lambda _f: events.put(_END))
        try:
            while (item := events.get()) is not _END:
                yield item
            job.future.result()  # the turn's error, if it failed
        finally:
            job.cancel()

    def tokenize(self, source: str | list[dict], *, add_special: bool = True, add_generation_prompt: bool = True,
                 with_pieces: bool = False) -> Tokens:
        return self.service.tokenize(source, add_special=add_special, add_generation_prompt=add_generation_prompt,
                                     with_pieces=with_pieces)

    def detokenize(self, ids: list[int]) -> str:
        return self.service.detokenize(ids)

    def get_model(self, model: str | None = None) -> ModelInfo:
        self.service.check_model(model)
        manager = self.service.manager
        return {**self._model_facts, "max_seq_len_limit": manager.max_seq_len_limit(),
                "default_max_seq_len": manager.default_max_seq_len}

    @functools.cached_property
    def _model_facts(self) -> dict:
        """What stays the same while the model is loaded (``max_model_len`` may read the model's
        description, which walks every layer)."""
        service = self.service
        return {"id": service.model_name, "fingerprint": service.model.fingerprint,
                "max_model_len": service.max_model_len()}

    # -- sessions ------------------------------------------------------------------------------
    def create_session(self, session_id: str | None = None, max_seq_len: int | None = None, *,
                       ephemeral: bool = False) -> SessionInfo:
        return self.worker.call(lambda: self.service.create_session(session_id, max_seq_len, ephemeral=ephemeral),
                                session=session_id or object())

    def get_session(self, session_id: str) -> SessionInfo:
        return self.service.session_info(session_id)

    def list_sessions(self) -> SessionListing:
        return self.service.list_sessions()

    def history(self, session_id: str) -> list[dict]:
        return self.service.history(session_id)

    def fork(self, session_id: str, new_id: str | None = None) -> SessionInfo:
        self.service.session_info(session_id)  # a missing session fails at once, not after the queue
        return self.worker.call(lambda: self.service.fork_session(session_id, new_id), session=session_id)

    def rollback(self, session_id: str, n_messages: int) -> SessionInfo:
        self.service.session_info(session_id)
        return self.worker.call(lambda: self.service.rollback(session_id, n_messages), session=session_id)

    def resize(self, session_id: str, max_seq_len: int) -> SessionInfo:
        self.service.session_info(session_id)
        return self.worker.call(lambda: self.service.resize(session_id, max_seq_len), session=session_id)

    def save(self, session_id: str, *, title: str | None = None, description: str | None = None,
             tags: list[str] | None = None) -> SnapshotInfo:
        self.service.session_info(session_id)
        return self.worker.call(lambda: self.service.save(session_id, title=title, description=description,
                                                          tags=tags), session=session_id)

    def close_session(self, session_id: str) -> SessionInfo:
        self.service.session_info(session_id)
        return self.worker.call(lambda: self.service.close_session(session_id), session=session_id)

    def persist_failed(self) -> Job:
        """Write again, on the worker, every session whose last persist failed: the disk that was
        full or read-only may have recovered, and an idle session has no next turn to retry it.
        Its job (a failure is kept in the session, as ``persist_error``)."""

        def persist(_job: Job) -> None:
            for info in self.service.list_sessions()["sessions"]:
                if info["persist_error"]:
                    self.service.persist(info["id"])

        return self.worker.submit(persist, kind="admin")

    # -- snapshots -----------------------------------------------------------------------------
    def list_snapshots(self, tag: str | None = None, include_session_state: bool = False) -> list[SnapshotInfo]:
        return self.service.list_snapshots(tag, include_session_state)

    def skipped_snapshots(self) -> list[dict]:
        return list(self.service.store.skipped)

    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        return self.service.get_snapshot(snapshot_id)

    def update_snapshot(self, snapshot_id: str, **fields: Any) -> SnapshotInfo:
        return self.service.update_snapshot(snapshot_id, **fields)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.service.delete_snapshot(snapshot_id)

    def export_snapshot(self, snapshot_id: str, dest: str | Path,
                        on_bytes: Callable[[int, int | None], None] | None = None) -> Path:
        """Write the snapshot to one file; ``on_bytes(done, total)`` once it is written."""
        path = self.service.export_snapshot(snapshot_id, dest)
        if on_bytes is not None:
            size = path.stat().st_size
            on_bytes(size, size)
        return path

    def import_snapshot(self, file: str | Path, *, snapshot_id: str | None = None, replace: bool = False,
                        name: str | None = None,
                        on_bytes: Callable[[int, int | None], None] | None = None) -> SnapshotInfo:
        info = self.service.import_snapshot(file, snapshot_id=snapshot_id, replace=replace, name=name)
        if on_bytes is not None:
            size = Path(file).stat().st_size
            on_bytes(size, size)
        return info

    def load(self, snapshot_id: str, *, session_id: str | None = None, force: bool = False,
             max_seq_len: int | None = None, ephemeral: bool = False) -> SessionInfo:
        """A session holding the snapshot's state. ``ephemeral``: nothing of it is ever written
        to disk (a throwaway question on a saved context)."""
        self.service.get_snapshot(snapshot_id)
        return self.worker.call(lambda: self.service.load(snapshot_id, session_id=session_id, force=force,
                                                          max_seq_len=max_seq_len, ephemeral=ephemeral),
                                session=session_id or object())


def _drain(events: Iterator[Event], job: Job) -> None:
    """On the worker: hand every event of a turn to the job's ``emit``."""
    for event in events:
        job.emit(event)
