"""spl: inference engine for long-context models with superlinear attention.

The import name is ``superlinear`` (source folder ``core/``). Keep this module light:
``spl --help`` imports it and must not pull in torch.
"""

from superlinear.version import __version__

__all__ = ["__version__", "connect"]


def connect(target: str | None = None, **options):
    """The API (``superlinear.api``): ``connect("local", model=...)`` in process, ``connect(url)``
    over HTTP; ``connect()``: ``$SPL_SERVER_URL`` when set, else local."""
    from superlinear.api import connect as _connect

    return _connect(target, **options)
