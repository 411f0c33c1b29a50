"""The server options shared by ``spl serve`` and ``spl server start``.

Each option resolves as flag > environment variable > config file > built-in default
(``config.py``); the flags themselves default to None, meaning "not given".
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, fields
from typing import Any

import click

from superlinear.errors import InvalidRequest

from .config import DEFAULT_HOST, DEFAULT_PORT, LOG_LEVELS, PERSIST_MODES, parse_bytes, resolve

__all__ = ["ServeOptions", "parse_bytes", "resolve_options", "server_options"]


@dataclass(frozen=True)
class ServeOptions:
    model: str = "default"
    served_model_name: str | None = None  # the name /v1/models reports (None: the model's own)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    chunk_size: int | None = None
    max_step_tokens: int | None = None  # prefill tokens per scheduler step (None: the device's default)
    max_seq_len: int | None = None
    api_key: str | None = None
    max_concurrency: int = 16
    memory_budget: int | None = None  # bytes
    device: str | None = None
    threads: int | None = None  # CPU threads of torch (None: threads.default_threads())
    # "turn": journal each session after every turn and change (a crash loses at most the turn in
    # flight); "shutdown": only on clean shutdown and eviction (no per-turn disk writes).
    persist: str = "turn"
    log_level: str = "info"
    # unknown request fields are ignored (and logged) instead of refused with a 400
    lenient_fields: bool = False

    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def to_args(self) -> list[str]:
        """``spl serve`` arguments for these options (the API key travels in the environment)."""
        args = ["--model", self.model, "--host", self.host, "--port", str(self.port),
                "--max-concurrency", str(self.max_concurrency), "--persist", self.persist,
                "--log-level", self.log_level]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if self.chunk_size:
            args += ["--chunk-size", str(self.chunk_size)]
        if self.max_step_tokens:
            args += ["--max-step-tokens", str(self.max_step_tokens)]
        if self.max_seq_len:
            args += ["--max-seq-len", str(self.max_seq_len)]
        if self.memory_budget:
            args += ["--memory-budget", str(self.memory_budget)]
        if self.device:
            args += ["--device", self.device]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if self.lenient_fields:
            args += ["--lenient-fields"]
        return args

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("api_key")
        return d


def resolve_options(**flags: Any) -> tuple[ServeOptions, dict[str, str]]:
    """``ServeOptions`` from the given flags (None: not given), the environment, the config
    file and the defaults, with the source of each field."""
    values, sources = resolve(flags)
    return ServeOptions(**values), sources


class _Bytes(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return parse_bytes(value)
        except InvalidRequest as exc:
            self.fail(exc.message, param, ctx)


def _help(text: str, env: str, default: Any = None) -> str:
    shown = f"default {default}; " if default is not None else ""
    return f"{text} [{shown}${env}, or [server] in the config file]"


def server_options(func):
    """Decorate a click command with the server options; it receives ``options: ServeOptions``
    (and ``option_sources``, where each option came from, if it takes that argument).

    The names vLLM (``vllm serve MODEL --max-model-len N --served-model-name X``) and llama.cpp
    (``llama-server -m MODEL -c N``) give the same settings are accepted as they are, so a
    command line written for either starts spl (docs/server.md lists them)."""
    decorators = [
        click.argument("model_arg", metavar="[MODEL]", required=False, default=None),
        click.option("-m", "--model", default=None,
                     help=_help("Model to serve (name, path or hub id; `spl models list`); the same as the "
                                "MODEL argument.", "SPL_MODEL", "default")),
        click.option("--served-model-name", default=None,
                     help=_help("The model's name in /v1/models and in requests (vLLM's flag; the model's own "
                                "name and `default` are accepted too).", "SPL_SERVED_MODEL_NAME")),
        click.option("--host", default=None,
                     help=_help("Interface to bind (0.0.0.0 exposes the server on the network).", "SPL_HOST",
                                DEFAULT_HOST)),
        click.option("--port", type=click.IntRange(0, 65535), default=None,
                     help=_help("Port to listen on.", "SPL_PORT", DEFAULT_PORT)),
        click.option("--chunk-size", type=click.IntRange(1), default=None,
                     help=_help("Prefill chunk size in tokens (the model's default if unset).", "SPL_CHUNK_SIZE")),
        click.option("--max-step-tokens", type=click.IntRange(1), default=None,
                     help=_help("Prompt tokens prefilled per scheduler step, shared by the waiting prompts: "
                                "running streams wait at most one such step per token (if unset: 256 on CPU, "
                                "4096 on CUDA).", "SPL_MAX_STEP_TOKENS")),
        click.option("--max-seq-len", "--max-model-len", "--ctx-size", "-c", "max_seq_len", type=click.IntRange(1),
                     default=None,
                     help=_help("Context length of new sessions and of requests without one, reported as "
                                "max_model_len in /v1/models (vLLM: --max-model-len; llama.cpp: --ctx-size, -c).",
                                "SPL_MAX_SEQ_LEN")),
        click.option("--api-key", default=None,
                     help=_help("Require `Authorization: Bearer KEY` on every /v1 route.", "SPL_API_KEY")),
        click.option("--max-concurrency", type=click.IntRange(1), default=None,
                     help=_help("Generations that may wait in the queue; more get HTTP 429.",
                                "SPL_MAX_CONCURRENCY", 16)),
        click.option("--memory-budget", type=_Bytes(), default=None,
                     help=_help("Memory all sessions may hold, e.g. 8GB (if unset: half the free RAM, 80% of "
                                 "the free GPU memory).", "SPL_MEMORY_BUDGET")),
        click.option("--device", default=None, help=_help("cpu, cuda, cuda:1 ... (auto if unset).", "SPL_DEVICE")),
        click.option("--threads", type=click.IntRange(1, 1024), default=None,
                     help=_help("CPU threads for the model (if unset: the physical cores, at most 8; 1 on a "
                                "machine of 2 cores or fewer).", "SPL_THREADS")),
        click.option("--persist", type=click.Choice(PERSIST_MODES), default=None,
                     help=_help("When sessions reach disk: after every turn (a crash loses at most the turn in "
                                "flight; each persist writes only the new tokens' KV) or only on clean shutdown.",
                                "SPL_PERSIST", "turn")),
        click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
                     help=_help("Server log level.", "SPL_LOG_LEVEL", "info")),
        click.option("--lenient-fields", is_flag=True, default=None,
                     help=_help("Ignore (and log) unknown request fields instead of answering 400.",
                                "SPL_LENIENT_FIELDS", "off")),
    ]

    wants_sources = "option_sources" in inspect.signature(func).parameters
    setting_names = [f.name for f in fields(ServeOptions)]

    def wrapper(model_arg, **kwargs):
        flags = {name: kwargs.pop(name) for name in setting_names}
        if model_arg is not None:
            if flags["model"] is not None and flags["model"] != model_arg:
                raise click.UsageError(f"two models given: MODEL {model_arg!r} and --model {flags['model']!r}")
            flags["model"] = model_arg
        flags["api_key"] = flags["api_key"] or None
        flags["log_level"] = flags["log_level"].lower() if flags["log_level"] else None
        options, sources = resolve_options(**flags)
        if wants_sources:
            kwargs["option_sources"] = sources
        return func(options=options, **kwargs)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    for decorator in reversed(decorators):
        wrapper = decorator(wrapper)
    return wrapper
