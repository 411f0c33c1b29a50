"""Conventions every `spl` command keeps: `--json` wherever a command prints state (checked on
the whole click tree, so a new command cannot forget it), and shell completion (the scripts
click generates, and dynamic session/snapshot ids that never hang or print without a server)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import click
import pytest
from cli_helpers import SPL, isolated_env, run_spl

# Commands that print no state, and why. Every other command must take --json.
NO_STATE = {
    "serve": "runs the server in the foreground; its output is the server log",
    "server logs": "prints the server's log file as it is",
    "completion": "prints a shell script",
    "docs": "an interactive REPL (needs a terminal)",
}


def leaf_commands(group: click.Group, prefix: str = ""):
    for name, command in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            yield from leaf_commands(command, path + " ")
        else:
            yield path, command


def takes_json(command: click.Command) -> bool:
    return any(isinstance(p, click.Option) and "--json" in p.opts and p.is_flag for p in command.params)


def test_every_command_that_prints_state_takes_json():
    from superlinear.cli.main import build_cli

    commands = dict(leaf_commands(build_cli()))
    assert {"ls", "session ls", "snapshot info", "server status", "models list", "plugins", "rag ls"} <= set(commands)
    missing = [path for path, command in commands.items() if path not in NO_STATE and not takes_json(command)]
    assert not missing, f"commands that print state without --json: {missing}"
    stale = set(NO_STATE) - set(commands)
    assert not stale, f"NO_STATE names commands that do not exist: {stale}"


def test_with_json_an_error_is_json(tmp_path):
    """A script that asked for --json reads JSON whatever happens: the error in the HTTP API's
    shape on stdout, the exit code unchanged (2), nothing on stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    unreachable = ("session", "ls", "--json", "--url", f"127.0.0.1:{port}")
    messages = []
    for args in (unreachable, ("models", "check", str(tmp_path), "--json")):
        result = run_spl(isolated_env(tmp_path), *args)
        assert result.returncode == 2 and result.stderr == "", (args, result.stderr)
        error = json.loads(result.stdout)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        messages.append(error["message"])
    assert "cannot reach the spl server" in messages[0] and "no config.json" in messages[1]


def test_every_option_has_help():
    from superlinear.cli.main import build_cli

    bare = [f"{path} {'/'.join(p.opts)}" for path, command in leaf_commands(build_cli()) for p in command.params
            if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert not bare, f"options without help text: {bare}"


def test_threads_is_one_type_on_serve_and_bench_attention():
    """`--threads N` means the same on both: one count of torch's CPU threads (bench attention
    takes it more than once to run counts side by side)."""
    from superlinear.cli.main import build_cli

    commands = dict(leaf_commands(build_cli()))
    serve, bench = ({p.name: p for p in commands[name].params}["threads"] for name in ("serve", "bench attention"))
    assert type(serve.type) is type(bench.type) is click.IntRange
    assert (serve.type.min, serve.type.max) == (bench.type.min, bench.type.max)


def test_bench_attention_runs_on_the_device_that_exists(tmp_path):
    """No --device on a machine without CUDA: the CPU bench, not an error asking for a GPU."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is there: the default is CUDA")
    result = run_spl(isolated_env(tmp_path, OMP_NUM_THREADS="1"), "bench", "attention", "--lengths", "256",
                     "--decode-lengths", "256", "--repeats", "1", "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["device"].startswith("CPU") and {r["threads"] for r in out["rows"]} == {1}


# Commands that never talk to a server, and why. Every other command must take --url.
NO_SERVER = {
    "serve": "is the server", "server start": "starts a local one (--host, --port)",
    "server stop": "stops the local one", "server logs": "reads the local log file",
    "server config": "shows the settings", "server connect": "takes the URL as its argument",
    "completion": "prints a shell script", "plugins": "lists what is installed", "models list": "local files",
    "models info": "loads the model here", "models check": "reads a checkpoint here",
    "bench attention": "runs here", "bench generate": "runs here", "bench niah": "runs here",
    "rag ls": "reads the workspaces", "rag info": "reads the workspace", "rag sources": "reads the workspace",
    "rag retrievers": "lists plugins",
}


def test_every_command_that_talks_to_a_server_takes_url():
    from superlinear.cli.main import build_cli

    commands = dict(leaf_commands(build_cli()))
    missing = [path for path, command in commands.items()
               if path not in NO_SERVER and not any("--url" in getattr(p, "opts", ()) for p in command.params)]
    assert not missing, f"commands that talk to a server without --url: {missing}"
    assert not set(NO_SERVER) - set(commands), set(NO_SERVER) - set(commands)


def test_help_lists_never_cut_a_command_short(tmp_path):
    env = isolated_env(tmp_path, COLUMNS="80")
    for group in ((), ("session",), ("snapshot",), ("server",), ("rag",), ("models",), ("bench",)):
        out = run_spl(env, *group, "--help").stdout
        commands = out.split("Commands:", 1)[1]
        assert "..." not in commands, (group, commands)


@pytest.mark.parametrize("args", [
    ("plugins",), ("models", "list"), ("rag", "ls"), ("rag", "retrievers"), ("server", "status"),
    ("server", "config"),
])
def test_json_output_is_one_document(tmp_path, args):
    env = isolated_env(tmp_path, SPL_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    result = run_spl(env, *args, "--json")
    assert result.returncode in (0, 1), result.stderr  # `server status` exits 1 when nothing runs
    json.loads(result.stdout)  # exactly one JSON document, nothing else on stdout


# -- completion ---------------------------------------------------------------------------------
def complete(env: dict, words: str, timeout: float = 30) -> tuple[list[str], subprocess.CompletedProcess]:
    """Ask `spl` for completions the way click's bash script does."""
    parts = words.split(" ")
    env = dict(env, _SPL_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=str(len(parts) - 1))
    result = subprocess.run(SPL, capture_output=True, text=True, env=env, timeout=timeout)
    values = [line.split(",", 1)[1] for line in result.stdout.splitlines() if "," in line]
    return values, result


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"), ("zsh", "compdef"),
                                           ("fish", "complete --no-files --command spl")])
