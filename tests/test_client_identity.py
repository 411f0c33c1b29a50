"""A pid is not a process: a stale `server.json` whose pid now belongs to an unrelated process
(a real `sleep`) is recognised as stale, so `spl server stop` leaves that process alone, and a
port held by someone else is never taken for ours. No model is loaded here."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from cli_helpers import SPL, isolated_env, one_error_line, run_spl

from superlinear import process


def write_record(env: dict, record: dict) -> None:
    from pathlib import Path

    state = Path(env["SPL_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    (state / "server.json").write_text(json.dumps(record))


def spl_serve_cmdline(port: int) -> list[str]:
    return [*SPL, "serve", "--model", "default", "--host", "127.0.0.1", "--port", str(port)]


def test_identity_matches_only_the_same_process(sleeper):
    ident = process.identity(sleeper.pid)
    assert ident["cmdline"] == ["sleep", "600"]
    assert process.matches(ident)
    assert not process.matches(dict(ident, create_time=ident["create_time"] - 3600))  # pid reused
    # recorded by a process that read the boot time before the clock was stepped by an hour
    assert process.matches(dict(ident, create_time=ident["create_time"] + 3600, boot_time=ident["boot_time"] + 3600))
    assert process.matches({k: v for k, v in ident.items() if k != "boot_time"})  # an older spl's record
    assert not process.matches(dict(ident, cmdline=spl_serve_cmdline(8787)))
    assert not process.matches({"pid": sleeper.pid})  # no start time: never trusted
    # terminate() refuses a record of another process with that pid, and the process lives on.
    assert process.terminate(dict(ident, create_time=ident["create_time"] - 3600), grace=1.0)
    assert sleeper.poll() is None
    assert process.terminate(ident, grace=5.0) is True
    assert sleeper.wait(5) is not None
    assert not process.matches(ident)


def test_a_zombie_is_not_running():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = process.identity(proc.pid) or {"pid": proc.pid, "create_time": 0, "cmdline": []}
    deadline = time.monotonic() + 10
    while process.cmdline(proc.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # exited but not reaped: a zombie
    assert not process.matches(ident)
    proc.wait()


@pytest.mark.parametrize("record_kind", ["identity of a dead server", "old pid-only file"])
def test_stop_leaves_an_unrelated_process_alone(tmp_path, sleeper, record_kind):
    env = isolated_env(tmp_path)
    record = {"pid": sleeper.pid, "url": "http://127.0.0.1:9", "started_at": time.time() - 60}
    if record_kind == "identity of a dead server":
        # What `spl server start` wrote for a server that died; the system then gave its pid to `sleep`.
        ident = process.identity(sleeper.pid)
        record["process"] = {"pid": sleeper.pid, "create_time": ident["create_time"] - 60,
                             "cmdline": spl_serve_cmdline(9)}
    write_record(env, record)

    stopped = run_spl(env, "server", "stop")
    line = one_error_line(stopped)
    assert "no local spl server is running" in line and str(sleeper.pid) in line
    assert sleeper.poll() is None, "spl server stop signalled an unrelated process"
    assert not (tmp_path / "state" / "server.json").exists()  # the stale record is gone
    status = json.loads(run_spl(env, "server", "status", "--json").stdout)
    assert status["local"] is None and status["source"] == "configured"
    assert sleeper.poll() is None


def test_a_taken_port_is_refused_when_chosen_and_replaced_when_not():
    from superlinear.client.local import _choose_port, port_taken
    from superlinear.errors import Conflict
    from superlinear.settings.options import ServeOptions

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert port_taken("127.0.0.1", port)
        options = ServeOptions(port=port)
        with pytest.raises(Conflict, match=f"port {port} is taken by another program"):
            _choose_port(options, port_chosen=True)
        other = _choose_port(options, port_chosen=False)
        assert other.port != port and not port_taken("127.0.0.1", other.port)
    assert not port_taken("127.0.0.1", port)


def test_no_server_of_ours_is_one_clear_line(tmp_path):
    """With nothing recorded, an admin command does not talk to whatever the port holds."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # a program that is not spl
        env = isolated_env(tmp_path, SPL_PORT=str(listener.getsockname()[1]))
        line = one_error_line(run_spl(env, "ls"))
    assert "no spl server of yours is running" in line and "another program" in line
    with socket.create_server(("127.0.0.1", 0)) as s:
        unused = s.getsockname()[1]
    line = one_error_line(run_spl(isolated_env(tmp_path, SPL_PORT=str(unused)), "session", "ls"))
    assert "no spl server of yours is running" in line and "spl server start" in line


@pytest.fixture
def other_spl_serve():
    """A live process that looks like someone's `spl serve` (its command line), with no /health."""
    proc = subprocess.Popen(["bash", "-c", f'exec -a /opt/other/bin/spl {sys.executable} -c '
                                           '"import time; time.sleep(600)" serve --port 9'])
    deadline = time.monotonic() + 10
    while "serve" not in (process.cmdline(proc.pid) or []) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield proc
    proc.kill()
    proc.wait()


def test_an_old_pid_only_record_never_stops_an_unconfirmed_spl_serve(tmp_path, other_spl_serve):
    env = isolated_env(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as s:
        unused = s.getsockname()[1]
    write_record(env, {"pid": other_spl_serve.pid, "url": f"http://127.0.0.1:{unused}"})
    line = one_error_line(run_spl(env, "server", "stop"))
    assert "no local spl server is running" in line and str(other_spl_serve.pid) in line
    assert other_spl_serve.poll() is None, "spl server stop signalled a server it could not confirm"


@pytest.mark.parametrize("pid", ["abc", None, -4, 1.5, True])
def test_a_damaged_record_is_one_clear_line(tmp_path, pid):
    env = isolated_env(tmp_path)
    write_record(env, {"pid": pid, "url": "http://127.0.0.1:9"})
    for command in (("server", "stop"), ("server", "status")):
        line = one_error_line(run_spl(env, *command))
        assert "server.json is damaged" in line and "remove the file" in line, line
