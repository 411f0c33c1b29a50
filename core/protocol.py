"""The protocol: every operation of the API, declared once. An operation is a command class:

- its fields are the request (the API method's arguments; tuples go as lists, None is left
  out), with their bounds (``bounded``) where a user could send anything;
- ``method``: the API method it calls, ``result``: what that returns (``superlinear.api.types``),
  ``streams``: whether the result is an iterator of events;
- ``http``: how it goes over HTTP (method, route, status, the names the wire gives its fields,
  where in the answer its result is), from which ``RemoteApi`` builds its call and the server
  registers its route; ``answer(result)`` is the body the route answers.

The command is the bus command too: it runs against the API the dispatch context is bound to
(``Context(api=...)``: in process or over HTTP), so the CLI, the REPL's slash commands, rag and
plugins share one path and the bus's middleware (errors, tracing) wraps every operation.
Chat and completions are OpenAI's shapes: their bodies are ``chat_body`` / ``completion_body``,
from the engine's request types field by field, read back by the server's OpenAI adapters.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from superlinear.api.types import ChatTurn, Completion, ModelInfo, SessionInfo, SessionListing, SnapshotInfo, Tokens
from superlinear.bus import Command, Context
from superlinear.engine import limits
from superlinear.engine.types import RepetitionConfig, SamplingParams
from superlinear.errors import InvalidRequest

OnBytes = Callable[[int, int | None], None]


def _snapshot_text() -> str:
    from superlinear.sessions.manifest import MAX_DESCRIPTION, MAX_TAG_LEN, MAX_TAGS, MAX_TITLE

    return f"title {MAX_TITLE}, description {MAX_DESCRIPTION:,} characters; tags {MAX_TAGS} of {MAX_TAG_LEN}"


def _manifest_depth() -> int:
    from superlinear.sessions.manifest import MAX_DEPTH

    return MAX_DEPTH


@dataclass(frozen=True)
class Http:
    """How an operation goes over HTTP. ``route``'s ``{names}`` are fields of the command; the
    other fields go in a JSON body (``query``: in the query string), under their ``wire`` name
    where it differs. ``result_key``: the answer's key that holds the result (None: all of it).
    ``served``: the server registers the route from this declaration (else a route of its own
    carries it: an upload, a download).

    What the server checks before any work (docs/server.md's table of bounds): ``body_bytes``, the
    most bytes of the body or how that limit is computed (None: the default of a small JSON body,
    or 0 without one); ``depth``, its JSON nesting (None: the default); ``items``, the bounds of
    its strings and lists; ``reply``, what the answer may hold; ``upload``, the media type of a
    body that is a file rather than JSON. A bound may be a function that gives it: the limits of
    snapshots live beside torch, which the protocol (the CLI's) does not import."""

    method: str
    route: str
    status: int = 200
    wire: Mapping[str, str] = field(default_factory=dict)
    query: bool = False
    result_key: str | None = None
    served: bool = True
    body_bytes: int | str | None = None
    depth: int | Callable[[], int] | None = None
    items: str | Callable[[], str] | None = None
    reply: str | None = None
    upload: str | None = None

    def path_fields(self) -> list[str]:
        import string

        return [name for _, name, _, _ in string.Formatter().parse(self.route) if name]


def bounded(default: Any = None, *, ge: int | None = None, le: int | None = None) -> Any:
    """A field with the bounds the server checks before any work."""
    return field(default=default, metadata={"ge": ge, "le": le})


def _bytes_field():
    return field(default=None, compare=False, repr=False, metadata={"wire": False})


@dataclass(frozen=True)
class ApiCommand(Command):
    """A command that is one API operation: ``method`` of the bound API, with the fields."""

    name: ClassVar[str] = "api"
    method: ClassVar[str] = ""
    result: ClassVar[Any] = None
    streams: ClassVar[bool] = False
    http: ClassVar[Http | None] = None

    def run(self, ctx: Context) -> Any:
        if ctx.api is None:
            raise InvalidRequest(f"{self.name}: no API to run it against (dispatch with Context(api=...))")
        return self.call(ctx.api)

    def arguments(self) -> dict:
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items() if v is not None}

    def call(self, api) -> Any:
        return getattr(api, self.method)(**self.arguments())

    def answer(self, result: Any) -> Any:
        """The body the server answers with ``result`` (where ``read`` finds it)."""
        return result

    def respond(self, api) -> Any:
        """What the server answers: the call on its API, as ``answer`` puts it."""
        return self.answer(self.call(api))

    @classmethod
    def read(cls, answer: Any) -> Any:
        """The result in the server's answer (``http.result_key``; ``""``: there is none)."""
        key = cls.http.result_key
        if key is None:
            return answer
        return answer[key] if key else None

    @classmethod
    def wire_fields(cls) -> dict[str, dataclasses.Field]:
        """The fields that go in the body or the query, by their wire names."""
        path = set(cls.http.path_fields())
        return {cls.http.wire.get(f.name, f.name): f for f in dataclasses.fields(cls)
                if f.name not in path and f.metadata.get("wire", True)}

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def sends_body(cls) -> bool:
        """Whether its wire fields go in a JSON body: not in the query, not on a GET or DELETE."""
        return not cls.http.query and cls.http.method not in ("GET", "DELETE") and bool(cls.wire_fields())


@dataclass(frozen=True)
class Streamed(ApiCommand):
    """An operation whose result is its events as they come: an iterator; close it to cancel."""

    result: ClassVar[Any] = Iterator
    streams: ClassVar[bool] = True


@dataclass(frozen=True)
class Chat(Streamed):
    """One turn of a conversation."""

    name, method = "chat", "chat"
    http = Http("POST", "/v1/chat/completions", served=False)
    turn: ChatTurn


@dataclass(frozen=True)
class Complete(Streamed):
    name, method = "complete", "complete"
    http = Http("POST", "/v1/completions", served=False)
    completion: Completion


@dataclass(frozen=True)
class Tokenize(ApiCommand):
    name, method, result = "tokenize", "tokenize", Tokens
    http = Http("POST", "/tokenize", served=False)  # llama.cpp's and vLLM's field names: an adapter
    source: str | tuple[dict, ...]
    add_special: bool = True
    add_generation_prompt: bool = True
    with_pieces: bool = False


@dataclass(frozen=True)
class Detokenize(ApiCommand):
    name, method, result = "detokenize", "detokenize", str
    http = Http("POST", "/detokenize", wire={"ids": "tokens"}, result_key="content", served=False)
    ids: tuple[int, ...]


@dataclass(frozen=True)
class GetModel(ApiCommand):
    """The model served; ``NotFound`` unless ``model`` is one of its names (None: whichever)."""

    name, method, result = "model.get", "get_model", ModelInfo
    http = Http("GET", "/v1/models/{model}", served=False)  # OpenAI's model object: an adapter
    model: str | None = None


# -- sessions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionCommand(ApiCommand):
    """An operation on one session."""

    session_id: str


@dataclass(frozen=True)
class CreateSession(ApiCommand):
    name, method, result = "session.create", "create_session", SessionInfo
    http = Http("POST", "/v1/sessions", status=201)
    session_id: str | None = None
    max_seq_len: int | None = bounded(ge=1, le=limits.MAX_TOKENS)
    ephemeral: bool = False  # never written to disk (a throwaway turn)


@dataclass(frozen=True)
class GetSession(SessionCommand):
    name, method, result = "session.get", "get_session", SessionInfo
    http = Http("GET", "/v1/sessions/{session_id}")


@dataclass(frozen=True)
class ListSessions(ApiCommand):
    name, method, result = "session.list", "list_sessions", SessionListing
    http = Http("GET", "/v1/sessions")

    def answer(self, result):
        return {"object": "list", "data": result["sessions"], **{k: v for k, v in result.items() if k != "sessions"}}

    @classmethod
    def read(cls, answer: dict) -> SessionListing:
        return {"sessions": answer["data"], **{k: answer.get(k) for k in ("count", "bytes", "resident",
                                                                           "memory_budget", "evict_to_disk")}}


@dataclass(frozen=True)
class History(SessionCommand):
    name, method, result = "session.history", "history", list
    http = Http("GET", "/v1/sessions/{session_id}/history", result_key="messages",
                reply="the messages of the conversation limit, encoded off the event loop")

    def answer(self, result):
        return {"object": "session.history", "id": self.session_id, "messages": result,
                "message_count": len(result)}


@dataclass(frozen=True)
class Fork(SessionCommand):
    name, method, result = "session.fork", "fork", SessionInfo
    http = Http("POST", "/v1/sessions/{session_id}/fork", status=201, wire={"new_id": "new_session_id"})
    new_id: str | None = None


@dataclass(frozen=True)
class Rollback(SessionCommand):
    """Keep the first ``n_messages`` messages (negative: drop the last ``-n_messages``)."""

    name, method, result = "session.rollback", "rollback", SessionInfo
    http = Http("POST", "/v1/sessions/{session_id}/rollback")
    n_messages: int = bounded(dataclasses.MISSING, ge=-limits.MAX_TOKENS, le=limits.MAX_TOKENS)


@dataclass(frozen=True)
class Resize(SessionCommand):
    name, method, result = "session.resize", "resize", SessionInfo
    http = Http("POST", "/v1/sessions/{session_id}/resize", items="max_seq_len: the conversation limit")
    max_seq_len: int = bounded(dataclasses.MISSING, ge=1, le=limits.MAX_TOKENS)


@dataclass(frozen=True)
class Save(SessionCommand):
    """Snapshot a session; the snapshot's info."""

    name, method, result = "session.save", "save", SnapshotInfo
    http = Http("POST", "/v1/sessions/{session_id}/save", status=201, items=_snapshot_text)
    title: str | None = None
    description: str | None = None
    tags: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CloseSession(SessionCommand):
    name, method, result = "session.close", "close_session", SessionInfo
    http = Http("DELETE", "/v1/sessions/{session_id}", result_key="session")

    def answer(self, result):
        return {"id": self.session_id, "object": "session.deleted", "deleted": True, "session": result}


# -- snapshots --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SnapshotCommand(ApiCommand):
    snapshot_id: str  # the snapshot it works on


@dataclass(frozen=True)
class ListSnapshots(ApiCommand):
    name, method, result = "snapshot.list", "list_snapshots", list
    http = Http("GET", "/v1/snapshots", query=True, wire={"include_session_state": "all"}, result_key="data")

    tag: str | None = None
    include_session_state: bool = False

    def answer(self, result):
        return {"object": "list", "data": result}

    def respond(self, api):
        # unreadable snapshots are left out, never a failed listing: they are named beside it
        return {**super().respond(api), "skipped": api.skipped_snapshots()}


@dataclass(frozen=True)
class SkippedSnapshots(ApiCommand):
    """The snapshots the last listing left out as unreadable: ``[{"id", "error"}]``."""

    name, method, result = "snapshot.skipped", "skipped_snapshots", list
    http = Http("GET", "/health", result_key="snapshots_skipped", served=False)  # a part of /health


@dataclass(frozen=True)
class GetSnapshot(SnapshotCommand):
    name, method, result = "snapshot.get", "get_snapshot", SnapshotInfo
    http = Http("GET", "/v1/snapshots/{snapshot_id}")  # its manifest, without the list of its files


@dataclass(frozen=True)
class UpdateSnapshot(SnapshotCommand):
    """Change a snapshot's title, description or tags (None: unchanged)."""

    name, method, result = "snapshot.update", "update_snapshot", SnapshotInfo
    http = Http("PATCH", "/v1/snapshots/{snapshot_id}", items=_snapshot_text)
    title: str | None = None
    description: str | None = None
    tags: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DeleteSnapshot(SnapshotCommand):
    name, method, result = "snapshot.delete", "delete_snapshot", type(None)
    http = Http("DELETE", "/v1/snapshots/{snapshot_id}", result_key="")

    def answer(self, result):
        return {"id": self.snapshot_id, "object": "snapshot.deleted", "deleted": True}


@dataclass(frozen=True)
class ExportSnapshot(SnapshotCommand):
    """Write a snapshot to one file; ``on_bytes(done, total)`` follows the transfer."""

    name, method, result = "snapshot.export", "export_snapshot", str
    http = Http("GET", "/v1/snapshots/{snapshot_id}/export", served=False,  # a file download
                reply="the snapshot's files, streamed from disk")
    dest: str
    on_bytes: OnBytes | None = _bytes_field()


@dataclass(frozen=True)
class ImportSnapshot(ApiCommand):
    name, method, result = "snapshot.import", "import_snapshot", SnapshotInfo
    http = Http("POST", "/v1/snapshots/import", status=201, query=True, served=False,  # an upload
                body_bytes="the room of the disk: free space less $SPL_STORE_RESERVE_BYTES", depth=_manifest_depth,
                items="manifest: 16 MiB; then only the files it lists, each hashed and stopped at the size it "
                      "declares (never more decompressed)", upload="application/x-tar")
    file: str
    snapshot_id: str | None = None
    replace: bool = False
    on_bytes: OnBytes | None = _bytes_field()


@dataclass(frozen=True)
class Load(SnapshotCommand):
    """A session holding a snapshot's state (``ephemeral``: never written to disk)."""

    name, method, result = "snapshot.load", "load", SessionInfo
    http = Http("POST", "/v1/snapshots/{snapshot_id}/load", status=201)
    session_id: str | None = None
    force: bool = False
    max_seq_len: int | None = bounded(ge=1, le=limits.MAX_TOKENS)
    ephemeral: bool = False


OPERATIONS: tuple[type[ApiCommand], ...] = (
    Chat, Complete, Tokenize, Detokenize, GetModel, CreateSession, GetSession, ListSessions, History, Fork, Rollback,
    Resize, Save, CloseSession, ListSnapshots, SkippedSnapshots, GetSnapshot, UpdateSnapshot, DeleteSnapshot,
    ExportSnapshot, ImportSnapshot, Load)


# -- chat and completions: OpenAI's bodies, from the engine's request types field by field ----------
# Every field of SamplingParams goes by its own name, but these: the chat's logprobs are OpenAI's
# ``logprobs: true`` + ``top_logprobs: n``, a completion's the legacy ``logprobs: n``; the output
# constraint (``structured``) is OpenAI's ``response_format`` or vLLM's ``structured_outputs``.
_SAMPLING_OWN_WIRE = ("logprobs", "structured")


def structured_fields(structured: dict | None) -> dict:
    """The engine's ``structured`` constraint as the fields that say it on the wire (the server
    reads them back into the same dict: ``engine.grammar.from_response_format``)."""
    if not structured:
        return {}
    if "json" in structured:
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "output", "schema": structured["json"], "strict": bool(structured.get("strict"))}}}
    if structured.get("json_object"):
        return {"response_format": {"type": "json_object"}}
    return {"structured_outputs": dict(structured)}  # regex, choice, grammar