def test_completion_scripts(tmp_path, shell, marker):
    result = run_spl(isolated_env(tmp_path), "completion", shell)
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout and "_SPL_COMPLETE" in result.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_bash_script_loads_and_completes_commands(tmp_path):
    env = isolated_env(tmp_path)
    script = run_spl(env, "completion", "bash").stdout
    check = subprocess.run(["bash", "-c", f"{script}\ncomplete -p spl"], capture_output=True, text=True)
    assert check.returncode == 0 and "_spl_completion" in check.stdout, check.stderr
    values, _ = complete(env, "spl sess")
    assert values == ["session"]
    values, _ = complete(env, "spl snapshot l")
    assert set(values) == {"load", "ls"}


def test_id_completion_without_a_server_is_silent_and_quick(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        # A port that accepts connections and never answers: the worst case for a Tab press.
        env = isolated_env(tmp_path, SPL_SERVER_URL=f"http://127.0.0.1:{listener.getsockname()[1]}")
        started = time.monotonic()
        values, result = complete(env, "spl session info ")
        elapsed = time.monotonic() - started
    assert values == [] and result.returncode == 0 and result.stderr == ""
    assert elapsed < 15, elapsed  # bounded by the completion's own timeout, not the client's 600 s
    values, result = complete(isolated_env(tmp_path), "spl session info ")  # nothing recorded, nothing listens
    assert values == [] and result.returncode == 0 and result.stderr == ""
    (tmp_path / "config" / "spl").mkdir(parents=True)
    (tmp_path / "config" / "spl" / "config.toml").write_text("[server\n")  # broken config: still silent
    values, result = complete(isolated_env(tmp_path), "spl snapshot info ")
    assert values == [] and result.returncode == 0 and result.stderr == ""


def test_snapshot_ids_complete_from_the_local_store(tmp_path):
    import torch

    from superlinear.sessions import SnapshotStore

    store = SnapshotStore(tmp_path / "snapshots")
    for sid, tags in (("alpha-1", []), ("alpha-2", ["x"]), ("beta", []), ("state-of-s1", [])):
        store.save(model={"name": "m", "fingerprint": "f" * 64},
                   session={"position": 1, "max_seq_len": 8, "message_count": 0},
                   transcript={"messages": []}, tensors={"t": torch.zeros(1)}, snapshot_id=sid, tags=tags)
    # a session's own state: the server's journal writer tags it (users may not: the tag is reserved)
    manifest_path = store.root / "state-of-s1" / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "tags": ["spl:session-state"]}))
    env = isolated_env(tmp_path)  # no server runs: ids come from the store on disk
    values, result = complete(env, "spl snapshot info al")
    assert sorted(values) == ["alpha-1", "alpha-2"] and result.stderr == ""
    values, _ = complete(env, "spl snapshot rm ")
    assert sorted(values) == ["alpha-1", "alpha-2", "beta"]  # a session's own state is not offered
    values, _ = complete(env, "spl rm b")
    assert values == ["beta"]
