"""The plugin hooks of spl (pluggy project name ``spl``, entry-point group ``spl``).

Every hook receives a ``register`` callback and calls it once per thing it contributes —
the shape simonw/llm uses. Built-in plugins (``superlinear.plugins.*``) implement these
hooks exactly as a third-party package does. Plugin modules must not import torch at import
time: ``spl --help`` loads every plugin.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("spl")
hookimpl = pluggy.HookimplMarker("spl")


@hookspec
def register_commands(register):
    """Add CLI commands: ``register(click_command)`` (a ``click.Command`` or ``click.Group``).

    A feature the REPL's slash commands (or other plugins) run too: the callback builds a bus
    command and ``dispatch``es it, so the feature is written once, in its handler.
    """


@hookspec
def register_handlers(register):
    """Handle bus commands: ``register(CommandType, handler)``.

    ``CommandType`` is a ``superlinear.bus.Command`` subclass; ``handler(command, ctx)``
    returns the result. One handler per command type; a second registration is an error.
    """


@hookspec
def register_slash_commands(register):
    """Add REPL slash commands: ``register(superlinear.chat_ui.SlashCommand(...))``."""


@hookspec
def register_retrievers(register):
    """Add document retrievers: ``register(name, factory)``.

    ``factory(workspace)`` returns an object with ``search(query, k) -> list[Passage]``
    (see ``superlinear.retrieval``).
    """


@hookspec
def register_model_loaders(register):
    """Add model loaders: ``register(loader)``.

    ``loader.name`` is a short name; ``loader.can_load(spec) -> bool`` says whether it
    understands a ``--model`` value; ``loader.load(spec, **options)`` returns a loaded model.
    """


@hookspec
def register_routes(register):
    """Add HTTP routes to the server: ``register(fastapi.APIRouter)``."""
