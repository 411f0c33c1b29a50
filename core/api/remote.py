"""``RemoteApi``: the API over HTTP, against an spl server. The same operations and results as
``LocalApi``; a chat turn's server-sent events are read back into the same core events (the
server puts what OpenAI's chunks leave out, such as the stored message and the raw usage, in
its final chunk's ``done`` field). Errors come back as the ``superlinear.errors`` class the
server raised (``errors.from_openai``); an unreachable server is ``Unavailable``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from superlinear import protocol
from superlinear.engine.types import Logprobs
from superlinear.errors import InvalidRequest, Unavailable, UserError, from_openai
from superlinear.service.chat_service import ChatTurn
from superlinear.service.logprobs import read_chat_logprobs, read_completion_logprobs

from .events import Done, Event, Persisted, PrefillProgress, ReasoningDelta, Started, TextDelta, ToolCallsEvent
from .types import Completion, ModelInfo, SessionInfo, SessionListing, SnapshotInfo, Tokens


def _q(part: str) -> str:
    return quote(str(part), safe="")


def error_from_response(response: httpx.Response) -> UserError:
    """The ``UserError`` an error response stands for (OpenAI error body or plain text)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip() if response.is_closed else ""
        body = {"error": {"message": text.splitlines()[0][:300] if text else None}}
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        detail = body.get("detail") if isinstance(body, dict) else None
        err = {"message": str(detail) if detail else None}
    if not err.get("message"):
        err = {**err, "message": f"the server answered HTTP {response.status_code}"}
    return from_openai(err, response.status_code)


