"""``--url URL`` on every command that talks to a server, the same everywhere: it points that one
command at a server, as ``$SPL_SERVER_URL`` does (which the client reads first)."""

from __future__ import annotations

import os

import click

HELP = ("Server to talk to, with or without /v1 (default: $SPL_SERVER_URL, $OPENAI_BASE_URL, `spl server connect`, "
        "your local server).")


def _use(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        os.environ["SPL_SERVER_URL"] = value if "://" in value else f"http://{value}"


def with_url_option(command: click.Command) -> click.Command:
    """``command`` (every subcommand, for a group) with ``--url``; one that has it already keeps
    its own."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            with_url_option(sub)
    elif not any(p.name == "url" for p in command.params):
        command.params.append(click.Option(["--url"], metavar="URL", default=None, expose_value=False,
                                           is_eager=True, callback=_use, help=HELP))
    return command
