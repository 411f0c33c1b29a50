"""spl: inference engine for long-context models with superlinear attention.

The import name is ``superlinear`` (source folder ``core/``). Keep this module light:
``spl --help`` imports it and must not pull in torch.
"""

from superlinear.version import __version__

__all__ = ["__version__", "connect"]


def connect(target: str | None = None, *, start: bool = False, **options):
    """The API (``superlinear.api.Api``): ``connect("local", model=...)`` in this process,
    ``connect(url)`` an spl server, ``connect()`` the server the spl commands talk to
    (``start=True``: started if none runs). See ``superlinear.client.connect``."""
    from superlinear.client import connect as connect_api

    return connect_api(target, start=start, **options)
