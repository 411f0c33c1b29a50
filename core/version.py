"""The version of spl (one place: the package, snapshots and the server report it)."""

__version__ = "0.1.0"
