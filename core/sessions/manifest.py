"""What the snapshot store and the session journal share: manifest fields (time stamps, the
model's identity, spl's version) and the errors of snapshot files on disk."""

from __future__ import annotations

import datetime as _dt
import errno

from superlinear.errors import InvalidRequest, Unavailable


class CorruptSnapshot(InvalidRequest):
    """A snapshot's files do not match its manifest (truncated, edited, missing)."""

    code = "snapshot_corrupted"


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def model_identity(model) -> dict:
    """``{"name", "fingerprint"}`` from a model object or a dict with those keys."""
    if isinstance(model, dict):
        name, fingerprint = model.get("name"), model.get("fingerprint")
    else:
        name, fingerprint = getattr(model, "name", None), getattr(model, "fingerprint", None)
    if not fingerprint:
        raise ValueError("the model has no fingerprint; snapshots need one to be checked on load")
    return {"name": str(name or "unknown"), "fingerprint": str(fingerprint)}


def spl_version() -> str:
    from superlinear.version import __version__

    return __version__


DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EFBIG: "a file is too large for the file system",
               errno.EIO: "input/output error"}


def disk_error(what: str, exc: OSError) -> Unavailable:
    """A disk problem (full, read-only, permissions) as a clear user-facing error."""
    reason = DISK_ERRNOS.get(exc.errno, exc.strerror or str(exc))
    return Unavailable(f"{what}: {reason}; free space or set $SPL_SNAPSHOT_DIR to another "
                       "directory", code="snapshot_write_failed")