def server_root(url: str) -> str:
    """The server's root URL from what a user may give: ``host:port``, ``http://host:port/``
    or the OpenAI-style base URL ``http://host:port/v1`` (the routes add ``/v1/...`` themselves)."""
    url = url.strip() if "://" in url else f"http://{url.strip()}"
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class RemoteApi:
    """Every operation of ``superlinear.api.Api`` against the spl server at ``base_url`` (with or
    without ``/v1``), plus what only a server has: its ``/health`` and its models.
    ``superlinear.connect(url)`` makes one; ``target`` says which server it is and why that one
    (``superlinear.client.Target``)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float | None = 600.0,
                 connect_timeout: float = 5.0, target: Any = None):
        self.base_url = server_root(base_url)
        self.api_key = api_key
        self.target = target
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=connect_timeout))

    # -- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(
            f"cannot reach the spl server at {self.base_url} ({type(exc).__name__}); "
            "start one with `spl server start` or point to one with `spl server connect URL`"
        )

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json() if response.content else None

    def _events(self, path: str, body: dict, read: Callable[[Iterator[dict]], Iterator[Event]]) -> Iterator[Event]:
        from httpx_sse import connect_sse

        try:
            with connect_sse(self.http, "POST", path, json=body) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    raise error_from_response(source.response)
                yield from read(_chunks(source.iter_sse()))
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc

    # -- the server itself ---------------------------------------------------------------------
    def health(self, timeout: float | None = None) -> dict:
        """``GET /health``: ``{"status": "ok"|"loading", "model", "sessions", ...}`` (never 401)."""
        kwargs = {"timeout": timeout} if timeout is not None else {}
        try:
            response = self.http.get("/health", **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        try:
            return response.json()
        except ValueError as exc:
            raise Unavailable(f"{self.base_url} does not look like an spl server") from exc

    def is_up(self, timeout: float = 2.0) -> bool:
        """True when a server answers ``/health`` with status ``ok`` (model loaded)."""
        try:
            return self.health(timeout=timeout).get("status") == "ok"
        except UserError:
            return False

    def prefill_speed(self) -> dict | None:
        """The server's last measured prefill (``{"tokens", "seconds", "tokens_per_s"}``), from
        ``/health``; None when it has measured none (or is older than this client)."""
        speed = self.health(timeout=5.0).get("prefill")
        return speed if isinstance(speed, dict) else None

    def models(self) -> list[dict]:
        return self.request("GET", "/v1/models")["data"]

    # -- the operations: each call is built from its declaration (``superlinear.protocol``) --------
    def send(self, command: protocol.ApiCommand) -> Any:
        """Run one operation on the server: its route and method, path fields in the path, the
        others in the body (or the query) under their wire names; the result read off the answer."""
        http = command.http
        values = command.arguments()
        path = http.route.format(**{name: _q(values.pop(name)) for name in http.path_fields()})
        wire = {http.wire.get(k, k): v for k, v in values.items()
                if k in {f.name for f in command.wire_fields().values()}}
        if http.query:
            answer = self.request(http.method, path, params={k: _query_value(v) for k, v in wire.items()})
        elif http.method in ("GET", "DELETE"):
            answer = self.request(http.method, path)
        else:
            answer = self.request(http.method, path, json=wire)
        return command.read(answer)

    def chat(self, turn: ChatTurn) -> Iterator[Event]:
        """One turn's events, as ``LocalApi.chat`` yields them. Closing the iterator early closes
        the connection: the server cancels the turn."""
        return self._events(protocol.Chat.http.route, protocol.chat_body(turn), read_chat)

    def complete(self, completion: Completion) -> Iterator[Event]:
        return self._events(protocol.Complete.http.route, protocol.completion_body(completion), read_completion)

    def tokenize(self, source: str | list[dict], *, add_special: bool = True, add_generation_prompt: bool = True,
                 with_pieces: bool = False) -> Tokens:
        body: dict[str, Any] = {"content": source} if isinstance(source, str) else {"messages": source}
        body.update(add_special=add_special, add_generation_prompt=add_generation_prompt, with_pieces=with_pieces)
        return self.request(protocol.Tokenize.http.method, protocol.Tokenize.http.route, json=body)

    def detokenize(self, ids: list[int]) -> str:
        return self.send(protocol.Detokenize(ids=tuple(ids)))

    def get_model(self, model: str | None = None) -> ModelInfo:
        """The model served: OpenAI's model object, which carries spl's fields too."""
        if model is None:
            card = self.models()[0]
        else:
            card = self.send(protocol.GetModel(model))
        return {k: card[k] for k in ModelInfo.__annotations__}

    def create_session(self, session_id: str | None = None, max_seq_len: int | None = None, *,
                       ephemeral: bool = False) -> SessionInfo:
        return self.send(protocol.CreateSession(session_id, max_seq_len, ephemeral))

    def get_session(self, session_id: str) -> SessionInfo:
        return self.send(protocol.GetSession(session_id))

    def list_sessions(self) -> SessionListing:
        return self.send(protocol.ListSessions())

    def history(self, session_id: str) -> list[dict]:
        return self.send(protocol.History(session_id))

    def fork(self, session_id: str, new_id: str | None = None) -> SessionInfo:
        return self.send(protocol.Fork(session_id, new_id))

    def rollback(self, session_id: str, n_messages: int) -> SessionInfo:
        """Keep the first ``n_messages`` messages of the transcript (negative: drop that many)."""
        return self.send(protocol.Rollback(session_id, n_messages))

    def resize(self, session_id: str, max_seq_len: int) -> SessionInfo:
        return self.send(protocol.Resize(session_id, max_seq_len))

    def save(self, session_id: str, *, title: str | None = None, description: str | None = None,
             tags: list[str] | None = None) -> SnapshotInfo:
        return self.send(protocol.Save(session_id, title, description, tuple(tags) if tags is not None else None))

    def close_session(self, session_id: str) -> SessionInfo:
        return self.send(protocol.CloseSession(session_id))

    def list_snapshots(self, tag: str | None = None, include_session_state: bool = False) -> list[SnapshotInfo]:
        return self.send(protocol.ListSnapshots(tag, include_session_state))

    def skipped_snapshots(self) -> list[dict]:
        return self.request("GET", "/health").get("snapshots_skipped", [])

    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        return self.send(protocol.GetSnapshot(snapshot_id))

    def update_snapshot(self, snapshot_id: str, **fields: Any) -> SnapshotInfo:
        if "tags" in fields and fields["tags"] is not None:
            fields["tags"] = tuple(fields["tags"])
        return self.send(protocol.UpdateSnapshot(snapshot_id, **fields))

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.send(protocol.DeleteSnapshot(snapshot_id))

    def load(self, snapshot_id: str, *, session_id: str | None = None, force: bool = False,
             max_seq_len: int | None = None, ephemeral: bool = False) -> SessionInfo:
        return self.send(protocol.Load(snapshot_id, session_id, force, max_seq_len, ephemeral))

    def export_snapshot(self, snapshot_id: str, dest: str | Path,
                        on_bytes: Callable[[int, int | None], None] | None = None) -> Path:
        """Download the snapshot as one file (written atomically). ``on_bytes(done, total)``
        after every block (``total`` from Content-Length, None when the server sends none)."""
        path = Path(dest)
        tmp = path.with_name(path.name + ".part")
        try:
            with self.http.stream("GET", f"/v1/snapshots/{_q(snapshot_id)}/export") as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                with open(tmp, "wb") as out:
                    for block in response.iter_bytes(1 << 20):
                        out.write(block)
                        if on_bytes is not None:
                            on_bytes(out.tell(), total)
        except httpx.TransportError as exc:
            tmp.unlink(missing_ok=True)
            raise self.unreachable(exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        return path

    def import_snapshot(self, file: str | Path, *, snapshot_id: str | None = None, replace: bool = False,
                        name: str | None = None,
                        on_bytes: Callable[[int, int | None], None] | None = None) -> SnapshotInfo:
        """Upload a file made by ``export_snapshot``; ``on_bytes(done, total)`` after every block."""
        path = Path(file)
        if not path.is_file():
            raise InvalidRequest(f"no such file: {path}")
        total = path.stat().st_size

        def blocks():
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    yield block
                    if on_bytes is not None:
                        on_bytes(f.tell(), total)

        params = _given(snapshot_id=snapshot_id, replace="true" if replace else None)
        return self.request("POST", "/v1/snapshots/import", content=blocks(), params=params,
                            headers={"Content-Type": "application/octet-stream"})


def _given(**fields: Any) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def _query_value(value: Any) -> Any:
    return ("true" if value else "false") if isinstance(value, bool) else value


def _chunks(sse) -> Iterator[dict]:
    """The JSON chunks of a stream until ``[DONE]``; an error chunk raises its ``UserError``."""
    for message in sse:
        if message.data == "[DONE]":
            return
        chunk = json.loads(message.data)
        if isinstance(chunk.get("error"), dict):
            raise from_openai(chunk["error"])
        yield chunk


def done_event(fields: dict) -> Done:
    """``Done`` from the ``done`` field of a final chunk (the server puts the whole ``Done`` there:
    OpenAI's fields cannot say it all)."""
    return Done(fields["finish_reason"], fields["message"], fields["usage"], fields["timings"],
                reasoning=fields.get("reasoning"), partial=bool(fields.get("partial")),
                stop_reason=fields.get("stop_reason"))


def read_chat(chunks: Iterator[dict]) -> Iterator[Event]:
    calls: dict[int, dict] = {}
    done = None
    for chunk in chunks:
        if "session_update" in chunk and chunk.get("choices") and "role" in chunk["choices"][0].get("delta", {}):
            yield Started(chunk["session_update"])
        if isinstance(chunk.get("prompt_progress"), dict):
            p = chunk["prompt_progress"]
            yield PrefillProgress(p["processed"], p["total"], p["cache"], p["time_ms"] / 1000)
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if isinstance(choice.get("logprobs"), dict):
                yield from picked(read_chat_logprobs(choice["logprobs"]))
            if delta.get("reasoning_content"):
                yield ReasoningDelta(delta["reasoning_content"])
            if delta.get("content"):
                yield TextDelta(delta["content"])
            for tc in delta.get("tool_calls") or []:
                calls[tc.get("index", 0)] = {"id": tc.get("id"), "type": "function", "function": tc["function"]}
        if "done" in chunk:
            if calls:
                yield ToolCallsEvent([calls[i] for i in sorted(calls)])
            if "persisted" in chunk:
                error = chunk.get("persist_error")
                yield Persisted(chunk["persisted"], from_openai(error) if error else None)
            done = done_event(chunk["done"])
    if done is None:
        raise Unavailable("the server ended the stream before the turn ended")
    yield done


def picked(entries: list) -> Iterator[Logprobs]:
    """Generated tokens' logprobs as the engine yields them: one event per picked token (a chunk
    carries those of every token picked since the last one)."""
    for entry in entries:
        yield Logprobs([entry])


def read_completion(chunks: Iterator[dict]) -> Iterator[Event]:
    """A completion's events from its chunks: the chunk that says ``echo`` holds the echoed
    prompt, which is no generated text (``LocalApi`` yields none), and its logprobs (the prompt's)."""
    done = None
    for chunk in chunks:
        echo = chunk.get("echo") is True
        for choice in chunk.get("choices") or []:
            if isinstance(choice.get("logprobs"), dict):
                entries = read_completion_logprobs(choice["logprobs"])
                yield from [Logprobs(entries, prompt=True)] if echo else picked(entries)
            if choice.get("text") and not echo:
                yield TextDelta(choice["text"])
        if "done" in chunk:
            done = done_event(chunk["done"])
    if done is None:
        raise Unavailable("the server ended the stream before the completion ended")
    yield done
