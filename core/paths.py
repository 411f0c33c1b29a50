"""Where spl keeps its files. Every location can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/spl`` (default ``~/.cache/spl``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spl"


def models_dir() -> Path:
    return cache_dir() / "models"


def snapshots_dir() -> Path:
    """``$SPL_SNAPSHOT_DIR`` or ``$XDG_CACHE_HOME/spl/snapshots`` (``$SUPERLINEAR_SNAPSHOT_DIR``,
    its old name, is still read)."""
    override = os.environ.get("SPL_SNAPSHOT_DIR") or os.environ.get("SUPERLINEAR_SNAPSHOT_DIR")
    return Path(override) if override else cache_dir() / "snapshots"


def state_dir() -> Path:
    """Server pid/log files, the connected server URL, REPL history: ``$SPL_STATE_DIR``
    or ``$XDG_STATE_HOME/spl`` (default ``~/.local/state/spl``)."""
    override = os.environ.get("SPL_STATE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "spl"


def workspaces_dir() -> Path:
    """RAG workspaces (chunks, bm25 index, file hashes)."""
    return cache_dir() / "workspaces"


def config_file() -> Path:
    """The config file (TOML): ``$SPL_CONFIG`` or ``$XDG_CONFIG_HOME/spl/config.toml``
    (default ``~/.config/spl/config.toml``)."""
    override = os.environ.get("SPL_CONFIG")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "spl" / "config.toml"
