"""Server settings: the config file (TOML) and how each setting is resolved.

A setting comes from, in this order: the command-line flag, the environment variable, the
``[server]`` table of the config file (``superlinear.paths.config_file()``: ``$SPL_CONFIG`` or
``$XDG_CONFIG_HOME/spl/config.toml``), the built-in default. ``spl serve``, ``spl server start``
and the client (which port a local server is started on and talked to) all resolve through
``resolve``, so they agree. A config file that cannot be read, or holds an unknown key or a
wrong value, is an ``InvalidRequest`` naming the file: one line and exit 2 in the CLI.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from superlinear.errors import InvalidRequest
from superlinear.paths import config_file

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787

PERSIST_MODES = ("turn", "shutdown")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}


def parse_bytes(text: str | int | None) -> int | None:
    """``"8GB"``, ``"512m"``, ``"1.5GiB"``, ``"1000000"`` -> bytes."""
    if text is None or text == "":
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidRequest(f"not a size: {text!r} (examples: 8GB, 512MB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# -- value parsers: take a string (environment) or a TOML value, raise ValueError(why) ----------
def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _int(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("must be an integer")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None else f"must be ≥ {low}")
        return value

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value.strip().lower()

    return parse


def _size(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("must be a size such as 8GB or a number of bytes")
    try:
        size = parse_bytes(value)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None
    if size is not None and size <= 0:
        raise ValueError("must be positive")
    return size


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ValueError("must be true or false")


def _key(value: Any) -> str | None:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value or None


@dataclass(frozen=True)
class Setting:
    name: str  # the ServeOptions field, the [server] key and (with dashes) the flag
    env: str
    default: Any
    parse: Callable[[Any], Any]


SETTINGS: tuple[Setting, ...] = (
    Setting("model", "SPL_MODEL", "default", _text),
    Setting("served_model_name", "SPL_SERVED_MODEL_NAME", None, _text),
    Setting("host", "SPL_HOST", DEFAULT_HOST, _text),
    Setting("port", "SPL_PORT", DEFAULT_PORT, _int(0, 65535)),
    Setting("api_key", "SPL_API_KEY", None, _key),
    Setting("max_concurrency", "SPL_MAX_CONCURRENCY", 16, _int(1)),
    Setting("memory_budget", "SPL_MEMORY_BUDGET", None, _size),
    Setting("max_seq_len", "SPL_MAX_SEQ_LEN", None, _int(1)),
    Setting("chunk_size", "SPL_CHUNK_SIZE", None, _int(1)),
    # None: the scheduler's default for the device (superlinear.engine.scheduler)
    Setting("max_step_tokens", "SPL_MAX_STEP_TOKENS", None, _int(1)),
    Setting("device", "SPL_DEVICE", None, _text),
    Setting("threads", "SPL_THREADS", None, _int(1, 1024)),  # None: threads.default_threads()
    Setting("persist", "SPL_PERSIST", "turn", _choice(PERSIST_MODES)),
    Setting("log_level", "SPL_LOG_LEVEL", "info", _choice(LOG_LEVELS)),
    Setting("lenient_fields", "SPL_LENIENT_FIELDS", False, _bool),
)
BY_NAME = {s.name: s for s in SETTINGS}


def config_path() -> Path:
    return config_file()


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The validated ``[server]`` table of the config file (``{}`` when there is no file)."""
    path = path or config_path()
    explicit = bool(os.environ.get("SPL_CONFIG"))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise InvalidRequest(f"config file {path} (from $SPL_CONFIG) does not exist") from None
        return {}
    except OSError as exc:
        raise InvalidRequest(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"config file {path} is not valid TOML: {exc}") from None
    unknown_tables = sorted(set(data) - {"server"})
    if unknown_tables:
        raise InvalidRequest(f"config file {path}: unknown table or key {unknown_tables[0]!r} "
                             "(spl reads only [server])")
    table = data.get("server", {})
    if not isinstance(table, dict):
        raise InvalidRequest(f"config file {path}: 'server' must be a table ([server])")
    out: dict[str, Any] = {}
    for key, value in table.items():
        setting = BY_NAME.get(key)
        if setting is None:
            raise InvalidRequest(f"config file {path}: unknown key {key!r} in [server] "
                                 f"(known: {', '.join(BY_NAME)})")
        try:
            out[key] = setting.parse(value)
        except ValueError as exc:
            raise InvalidRequest(f"config file {path}: [server] {key} {exc} (got {value!r})") from None
    return out


def resolve(flags: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Every server setting and where it came from: ``(values, sources)``, a source being
    ``"flag"``, ``"$SPL_…"``, ``"config"`` or ``"default"``. ``flags`` holds the command-line
    values that were given (None means not given)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = set(flags) - set(BY_NAME)
    if unknown:
        raise TypeError(f"not server settings: {sorted(unknown)}")
    from_file = read_config()  # read even when unused: a broken file is reported, not ignored
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        if setting.name in flags:
            values[setting.name], sources[setting.name] = flags[setting.name], "flag"
            continue
        env = os.environ.get(setting.env)
        if env is not None and env != "":
            try:
                values[setting.name] = setting.parse(env)
            except ValueError as exc:
                raise InvalidRequest(f"${setting.env} {exc} (got {env!r})") from None
            sources[setting.name] = f"${setting.env}"
            continue
        if setting.name in from_file:
            values[setting.name], sources[setting.name] = from_file[setting.name], "config"
        else:
            values[setting.name], sources[setting.name] = setting.default, "default"
    return values, sources
