"""The server the chat REPL talks to."""

from __future__ import annotations


def connect(url: str | None = None, model: str | None = None, progress=None, port: int | None = None):
    """A client for the server the REPL talks to: ``url`` if given (it must answer), else the
    configured server, else a local one started now (``ensure_server``, with a progress line).
    A ``model`` or ``port`` that the running server does not match is refused (exit 2)."""
    from superlinear.client import ensure_server
    from superlinear.client.local import stderr_progress

    url = url if not url or "://" in url else f"http://{url}"
    return ensure_server(model=model, progress=progress or stderr_progress, url=url, port=port)
