"""Built-in plugin ``server``: ``spl server start|status|stop|logs|connect|config``, the commands
of ``superlinear.client``."""

from __future__ import annotations

from superlinear.hookspecs import hookimpl


@hookimpl
def register_commands(register):
    from superlinear.client import server_group, status_command
    from superlinear.client.url_option import with_url_option

    with_url_option(status_command)  # which server answers there
    register(server_group)
