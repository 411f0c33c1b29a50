"""`spl server start` -> `status` -> a chat through the CLI -> `stop` -> `start` again: the
session is still there. Temporary state and snapshot dirs; the model cache is shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from server_helpers import free_port

pytestmark = pytest.mark.slow


def test_start_status_chat_stop_start(tmp_path):
    env = dict(os.environ)
    for var in ("SPL_SERVER_URL", "SPL_API_KEY"):
        env.pop(var, None)
    env.update({"SPL_STATE_DIR": str(tmp_path / "state"), "SPL_SNAPSHOT_DIR": str(tmp_path / "snaps")})
    port = str(free_port())

    def spl(*args, timeout=300):
        return subprocess.run([sys.executable, "-m", "superlinear.cli.main", *args], capture_output=True,
                              text=True, env=env, timeout=timeout)

    started = spl("server", "start", "--port", port, "--max-seq-len", "1024")
    try:
        assert started.returncode == 0, started.stderr
        assert f"127.0.0.1:{port}" in started.stdout and "pid" in started.stdout
        assert "loading model" in started.stderr  # the progress line
        again = spl("server", "start", "--port", port)  # a friendly no-op that says where it runs
        assert again.returncode == 0 and "already running" in again.stdout and f":{port}" in again.stdout, again
        assert json.loads(spl("server", "start", "--json").stdout)["already_running"] is True
        other = spl("server", "start", "--port", str(free_port()))  # another port asked: stop first
        assert other.returncode == 2 and "`spl server stop` first" in other.stderr, other.stderr

        status = spl("server", "status")
        assert status.returncode == 0 and status.stdout.startswith("up:"), status.stdout + status.stderr

        chat = spl("chat", "--once", "Hello, my name is Bob.", "--session", "life", "--max-tokens", "3",
                   "--temp", "0")
        assert chat.returncode == 0, chat.stderr
        listing = spl("session", "ls")
        assert "life" in listing.stdout
        before = spl("session", "history", "life", "--json")
        assert before.returncode == 0 and "my name is Bob" in before.stdout
        last_used = json.loads(spl("session", "info", "life", "--json").stdout)["last_used"]

        stopped = spl("server", "stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
        down = json.loads(spl("server", "status", "--json").stdout)
        # The local server is gone (another server may still answer on the default port, e.g.
        # the one `make run` leaves running, so "down" is judged for this test's server only).
        assert down["local"] is None
        assert not (down["up"] and down["url"].endswith(f":{port}")), down

        restarted = spl("server", "start", "--port", port, "--max-seq-len", "1024")
        assert restarted.returncode == 0, restarted.stderr
        assert "1 session(s)" in restarted.stdout
        after = spl("session", "history", "life", "--json")
        assert after.returncode == 0 and after.stdout == before.stdout
        assert json.loads(spl("session", "info", "life", "--json").stdout)["last_used"] == last_used
        more = spl("chat", "--once", "What is my name?", "--session", "life", "--max-tokens", "3", "--temp", "0")
        assert more.returncode == 0, more.stderr
        info = spl("session", "info", "life", "--json")
        assert '"message_count": 4' in info.stdout, info.stdout
        logs = spl("server", "logs", "-n", "5")
        assert logs.returncode == 0 and logs.stdout.strip()
    finally:
        spl("server", "stop")
    assert spl("server", "stop").returncode == 2  # nothing left running
