"""``SplClient``: the httpx client every spl command uses to talk to a server.

One method per route. Errors come back as ``superlinear.errors`` exceptions (the HTTP status
picks the class, the server's message is kept), an unreachable server as ``Unavailable``.
Streaming chat yields ``StreamEvent`` values; closing the iterator (``break``, Ctrl-C,
``.close()``) closes the connection, and the server stops that generation within one step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from superlinear.errors import (
    Busy,
    Conflict,
    InvalidRequest,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
    UserError,
)
from superlinear.plugins.settings.config import DEFAULT_HOST, DEFAULT_PORT

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"

_STATUS_ERRORS: dict[int, type[UserError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: InvalidRequest,
    429: Busy,
    503: Unavailable,
}


@dataclass
class StreamEvent:
    """One event of a streamed chat turn.

    ``type`` is ``"text"`` / ``"reasoning"`` (``text`` holds the delta), ``"tool_calls"``
    (``tool_calls``: OpenAI-style list, complete), ``"progress"`` (``progress``: llama.cpp's
    ``prompt_progress`` ``{total, cache, processed, time_ms}``, while the prompt is prefilled, when
    the request asked for it with ``return_progress=True``) or ``"done"`` (``finish_reason``,
    ``usage``, ``timings``, ``message``: the whole assistant message). ``session_id`` is set on
    every event.
    """

    type: str
    text: str = ""
    tool_calls: list[dict] | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    timings: dict | None = None
    message: dict | None = None
    session_id: str | None = None
    progress: dict | None = None


@dataclass
class ChatResult:
    """A whole (non-streamed or collected) chat turn."""

    content: str
    reasoning: str
    tool_calls: list[dict]
    finish_reason: str | None
    usage: dict
    timings: dict
    session_id: str | None
    raw: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """The server a command talks to, and why that one (``source``)."""

    url: str
    source: str  # "argument" | "$SPL_SERVER_URL" | "connect" | "local" | "configured"

    @property
    def chosen(self) -> bool:
        """The user named this server (argument, environment, `spl server connect`): use it as it is."""
        return self.source not in ("local", "configured")


def resolve_target(url: str | None = None) -> Target:
    """Explicit ``url`` > ``$SPL_SERVER_URL`` > ``spl server connect`` > the local server
    recorded in the state dir (checked to be alive and the same process) > the configured
    host and port (``$SPL_HOST``/``$SPL_PORT``, the config file, 127.0.0.1:8787), where no
    server of ours runs: whatever answers there is someone else's."""
    if url:
        return Target(url.rstrip("/"), "argument")
    env = os.environ.get("SPL_SERVER_URL")
    if env:
        return Target(env.rstrip("/"), "$SPL_SERVER_URL")
    from superlinear.plugins.client import state
    from superlinear.plugins.client.local import running_local
    from superlinear.plugins.settings.options import resolve_options

    connected = state.connected()
    if connected and connected.get("url"):
        return Target(connected["url"].rstrip("/"), "connect")
    local = running_local()
    if local and local.get("url"):
        return Target(local["url"].rstrip("/"), "local")
    options, _ = resolve_options()
    return Target(options.url(), "configured")


def resolve_url(url: str | None = None) -> str:
    return resolve_target(url).url


def resolve_api_key(api_key: str | None = None) -> str | None:
    """Explicit > ``$SPL_API_KEY`` > the one stored by ``spl server connect`` > the local server's."""
    if api_key:
        return api_key
    if os.environ.get("SPL_API_KEY"):
        return os.environ["SPL_API_KEY"]
    from superlinear.plugins.client import state
    from superlinear.plugins.client.local import running_local

    connected = state.connected()
    if connected and connected.get("api_key"):
        return connected["api_key"]
    local = running_local()
    if local and local.get("api_key"):
        return local["api_key"]
    return None


def error_from_response(response: httpx.Response) -> UserError:
    """The ``UserError`` an error response stands for (OpenAI error body or plain text)."""
    message = f"server answered HTTP {response.status_code}"
    param = code = None
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = err.get("message") or message
            param, code = err.get("param"), err.get("code")
        elif isinstance(body, dict) and body.get("detail"):
            message = str(body["detail"])
    except (ValueError, json.JSONDecodeError):
        text = response.text.strip() if not response.is_stream_consumed or response.is_closed else ""
        if text:
            message = text.splitlines()[0][:300]
    cls = _STATUS_ERRORS.get(response.status_code)
    if cls is None:
        cls = UserError if response.status_code < 500 else _ServerBug
    return cls(message, param=param, code=code)


