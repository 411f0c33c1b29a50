"""Built-in plugin ``meta``: ``spl plugins`` lists what is loaded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import click

from superlinear.bus import Command, Context, dispatch
from superlinear.hookspecs import hookimpl


@dataclass(frozen=True)
class ListPlugins(Command):
    name = "plugins.list"


def list_plugins(command: ListPlugins, ctx: Context) -> dict:
    from superlinear.pluginloader import load_plugins

    state = load_plugins()
    return {
        "plugins": [asdict(info) for info in state.infos.values()],
        "broken": state.broken,
    }


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """List loaded plugins, their versions and the hooks each implements."""
    result = dispatch(ListPlugins())
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for info in result["plugins"]:
        kind = "built-in" if info["builtin"] else "third-party"
        click.echo(f"{info['name']:<10} {info['version']:<8} {kind:<11} {', '.join(info['hooks'])}")
    for name, reason in result["broken"].items():
        click.echo(f"{name:<10} BROKEN   {reason}")


@hookimpl
def register_commands(register):
    register(plugins_command)


@hookimpl
def register_handlers(register):
    register(ListPlugins, list_plugins)
