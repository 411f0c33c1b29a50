"""Which server the commands use, with real processes and real servers (default model):

- a stale `server.json` naming an unrelated live process (`sleep`): `spl chat --once` starts a
  server of ours instead of waiting forever, answers (the README's main job), and nothing ever
  signals the `sleep`;
- the auto-started server's port comes from `$SPL_PORT` and is remembered for later commands;
  a `--model` or `--port` the running server does not match is refused (one line, exit 2);
- "another user's" server (its own state dir) on the configured port is never reported or used
  as ours, and `spl server stop` does not touch it;
- a foreground `spl serve` takes its port from the config file and the client finds it there.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
import pytest
from cli_helpers import CHAT_FOOTER, SPL, isolated_env, one_error_line, run_spl
from server_helpers import shared_server

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def ask(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_spl(env, "chat", "--temp", "0", "--max-tokens", "2", "--once", "Hi", *args, timeout=timeout)


def test_stale_record_chosen_port_remembered_and_model_checked(tmp_path, sleeper):
    env = isolated_env(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    # A server.json left by a server that died; its pid now belongs to `sleep`.
    (state / "server.json").write_text(json.dumps({"pid": sleeper.pid, "url": f"http://127.0.0.1:{free_port()}",
                                                   "started_at": time.time() - 3600}))
    port = free_port()
    try:
        # the README's main job; it used to wait for the `sleep` to answer, forever
        first = run_spl(dict(env, SPL_PORT=str(port)), "chat", "--temp", "0", "--max-tokens", "24", "--once",
                        "What is the capital of France?", timeout=300)
        assert first.returncode == 0, first.stderr
        assert "Paris" in first.stdout and CHAT_FOOTER.search(first.stderr), (first.stdout, first.stderr)
        assert sleeper.poll() is None
        record = json.loads((state / "server.json").read_text())
        assert record["url"] == f"http://127.0.0.1:{port}" and record["pid"] != sleeper.pid
        # the first run says where the server is and how to chat and stop it
        assert (f"server started at {record['url']} (pid {record['pid']})" in first.stderr
                and "`spl chat`" in first.stderr and "`spl server stop`" in first.stderr), first.stderr

        # Remembered: later commands without $SPL_PORT talk to that server.
        status = json.loads(run_spl(env, "server", "status", "--json").stdout)
        assert status["up"] and status["source"] == "local" and status["url"].endswith(f":{port}")
        assert status["health"]["pid"] == record["pid"] == status["local"]["pid"]
        # ...and `spl server config` says that port, not the default the settings would give.
        config = json.loads(run_spl(env, "server", "config", "--json").stdout)
        port_setting = config["settings"]["port"]
        assert (port_setting["value"], port_setting["source"]) == (port, "running"), config
        assert config["running"]["pid"] == record["pid"] and config["url"] == record["url"]

        line = one_error_line(ask(env, "--model", "nope"))
        assert "serves model 'default', not 'nope'" in line
        assert ask(env, "--model", "default").returncode == 0
        line = one_error_line(ask(env, "--port", str(free_port())))
        assert f"runs at http://127.0.0.1:{port}" in line
    finally:
        stopped = run_spl(env, "server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert sleeper.poll() is None


def test_another_users_server_is_not_ours(tmp_path):
    other = shared_server()  # runs with its own state dir: to us it is another user's server
    port = other.url.rsplit(":", 1)[1]
    with other.http() as http:
        assert http.post("/v1/sessions", json={"session_id": "not-yours"}).status_code in (201, 409)
    env = isolated_env(tmp_path, SPL_PORT=port)

    status = run_spl(env, "server", "status")
    assert status.returncode == 1 and not status.stdout.startswith("up:"), status.stdout
    assert "not started by you" in status.stdout and f"pid {other.proc.pid}" in status.stdout
    data = json.loads(run_spl(env, "server", "status", "--json").stdout)
    assert data["up"] is False and data["local"] is None and data["health"] is None
    assert data["other"]["pid"] == other.proc.pid

    line = one_error_line(run_spl(env, "ls"))
    assert f"answers at http://127.0.0.1:{port}, not started by you" in line
    line = one_error_line(ask(env))
    assert f"port {port} is taken by another spl server (pid {other.proc.pid}" in line
    assert one_error_line(run_spl(env, "server", "stop"))
    completion = subprocess.run(SPL, capture_output=True, text=True, timeout=30,
                                env=dict(env, _SPL_COMPLETE="bash_complete", COMP_WORDS="spl session info ",
                                         COMP_CWORD="3"))
    assert "not-yours" not in completion.stdout and completion.stderr == ""
    assert other.proc.poll() is None
    assert httpx.get(other.url + "/health", timeout=5).json()["status"] == "ok"


def test_foreground_serve_takes_the_config_port_and_the_client_finds_it(tmp_path):
    port = free_port()
    config = tmp_path / "config" / "spl" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[server]\nport = {port}\nmax_seq_len = 1024\nlog_level = "warning"\n')
    env = isolated_env(tmp_path)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*SPL, "serve"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()
            status = json.loads(run_spl(env, "server", "status", "--json").stdout)
            if status["up"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status["up"] and status["url"] == f"http://127.0.0.1:{port}", status
        assert status["local"]["foreground"] and status["health"]["pid"] == proc.pid
        created = run_spl(env, "session", "new", "fg", "--json")
        assert created.returncode == 0 and json.loads(created.stdout)["max_seq_len"] == 1024, created.stderr
        stopped = run_spl(env, "server", "stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
        assert proc.wait(60) in (0, -15)
        assert "killed" not in stopped.stdout  # it stopped within the grace time, sessions saved
        assert not (tmp_path / "state" / "server.json").exists()
        assert "INFO" not in log.read_text()  # log_level from the config file
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_one_time_conversion_shows_its_steps(tmp_path):
    """A fresh cache: `spl server start` converts the default model (from the installed GGUF, no
    download) and shows which step of the conversion runs, as /health reports it."""
    env = isolated_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache"), SPL_PORT=str(free_port()))
    try:
        started = run_spl(env, "server", "start", timeout=600)
        assert started.returncode == 0, started.stderr
        lines = [line for line in started.stderr.splitlines() if "converting the default model" in line]
        assert any("step 2/4: de-quantizing the GGUF weights" in line for line in lines), started.stderr
        assert all(line.startswith("spl: [") for line in lines), lines  # with its bar
        assert (tmp_path / "cache" / "spl" / "models" / "default" / "spl.json").is_file()
    finally:
        run_spl(env, "server", "stop", timeout=120)
