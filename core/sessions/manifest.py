"""What the snapshot store and the session journal share: the manifest's schema, its fields
(the model's identity, spl's version) and the errors of snapshot files on disk.

``Manifest`` is the one definition of a manifest. Every manifest is checked against it in strict
mode (types as written, sizes, at most ``MAX_DEPTH`` levels) when it is read, whether from the
store or from an upload, so one that passes can be listed, sorted, loaded and exported without
any later surprise; the journal's own consistency (segments cover the positions) is checked on
top by ``journal.manifest_problem``.
"""

from __future__ import annotations

import errno
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from superlinear.errors import InvalidRequest, Unavailable

MAX_MANIFEST_BYTES = 16 << 20  # a few files and a session's bookkeeping; anything larger is not ours
MAX_DEPTH = 8  # a manifest nests 4 deep (files -> name -> entry)
MAX_TITLE = 200
MAX_DESCRIPTION = 10_000
MAX_TAGS = 64
MAX_TAG_LEN = 64
MAX_FILES = 4096  # a journal's segments and checkpoints, well past its MAX_SEGMENTS
_SHORT = 256  # names, fingerprints, time stamps, versions, hashes

Short = Annotated[str, StringConstraints(max_length=_SHORT)]
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Count = Annotated[int, Field(ge=0, le=1 << 62)]


class _Record(BaseModel):
    # unknown keys are kept (a newer spl may add some) but bounded by the size and depth caps
    model_config = ConfigDict(extra="allow", strict=True)


class ModelIdentity(_Record):
    name: Short
    fingerprint: Annotated[str, StringConstraints(min_length=1, max_length=_SHORT)]


class SessionRecord(_Record):
    """The session a snapshot holds, as its manifest records it."""

    position: Count
    max_seq_len: Annotated[int, Field(ge=1, le=1 << 62)]
    message_count: Count
    id: Short | None = None
    created_at: float | Short | None = None  # a session's: seconds since the epoch

    @model_validator(mode="after")
    def _fits(self):
        if self.position > self.max_seq_len:
            raise ValueError(f"position {self.position} is past max_seq_len {self.max_seq_len}")
        return self


class FileEntry(_Record):
    bytes: Count
    xxh3_128: Short | None = None
    sha256: Short | None = None

    @model_validator(mode="after")
    def _hashed(self):
        if self.xxh3_128 is None and self.sha256 is None:
            raise ValueError("names no hash (xxh3_128 or sha256)")
        return self


class Segment(_Record):
    file: FileName
    start: Count
    end: Count


class Manifest(_Record):
    schema_version: Annotated[int, Field(ge=1, le=1000)]
    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    created_at: Short
    updated_at: Short | None = None
    model: ModelIdentity
    session: SessionRecord
    title: Annotated[str, StringConstraints(max_length=MAX_TITLE)] = ""
    description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION)] = ""
    tags: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_TAG_LEN)]],
                    Field(max_length=MAX_TAGS)] = []
    files: Annotated[dict[FileName, FileEntry], Field(max_length=MAX_FILES)]
    spl_version: Short | None = None
    # a session's journal (journal.py)
    format: Short | None = None
    generation: Count | None = None
    segments: Annotated[list[Segment], Field(max_length=MAX_FILES)] | None = None
    checkpoints: Annotated[dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,12}$")], FileName],
                           Field(max_length=MAX_FILES)] | None = None
    state: FileName | None = None
    meta: FileName | None = None

    @model_validator(mode="after")
    def _own_files(self):
        if "manifest.json" in self.files:
            raise ValueError("lists manifest.json among its files")
        return self


class CorruptSnapshot(InvalidRequest):
    """A snapshot's files do not match its manifest (truncated, edited, missing)."""

    code = "snapshot_corrupted"


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
