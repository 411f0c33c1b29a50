"""Third-party plugins: a real package with a real entry point (a dist-info on sys.path).

They are found through `importlib.metadata` exactly as a pip-installed plugin would be; a
broken one is reported in one line and skipped; SPL_LOAD_PLUGINS restricts loading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HELLO_PLUGIN = '''
"""A tiny third-party spl plugin: `spl hello NAME` and a `/hello` REPL command."""
from dataclasses import dataclass

import click

from superlinear.bus import Command, dispatch
from superlinear.chat_ui import SlashCommand
from superlinear.hookspecs import hookimpl


@dataclass(frozen=True)
class Greet(Command):
    name = "hello.greet"
    who: str = "world"


def greet(command, ctx):
    return f"hello, {command.who}!"


@click.command("hello")
@click.argument("who")
def hello(who):
    """Say hello (third-party plugin)."""
    click.echo(dispatch(Greet(who)))


@hookimpl
def register_commands(register):
    register(hello)


@hookimpl
def register_handlers(register):
    register(Greet, greet)


@hookimpl
def register_slash_commands(register):
    register(SlashCommand("hello", "Say hello", lambda text, repl: dispatch(Greet(text or "repl"))))
'''

BROKEN_ON_IMPORT = 'raise RuntimeError("this plugin is broken on purpose")\n'

BROKEN_HOOK = '''
from superlinear.hookspecs import hookimpl

@hookimpl
def register_commands(register):
    raise ValueError("register_commands exploded")
'''


def write_dist(root: Path, dist: str, module: str, source: str, version: str = "0.3.0") -> None:
    (root / module).mkdir()
    (root / module / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[spl]\n{module.removeprefix('spl_')} = {module}\n")
    (info / "RECORD").write_text("")


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    write_dist(root, "spl-hello", "spl_hello", HELLO_PLUGIN)
    write_dist(root, "spl-broken", "spl_broken", BROKEN_ON_IMPORT)
    write_dist(root, "spl-badhook", "spl_badhook", BROKEN_HOOK)
    return root


def spl(plugin_path: Path, *args: str, **env_overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_path), env.get("PYTHONPATH", "")])
    env.pop("SPL_LOAD_PLUGINS", None)
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-m", "superlinear.cli.main", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_third_party_command_appears_in_help_and_runs(plugin_path):
    help_result = spl(plugin_path, "--help")
    assert help_result.returncode == 0
    assert "hello" in help_result.stdout and "Say hello (third-party plugin)." in help_result.stdout
    run = spl(plugin_path, "hello", "Ada")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "hello, Ada!"


def test_broken_plugins_are_reported_in_one_line_and_skipped(plugin_path):
    result = spl(plugin_path, "plugins")
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("spl: warning:")]
    assert any("'broken'" in w and "broken on purpose" in w for w in warnings), result.stderr
    assert any("'badhook'" in w and "register_commands exploded" in w for w in warnings), result.stderr
    assert "Traceback" not in result.stderr
    # spl itself keeps working: built-ins and the good third-party plugin are listed.
    assert "meta" in result.stdout and "hello" in result.stdout


def test_plugins_json_shows_version_and_hooks(plugin_path):
    result = spl(plugin_path, "plugins", "--json")
    data = json.loads(result.stdout)
    hello = next(p for p in data["plugins"] if p["name"] == "hello")
    assert hello["version"] == "0.3.0" and hello["builtin"] is False
    assert hello["hooks"] == ["register_commands", "register_handlers", "register_slash_commands"]
    assert "broken" in data["broken"]


def test_spl_load_plugins_restricts_third_party(plugin_path):
    only_hello = spl(plugin_path, "plugins", "--json", SPL_LOAD_PLUGINS="hello")
    names = {p["name"] for p in json.loads(only_hello.stdout)["plugins"]}
    assert "hello" in names and "meta" in names  # built-ins always load
    assert only_hello.stderr == ""  # the broken ones were never imported

    none = spl(plugin_path, "hello", "x", SPL_LOAD_PLUGINS="")
    assert none.returncode == 2
    assert "No such command 'hello'" in none.stderr


def test_third_party_slash_command_is_collected(plugin_path):
    code = (
        "from superlinear.pluginloader import collect\n"
        "from superlinear.bus import Context, dispatch\n"
        "cmds = {a[0].name: a[0] for _, a, _ in collect('register_slash_commands')}\n"
        "print(cmds['hello'].run('repl user', None))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(plugin_path), SPL_LOAD_PLUGINS="hello")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "hello, repl user!", result.stderr
