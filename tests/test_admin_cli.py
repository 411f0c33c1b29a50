"""`spl ls`, `spl rm`, `spl session …`, `spl snapshot …` through the bus and the client, against
the shared test server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from server_helpers import user

pytestmark = pytest.mark.slow


@pytest.fixture
def spl(server, monkeypatch, capsys, tmp_path):
    from superlinear.cli.main import main

    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)

    def run(*args) -> tuple[int, str, str]:
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_admin_commands(spl, server, tmp_path):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"messages": [user("Hi there")], "session_id": "adm",
                                                    "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text

    code, out, _ = spl("session", "ls")
    assert code == 0 and "adm" in out and "SESSION" in out
    code, out, _ = spl("session", "info", "adm", "--json")
    assert code == 0 and json.loads(out)["message_count"] == 2
    code, out, _ = spl("session", "history", "adm")
    assert code == 0 and "[1] user: Hi there" in out and "[2] assistant:" in out
    code, out, _ = spl("session", "fork", "adm", "--as", "adm2")
    assert code == 0 and "adm2" in out
    code, out, _ = spl("session", "rollback", "adm2", "-1")
    assert code == 0 and "1 messages" in out
    code, out, _ = spl("session", "resize", "adm2", "1024")
    assert code == 0 and "max_seq_len 1024" in out
    code, out, _ = spl("session", "resize", "adm2", "--max-seq-len", "1280")  # the form error messages show
    assert code == 0 and "max_seq_len 1280" in out
    code, out, _ = spl("session", "new", "adm3", "--max-seq-len", "256")
    assert code == 0 and "adm3" in out

    code, out, _ = spl("snapshot", "save", "adm", "--title", "admin test", "--tag", "x", "--json")
    assert code == 0
    snap = json.loads(out)["id"]
    code, out, _ = spl("snapshot", "ls")
    assert code == 0 and snap in out and "admin test" in out
    code, out, _ = spl("snapshot", "ls", "--tag", "nope", "--json")
    assert code == 0 and json.loads(out) == {"object": "list", "data": []}
    code, out, _ = spl("snapshot", "info", snap, "--json")
    assert code == 0 and json.loads(out)["tags"] == ["x"]
    code, out, _ = spl("snapshot", "tag", snap, "y", "z", "--remove", "x", "--title", "renamed")
    assert code == 0 and "y, z" in out and "renamed" in out
    code, out, _ = spl("snapshot", "export", snap, str(tmp_path / "s.tar"))
    assert code == 0 and (tmp_path / "s.tar").stat().st_size > 0
    code, out, _ = spl("snapshot", "import", str(tmp_path / "s.tar"), "--as", "adm-imported")
    assert code == 0 and "adm-imported" in out
    code, out, _ = spl("snapshot", "load", "adm-imported", "--session", "adm4")
    assert code == 0 and "adm4" in out
    code, out, _ = spl("snapshot", "load", "adm-imported", "--session", "adm4")
    assert code == 2  # exists: needs --force
    code, out, _ = spl("snapshot", "load", "adm-imported", "--session", "adm4", "--force")
    assert code == 0

    code, out, _ = spl("ls", "--json")
    listing = json.loads(out)
    assert {"adm", "adm2", "adm3", "adm4"} <= {s["id"] for s in listing["sessions"]["data"]}
    assert {snap, "adm-imported"} <= {s["id"] for s in listing["snapshots"]["data"]}
    code, out, _ = spl("rm", "adm2", "adm-imported")
    assert code == 0 and "removed session adm2" in out and "removed snapshot adm-imported" in out
    # Tab completion asks the same server: session ids, and snapshot ids.
    assert {"adm", "adm3", "adm4"} <= set(complete(server, "spl session info adm"))
    assert complete(server, f"spl snapshot info {snap[:-1]}") == [snap]
    code, out, _ = spl("snapshot", "rm", snap, "--json")
    assert code == 0 and [d["id"] for d in json.loads(out)] == [snap]
    code, out, _ = spl("session", "rm", "adm", "adm3", "adm4", "--json")
    assert code == 0 and [d["id"] for d in json.loads(out)] == ["adm", "adm3", "adm4"]


def complete(server, words: str) -> list[str]:
    """What `spl` offers on Tab (the protocol of click's bash script)."""
    env = dict(server.env, _SPL_COMPLETE="bash_complete", COMP_WORDS=words,
               COMP_CWORD=str(len(words.split(" ")) - 1))
    result = subprocess.run([sys.executable, "-m", "superlinear.cli.main"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if "," in line]


def test_admin_errors_are_one_line(spl):
    for args in (("session", "info", "ghost"), ("rm", "ghost"), ("snapshot", "info", "ghost"),
                 ("session", "rollback", "ghost", "1"), ("snapshot", "import", "/nonexistent.tar"),
                 ("session", "info", "../x")):
        code, out, err = spl(*args)
        assert code == 2, (args, out, err)
        assert err.startswith("spl: error:") and len(err.strip().splitlines()) == 1, err


def test_api_commands_run_against_the_api_in_the_context(server):
    from superlinear import connect
    from superlinear import protocol as api
    from superlinear.bus import Context, dispatch

    with connect(server.url, api_key=server.api_key) as client:
        ctx = Context(api=client)
        dispatch(api.CreateSession(session_id="ctx-1"), ctx)
        assert "ctx-1" in [s["id"] for s in dispatch(api.ListSessions(), ctx)["sessions"]]
        dispatch(api.CloseSession(session_id="ctx-1"), ctx)
        assert "ctx-1" not in [s["id"] for s in dispatch(api.ListSessions(), ctx)["sessions"]]


def test_no_server_is_a_clear_error(spl, monkeypatch):
    monkeypatch.setenv("SPL_SERVER_URL", "http://127.0.0.1:9")
    code, _, err = spl("ls")
    assert code == 2 and "cannot reach the spl server" in err


def test_server_connect(spl, server, monkeypatch, tmp_path):
    monkeypatch.setenv("SPL_STATE_DIR", str(tmp_path / "fresh-state"))
    monkeypatch.delenv("SPL_SERVER_URL")
    monkeypatch.delenv("SPL_API_KEY")
    code, _, err = spl("server", "connect", server.url, "--api-key", server.api_key)
    assert code == 0, err
    code, out, _ = spl("server", "status")
    assert code == 0 and out.startswith(f"up: {server.url}") and "connected to" in out
    code, out, err = spl("ls", "--json")
    assert code == 0 and "sessions" in json.loads(out), err
    code, out, _ = spl("server", "connect", "--forget")
    assert code == 0 and "127.0.0.1:8787" in out


def test_import_of_a_file_that_is_no_export_names_that_file(spl, tmp_path):
    """The server only sees an upload; the CLI's one line names the user's file, in full."""
    text = tmp_path / "hostname"
    text.write_text("myhost\n")
    code, out, err = spl("snapshot", "import", str(text))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip() == (f"spl: error: {text} is not a snapshot export (not a tar file made by a "
                           "snapshot export)"), err
    assert "spl-import-" not in err
