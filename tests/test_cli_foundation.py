"""The `spl` entry point: help, version, plugins listing, one-line errors, no torch on --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BUILTIN_COMMANDS = ["plugins", "models", "bench", "serve", "server", "chat", "rag", "docs", "session", "snapshot"]


def run_spl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "superlinear.cli.main", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )


def test_help_lists_builtin_commands():
    result = run_spl("--help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()}
    missing = [c for c in BUILTIN_COMMANDS if c not in listed]
    assert not missing, f"built-in commands missing from --help: {missing}\n{result.stdout}"
    assert result.stderr == "", result.stderr


def test_version():
    from superlinear import __version__

    result = run_spl("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from superlinear.cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'transformers', 'triton', 'safetensors', 'fastapi', 'bm25s')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY=\n" in result.stdout or result.stdout.rstrip().endswith("HEAVY="), result.stdout
    assert "Commands:" in result.stdout


def test_unknown_command_is_one_line_exit_2():
    result = run_spl("nosuchcommand")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nosuchcommand" in lines[0] and lines[0].startswith("spl: error:")


def test_bad_option_is_one_line_exit_2():
    result = run_spl("plugins", "--no-such-flag")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("as_json", [False, True])
def test_plugins_lists_builtins(as_json):
    result = run_spl("plugins", *(["--json"] if as_json else []))
    assert result.returncode == 0, result.stderr
    if as_json:
        data = json.loads(result.stdout)
        by_name = {p["name"]: p for p in data["plugins"]}
        for name in ("meta", "models", "serve", "server", "admin", "chat", "rag", "lightrag", "bench"):
            assert by_name[name]["builtin"] is True
            assert by_name[name]["hooks"], f"{name} implements no hook"
        assert "register_commands" in by_name["meta"]["hooks"]
        assert data["broken"] == {}
    else:
        names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
        assert {"meta", "serve", "chat", "rag"} <= names