def _given(**fields: Any) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def sampling_fields(sampling: SamplingParams, repetition: RepetitionConfig | None) -> dict:
    """Every sampling field that is set, by its name on the wire."""
    body = {}
    for f in dataclasses.fields(SamplingParams):
        value = getattr(sampling, f.name)
        if f.name in _SAMPLING_OWN_WIRE or value is None or value == []:
            continue
        body[f.name] = {str(k): v for k, v in value.items()} if f.name == "logit_bias" else value
    if repetition is not None:
        body["repetition_detection"] = dataclasses.asdict(repetition)
    return {**body, **structured_fields(sampling.structured)}


def chat_body(turn: ChatTurn) -> dict:
    """The ``/v1/chat/completions`` body of a turn, streamed with the events spl adds."""
    r = turn.request
    logprobs = r.sampling.logprobs
    return {"model": "default", "messages": r.messages, "stream": True, "stream_options": {"include_usage": True},
            "return_progress": True, "session_mode": turn.session_mode,
            **sampling_fields(r.sampling, r.repetition),
            **{f.name: getattr(r, f.name) for f in dataclasses.fields(r)  # the fields it declares for clients
               if "doc" in f.metadata and getattr(r, f.name) != f.default},
            **_given(logprobs=True if logprobs is not None else None, top_logprobs=logprobs,
                     session_id=turn.session_id, tools=r.tools, tool_choice=r.tool_choice,
                     chat_template_kwargs=r.chat_template_kwargs)}


def completion_body(completion: Completion) -> dict:
    return {"model": "default", "prompt": completion.prompt, "stream": True,
            **sampling_fields(completion.sampling, completion.repetition),
            **_given(logprobs=completion.sampling.logprobs, echo=completion.echo or None)}


__all__ = ["OPERATIONS", "ApiCommand", "Chat", "CloseSession", "Complete", "CreateSession", "DeleteSnapshot",
           "Detokenize", "ExportSnapshot", "Fork", "GetModel", "GetSession", "GetSnapshot", "History", "Http",
           "ImportSnapshot", "ListSessions", "ListSnapshots", "Load", "Resize", "Rollback", "Save", "SessionCommand",
           "SkippedSnapshots", "SnapshotCommand", "Tokenize", "UpdateSnapshot", "chat_body", "completion_body",
           "sampling_fields"]
