"""Run the real `spl` CLI in a subprocess with its own state, snapshot and config locations."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SPL = [sys.executable, "-m", "superlinear.cli.main"]
# The footer `spl chat` prints under each reply (stderr with --once).
CHAT_FOOTER = re.compile(r"\[\d+ → \d+ tokens · prefill \S+ tok/s · decode \S+ tok/s · \d+ reused · [\d.]+ s[^\]]*\]")
# Variables that would point the CLI at a server, a config or settings of the developer's shell.
_CLEARED = ("SPL_SERVER_URL", "SPL_API_KEY", "SPL_CONFIG", "SPL_HOST", "SPL_PORT", "SPL_MODEL",
            "SPL_MAX_CONCURRENCY", "SPL_MEMORY_BUDGET", "SPL_MAX_SEQ_LEN", "SPL_CHUNK_SIZE", "SPL_DEVICE",
            "SPL_PERSIST", "SPL_LOG_LEVEL", "SPL_SERVE_DETACHED", "_SPL_COMPLETE")


def isolated_env(root: Path, **extra: str) -> dict:
    """An environment whose state dir, snapshot dir and config dir live under ``root`` (the
    converted default model in XDG_CACHE_HOME is shared)."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(SPL_STATE_DIR=str(root / "state"), SPL_SNAPSHOT_DIR=str(root / "snapshots"),
               XDG_CONFIG_HOME=str(root / "config"), PYTHONUNBUFFERED="1", NO_COLOR="1")
    env.update(extra)
    return env


def run_spl(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SPL, *args], capture_output=True, text=True, env=env, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `spl: error: …` line a user error prints (asserts there is exactly one)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("spl: error: "), result.stderr
    return lines[0]