class _ServerBug(UserError):
    """A 500 from the server: reported as one line, like any other error the CLI prints."""

    http_status = 500
    error_type = "server_error"
    code = "internal_error"


class SplClient:
    """Talk to an spl server.

    >>> c = SplClient()                      # resolve_target(): env, `spl server connect`, local
    >>> c.chat([{"role": "user", "content": "hi"}], session_id="s1").content
    >>> for ev in c.chat_stream([{"role": "user", "content": "more"}], session_id="s1"):
    ...     print(ev.text, end="")
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | None = 600.0, connect_timeout: float = 5.0):
        self.target = resolve_target(base_url)
        self.base_url = self.target.url
        self.api_key = resolve_api_key(api_key)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
        )

    # -- plumbing ------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SplClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        if not response.content:
            return None
        return response.json()

    def _unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(
            f"cannot reach the spl server at {self.base_url} ({type(exc).__name__}); "
            "start one with `spl server start` or point to one with `spl server connect URL`"
        )

    # -- health and models ---------------------------------------------------------------
    def health(self, timeout: float | None = None) -> dict:
        """``GET /health``: ``{"status": "ok"|"loading", "model", "sessions", ...}`` (never 401)."""
        kwargs = {"timeout": timeout} if timeout is not None else {}
        try:
            response = self._http.get("/health", **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
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
        return self._request("GET", "/v1/models")["data"]

    # -- chat ----------------------------------------------------------------------------
    @staticmethod
    def _chat_body(messages: list[dict], *, session_id: str | None, stream: bool, model: str | None,
                   tools: list[dict] | None, tool_choice: Any, temperature: float | None,
                   top_p: float | None, max_tokens: int | None, stop: str | list[str] | None,
                   seed: int | None, reasoning_budget: int | None,
                   repetition_detection: bool | dict | None, chat_template_kwargs: dict | None,
                   extra: dict) -> dict:
        body: dict[str, Any] = {"model": model or "default", "messages": messages, "stream": stream}
        optional = {
            "session_id": session_id, "tools": tools, "tool_choice": tool_choice,
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stop,
            "seed": seed, "reasoning_budget": reasoning_budget,
            "repetition_detection": repetition_detection, "chat_template_kwargs": chat_template_kwargs,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(extra)
        return body

    def chat(self, messages: list[dict], *, session_id: str | None = None, model: str | None = None,
             tools: list[dict] | None = None, tool_choice: Any = None, temperature: float | None = None,
             top_p: float | None = None, max_tokens: int | None = None, stop: str | list[str] | None = None,
             seed: int | None = None, reasoning_budget: int | None = None,
             repetition_detection: bool | dict | None = None, chat_template_kwargs: dict | None = None,
             **extra) -> ChatResult:
        """One non-streamed turn (``POST /v1/chat/completions``). ``extra`` goes into the body."""
        body = self._chat_body(messages, session_id=session_id, stream=False, model=model, tools=tools,
                               tool_choice=tool_choice, temperature=temperature, top_p=top_p,
                               max_tokens=max_tokens, stop=stop, seed=seed,
                               reasoning_budget=reasoning_budget,
                               repetition_detection=repetition_detection,
                               chat_template_kwargs=chat_template_kwargs, extra=extra)
        raw = self._request("POST", "/v1/chat/completions", json=body)
        choice = raw["choices"][0]
        message = choice.get("message") or {}
        return ChatResult(
            content=message.get("content") or "",
            reasoning=message.get("reasoning_content") or "",
            tool_calls=message.get("tool_calls") or [],
            finish_reason=choice.get("finish_reason"),
            usage=raw.get("usage") or {},
            timings=raw.get("timings") or {},
            session_id=raw.get("session_id"),
            raw=raw,
        )

    def chat_stream(self, messages: list[dict], *, session_id: str | None = None, model: str | None = None,
                    tools: list[dict] | None = None, tool_choice: Any = None,
                    temperature: float | None = None, top_p: float | None = None,
                    max_tokens: int | None = None, stop: str | list[str] | None = None,
                    seed: int | None = None, reasoning_budget: int | None = None,
                    repetition_detection: bool | dict | None = None,
                    chat_template_kwargs: dict | None = None, **extra) -> Iterator[StreamEvent]:
        """A streamed turn: yields ``StreamEvent`` s, the last one of type ``"done"``.

        Closing the generator early closes the connection: the server cancels the turn and the
        session keeps the state it had before the request (or exactly the partial output).
        """
        body = self._chat_body(messages, session_id=session_id, stream=True, model=model, tools=tools,
                               tool_choice=tool_choice, temperature=temperature, top_p=top_p,
                               max_tokens=max_tokens, stop=stop, seed=seed,
                               reasoning_budget=reasoning_budget,
                               repetition_detection=repetition_detection,
                               chat_template_kwargs=chat_template_kwargs, extra=extra)
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                yield from _parse_sse(response)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # -- sessions ------------------------------------------------------------------------
    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens ``messages`` take once rendered with the server model's chat template."""
        return int(self._request("POST", "/tokenize", json={"messages": messages})["count"])

    def create_session(self, session_id: str | None = None, max_seq_len: int | None = None) -> dict:
        body = {k: v for k, v in {"session_id": session_id, "max_seq_len": max_seq_len}.items() if v is not None}
        return self._request("POST", "/v1/sessions", json=body)

    def list_sessions(self) -> list[dict]:
        return self._request("GET", "/v1/sessions")["data"]

    def get_session(self, session_id: str) -> dict:
        return self._request("GET", f"/v1/sessions/{_q(session_id)}")

    def delete_session(self, session_id: str) -> dict:
        return self._request("DELETE", f"/v1/sessions/{_q(session_id)}")

    def history(self, session_id: str) -> list[dict]:
        """The session's transcript (OpenAI-style messages)."""
        return self._request("GET", f"/v1/sessions/{_q(session_id)}/history")["messages"]

    def fork(self, session_id: str, new_id: str | None = None) -> dict:
        body = {"new_session_id": new_id} if new_id else {}
        return self._request("POST", f"/v1/sessions/{_q(session_id)}/fork", json=body)

    def rollback(self, session_id: str, n_messages: int) -> dict:
        """Keep the first ``n_messages`` messages of the transcript (negative: drop that many)."""
        return self._request("POST", f"/v1/sessions/{_q(session_id)}/rollback", json={"n_messages": n_messages})

    def resize(self, session_id: str, max_seq_len: int) -> dict:
        return self._request("POST", f"/v1/sessions/{_q(session_id)}/resize", json={"max_seq_len": max_seq_len})

    def save_session(self, session_id: str, title: str | None = None, description: str | None = None,
                     tags: list[str] | None = None) -> dict:
        """Snapshot the session; returns the snapshot's info (``id`` is the snapshot id)."""
        body = {k: v for k, v in {"title": title, "description": description, "tags": tags}.items()
                if v is not None}
        return self._request("POST", f"/v1/sessions/{_q(session_id)}/save", json=body)

    # -- snapshots -----------------------------------------------------------------------
    def list_snapshots(self) -> list[dict]:
        return self._request("GET", "/v1/snapshots")["data"]

    def get_snapshot(self, snapshot_id: str) -> dict:
        return self._request("GET", f"/v1/snapshots/{_q(snapshot_id)}")

    def patch_snapshot(self, snapshot_id: str, title: str | None = None, description: str | None = None,
                       tags: list[str] | None = None) -> dict:
        body = {k: v for k, v in {"title": title, "description": description, "tags": tags}.items()
                if v is not None}
        return self._request("PATCH", f"/v1/snapshots/{_q(snapshot_id)}", json=body)

    def delete_snapshot(self, snapshot_id: str) -> dict:
        return self._request("DELETE", f"/v1/snapshots/{_q(snapshot_id)}")

    def load_snapshot(self, snapshot_id: str, session_id: str | None = None, force: bool = False,
                      max_seq_len: int | None = None) -> dict:
        """Load into a new session (or ``session_id``; an existing one needs ``force``)."""
        body: dict[str, Any] = {"force": force}
        if session_id:
            body["session_id"] = session_id
        if max_seq_len:
            body["max_seq_len"] = max_seq_len
        return self._request("POST", f"/v1/snapshots/{_q(snapshot_id)}/load", json=body)

    def export_snapshot(self, snapshot_id: str, path: str | Path,
                        on_bytes: Callable[[int, int | None], None] | None = None) -> Path:
        """Download the snapshot as one file (written atomically). ``on_bytes(done, total)``
        after every block (``total`` from Content-Length, None when the server sends none)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        try:
            with self._http.stream("GET", f"/v1/snapshots/{_q(snapshot_id)}/export") as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                with open(tmp, "wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                        if on_bytes is not None:
                            on_bytes(out.tell(), total)
        except httpx.TransportError as exc:
            tmp.unlink(missing_ok=True)
            raise self._unreachable(exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        return path

    def import_snapshot(self, path: str | Path, snapshot_id: str | None = None, replace: bool = False,
                        on_bytes: Callable[[int, int | None], None] | None = None) -> dict:
        """Upload a file made by ``export_snapshot``; returns the new snapshot's info.
        ``snapshot_id`` renames it; ``replace`` overwrites an existing snapshot of that id.
        ``on_bytes(done, total)`` after every block sent."""
        path = Path(path)
        if not path.is_file():
            raise InvalidRequest(f"no such file: {path}")
        total = path.stat().st_size

        def chunks():
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    yield block
                    if on_bytes is not None:
                        on_bytes(f.tell(), total)

        params: dict[str, Any] = {}
        if snapshot_id:
            params["snapshot_id"] = snapshot_id
        if replace:
            params["replace"] = "true"
        return self._request("POST", "/v1/snapshots/import", content=chunks(), params=params,
                             headers={"Content-Type": "application/octet-stream"})

    def list_all(self) -> dict:
        """Sessions and snapshots together (what ``spl ls`` shows)."""
        return {"sessions": self.list_sessions(), "snapshots": self.list_snapshots()}


def _q(part: str) -> str:
    from urllib.parse import quote

    return quote(str(part), safe="")


def _parse_sse(response: httpx.Response) -> Iterator[StreamEvent]:
    """OpenAI chat.completion.chunk SSE -> StreamEvents (tool-call deltas are assembled)."""
    session_id: str | None = None
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict] = {}
    finish_reason = None
    usage = timings = None
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk and isinstance(chunk["error"], dict):
            err = chunk["error"]
            cls = {
                "context_length_exceeded": TooLarge, "server_busy": Busy, "not_found": NotFound,
                "conflict": Conflict,
            }.get(err.get("code") or "", InvalidRequest if err.get("type") == "invalid_request_error"
                  else _ServerBug)
            raise cls(err.get("message") or "generation failed", param=err.get("param"), code=err.get("code"))
        session_id = chunk.get("session_id", session_id)
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("timings"):
            timings = chunk["timings"]
        if isinstance(chunk.get("prompt_progress"), dict):
            yield StreamEvent("progress", progress=chunk["prompt_progress"], session_id=session_id)
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                reasoning.append(delta["reasoning_content"])
                yield StreamEvent("reasoning", text=delta["reasoning_content"], session_id=session_id)
            if delta.get("content"):
                content.append(delta["content"])
                yield StreamEvent("text", text=delta["content"], session_id=session_id)
            for tc in delta.get("tool_calls") or []:
                slot = calls.setdefault(tc.get("index", 0), {"id": None, "type": "function",
                                                             "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
    tool_calls = [calls[i] for i in sorted(calls)]
    if tool_calls:
        yield StreamEvent("tool_calls", tool_calls=tool_calls, session_id=session_id)
    message = {"role": "assistant", "content": "".join(content)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if tool_calls:
        message["tool_calls"] = tool_calls
    yield StreamEvent("done", finish_reason=finish_reason, usage=usage or {}, timings=timings or {},
                      message=message, session_id=session_id)


def collect(events: Iterator[StreamEvent]) -> ChatResult:
    """Run a stream to its end and return it as a ``ChatResult``."""
    text, reasoning, calls = [], [], []
    last: StreamEvent | None = None
    for ev in events:
        if ev.type == "text":
            text.append(ev.text)
        elif ev.type == "reasoning":
            reasoning.append(ev.text)
        elif ev.type == "tool_calls":
            calls = ev.tool_calls or []
        elif ev.type == "done":
            last = ev
    return ChatResult(content="".join(text), reasoning="".join(reasoning), tool_calls=calls,
                      finish_reason=last.finish_reason if last else None,
                      usage=(last.usage if last else None) or {}, timings=(last.timings if last else None) or {},
                      session_id=last.session_id if last else None)
