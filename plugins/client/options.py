"""The server options shared by ``spl serve`` and ``spl server start``."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import click

from superlinear.errors import InvalidRequest

from .api import DEFAULT_HOST, DEFAULT_PORT


@dataclass(frozen=True)
class ServeOptions:
    model: str = "default"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    chunk_size: int | None = None
    max_seq_len: int | None = None
    api_key: str | None = None
    max_concurrency: int = 16
    memory_budget: int | None = None  # bytes
    device: str | None = None
    # "turn": journal each session after every turn and change (a crash loses at most the turn
    # in flight); "shutdown": only on clean shutdown and eviction (no per-turn disk writes).
    persist: str = "turn"

    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def to_args(self) -> list[str]:
        """``spl serve`` arguments for these options (the API key travels in the environment)."""
        args = ["--model", self.model, "--host", self.host, "--port", str(self.port),
                "--max-concurrency", str(self.max_concurrency)]
        if self.chunk_size:
            args += ["--chunk-size", str(self.chunk_size)]
        if self.max_seq_len:
            args += ["--max-seq-len", str(self.max_seq_len)]
        if self.memory_budget:
            args += ["--memory-budget", str(self.memory_budget)]
        if self.device:
            args += ["--device", self.device]
        if self.persist != "turn":
            args += ["--persist", self.persist]
        return args

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("api_key")
        return d


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}


def parse_bytes(text: str | int | None) -> int | None:
    """``"8GB"``, ``"512m"``, ``"1.5GiB"``, ``"1000000"`` -> bytes."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidRequest(f"not a size: {text!r} (examples: 8GB, 512MB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class _Bytes(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return parse_bytes(value)
        except InvalidRequest as exc:
            self.fail(exc.message, param, ctx)


def server_options(func):
    """Decorate a click command with the server options; it receives ``options: ServeOptions``."""
    decorators = [
        click.option("--model", default="default", show_default=True,
                     help="Model to serve (name, path or hub id; `spl models list`)."),
        click.option("--host", default=DEFAULT_HOST, show_default=True,
                     help="Interface to bind (0.0.0.0 exposes the server on the network)."),
        click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True),
        click.option("--chunk-size", type=click.IntRange(1), default=None,
                     help="Prefill chunk size in tokens (the model's default if unset)."),
        click.option("--max-seq-len", type=click.IntRange(1), default=None,
                     help="Default max_seq_len of new sessions."),
        click.option("--api-key", envvar="SPL_API_KEY", default=None,
                     help="Require `Authorization: Bearer KEY` on every /v1 route (or $SPL_API_KEY)."),
        click.option("--max-concurrency", type=click.IntRange(1), default=16, show_default=True,
                     help="Generations that may wait in the queue; more get HTTP 429."),
        click.option("--memory-budget", type=_Bytes(), default=None,
                     help="Memory all sessions may hold, e.g. 8GB (default: half the free RAM, 80% of free "
                          "GPU memory)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (auto if unset)."),
        click.option("--persist", type=click.Choice(["turn", "shutdown"]), default="turn", show_default=True,
                     help="When sessions reach disk: after every turn (a crash loses at most the turn in "
                          "flight; each persist writes only the new tokens' KV) or only on clean shutdown."),
    ]

    def wrapper(model, host, port, chunk_size, max_seq_len, api_key, max_concurrency, memory_budget,
                device, persist, **kwargs):
        options = ServeOptions(model=model, host=host, port=port, chunk_size=chunk_size,
                               max_seq_len=max_seq_len, api_key=api_key or None,
                               max_concurrency=max_concurrency, memory_budget=memory_budget, device=device,
                               persist=persist)
        return func(options=options, **kwargs)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    for decorator in reversed(decorators):
        wrapper = decorator(wrapper)
    return wrapper
