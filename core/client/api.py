"""``SplClient``: the API over HTTP (``superlinear.api.remote.RemoteApi``) for the server the
spl commands talk to, plus what only a client of a server does: find that server
(``resolve_target``), ask its ``/health`` and its models.

Its chat yields the core events (``superlinear.api.events``) ``LocalApi`` yields; errors come
back as ``superlinear.errors`` classes, an unreachable server as ``Unavailable`` with what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx

from superlinear.api.remote import RemoteApi, server_root
from superlinear.errors import Unavailable, UserError
from superlinear.settings.config import DEFAULT_HOST, DEFAULT_PORT

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


@dataclass(frozen=True)
class Target:
    """The server a command talks to, and why that one (``source``)."""

    url: str
    source: str  # "argument" | "$SPL_SERVER_URL" | "$OPENAI_BASE_URL" | "connect" | "local" | "configured"

    @property
    def chosen(self) -> bool:
        """The user named this server (argument, environment, `spl server connect`): use it as it is."""
        return self.source not in ("local", "configured")


def resolve_target(url: str | None = None) -> Target:
    """Explicit ``url`` > ``$SPL_SERVER_URL`` > ``spl server connect`` > ``$OPENAI_BASE_URL``
    (what OpenAI clients read) > the local server recorded in the state dir (checked to be alive
    and the same process) > the configured host and port (``$SPL_HOST``/``$SPL_PORT``, the
    config file, 127.0.0.1:8787), where no server of ours runs: whatever answers there is
    someone else's. Each URL may end in ``/v1`` or not."""
    if url:
        return Target(server_root(url), "argument")
    if os.environ.get("SPL_SERVER_URL"):
        return Target(server_root(os.environ["SPL_SERVER_URL"]), "$SPL_SERVER_URL")
    from superlinear.client import state
    from superlinear.client.state import running_local
    from superlinear.settings.options import resolve_options

    connected = state.connected()
    if connected and connected.get("url"):
        return Target(server_root(connected["url"]), "connect")
    if os.environ.get("OPENAI_BASE_URL"):
        return Target(server_root(os.environ["OPENAI_BASE_URL"]), "$OPENAI_BASE_URL")
    local = running_local()
    if local and local.get("url"):
        return Target(local["url"].rstrip("/"), "local")
    options, _ = resolve_options()
    return Target(options.url(), "configured")


def resolve_url(url: str | None = None) -> str:
    return resolve_target(url).url


def resolve_api_key(api_key: str | None = None, target: Target | None = None) -> str | None:
    """Explicit > ``$SPL_API_KEY`` > ``$OPENAI_API_KEY`` when the server came from
    ``$OPENAI_BASE_URL`` > the one stored by ``spl server connect`` > the local server's >
    ``$OPENAI_API_KEY``."""
    if api_key:
        return api_key
    if os.environ.get("SPL_API_KEY"):
        return os.environ["SPL_API_KEY"]
    openai_key = os.environ.get("OPENAI_API_KEY") or None
    if openai_key and target is not None and target.source == "$OPENAI_BASE_URL":
        return openai_key
    from superlinear.client import state
    from superlinear.client.state import running_local

    connected = state.connected()
    if connected and connected.get("api_key"):
        return connected["api_key"]
    local = running_local()
    if local and local.get("api_key"):
        return local["api_key"]
    return openai_key


class SplClient(RemoteApi):
    """The API against the server ``resolve_target`` picks (or ``base_url``).

    >>> from superlinear.api import chat_turn
    >>> c = SplClient()                      # resolve_target(): env, `spl server connect`, local
    >>> for event in c.chat(chat_turn([{"role": "user", "content": "hi"}], session_id="s1")):
    ...     print(event)
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | None = 600.0, connect_timeout: float = 5.0):
        self.target = resolve_target(base_url)
        super().__init__(self.target.url, resolve_api_key(api_key, self.target), timeout=timeout,
                         connect_timeout=connect_timeout)

    def unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(
            f"cannot reach the spl server at {self.base_url} ({type(exc).__name__}); "
            "start one with `spl server start` or point to one with `spl server connect URL`"
        )

    # -- health and models ---------------------------------------------------------------
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
