"""Built-in plugin ``meta``: ``spl plugins`` lists what is loaded; ``spl completion SHELL`` prints
the shell completion script (click's, for bash, zsh and fish)."""

from __future__ import annotations

import os
from dataclasses import asdict

import click

from superlinear.hookspecs import hookimpl
from superlinear.output import emit, json_option


def list_plugins() -> dict:
    from superlinear.pluginloader import load_plugins

    state = load_plugins()
    return {
        "plugins": [asdict(info) for info in state.infos.values()],
        "broken": state.broken,
    }


@click.command("plugins")
@json_option
def plugins_command(as_json: bool) -> None:
    """List loaded plugins, their versions and the hooks each implements."""
    emit(list_plugins(), as_json, _plugins_text)


def _plugins_text(result: dict) -> str:
    lines = [f"{p['name']:<10} {p['version']:<8} {'built-in' if p['builtin'] else 'third-party':<11} "
             f"{', '.join(p['hooks'])}" for p in result["plugins"]]
    lines += [f"{name:<10} BROKEN   {reason}" for name, reason in result["broken"].items()]
    return "\n".join(lines)


SHELLS = ("bash", "zsh", "fish")
PROG = "spl"
COMPLETE_VAR = "_SPL_COMPLETE"  # what click's scripts set when they ask `spl` for completions


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS), required=False)
def completion_command(shell: str | None) -> None:
    """Print the shell completion script for SHELL (default: the one in $SHELL).

    \b
    bash:  eval "$(spl completion bash)"   (in ~/.bashrc)
    zsh:   eval "$(spl completion zsh)"    (in ~/.zshrc)
    fish:  spl completion fish > ~/.config/fish/completions/spl.fish
    """
    from click.shell_completion import get_completion_class

    if shell is None:
        shell = os.path.basename(os.environ.get("SHELL", ""))
        if shell not in SHELLS:
            raise click.UsageError(f"give the shell: spl completion {{{'|'.join(SHELLS)}}}")
    root = click.get_current_context().find_root().command
    click.echo(get_completion_class(shell)(root, {}, PROG, COMPLETE_VAR).source())


@hookimpl
def register_commands(register):
    register(plugins_command)
    register(completion_command)
