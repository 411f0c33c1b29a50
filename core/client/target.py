"""Which server the spl commands talk to (``resolve_target``) and with which API key
(``resolve_api_key``): what ``superlinear.connect()`` reads when it is given no URL."""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    from superlinear.api.remote import server_root

    if url:
        return Target(server_root(url), "argument")
    if os.environ.get("SPL_SERVER_URL"):
        return Target(server_root(os.environ["SPL_SERVER_URL"]), "$SPL_SERVER_URL")
    from superlinear.server_process.files import connected, running_local
    from superlinear.settings.options import resolve_options

    remembered = connected()
    if remembered and remembered.get("url"):
        return Target(server_root(remembered["url"]), "connect")
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
    from superlinear.server_process.files import connected, running_local

    remembered = connected()
    if remembered and remembered.get("api_key"):
        return remembered["api_key"]
    local = running_local()
    if local and local.get("api_key"):
        return local["api_key"]
    return openai_key
