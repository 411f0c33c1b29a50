"""Built-in plugin ``bench``: ``spl bench <what>`` (benchmarks are commands, not timed tests).

Each subcommand lives in its own module of this package and exposes a click command named
``command`` (plus, optionally, ``BUS_COMMANDS``: a list of ``(CommandType, handler)`` pairs for
the bus). To add one, drop ``plugins/bench/<name>.py`` in and list ``<name>`` in ``SUBCOMMANDS``;
a module that is not there yet is skipped. Modules must not import torch at import time.
"""

from __future__ import annotations

import importlib

import click

from superlinear.hookspecs import hookimpl

SUBCOMMANDS = ("attention", "generate", "niah", "serve")


def _modules():
    for name in SUBCOMMANDS:
        full = f"{__name__}.{name}"
        try:
            yield importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name == full:
                continue
            raise


@click.group("bench")
def bench_group() -> None:
    """Benchmarks: attention kernels, end-to-end generation, needle retrieval, serving load."""


def _find_command(module):
    cmd = getattr(module, "command", None)
    if isinstance(cmd, click.Command):
        return cmd
    for value in vars(module).values():  # fallback: the module's first click command
        if isinstance(value, click.Command) and value.name == module.__name__.rsplit(".", 1)[-1]:
            return value
    return None


for _module in _modules():
    _cmd = _find_command(_module)
    if _cmd is not None and _cmd.name not in bench_group.commands:
        bench_group.add_command(_cmd)


@hookimpl
def register_commands(register):
    register(bench_group)
