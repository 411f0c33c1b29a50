"""Snapshots: a session's state frozen on disk, one directory per snapshot.

Layout of ``<root>/<id>/``::

    manifest.json         schema_version, id, created_at, updated_at, model {name, fingerprint},
                          session {position, max_seq_len, message_count, ...}, title,
                          description, tags, files {name: {xxh3_128 (older: sha256), bytes}}, spl_version
    transcript.json       {"messages": [...], "engine": {...}}: the chat transcript and the
                          engine's bookkeeping (token ids live in the tensors file)
    tensors.safetensors   KV cache trimmed to the position, recurrent state, checkpoints

A session's own state (tag ``spl:session-state``) is a *journal* in the same kind of directory,
written incrementally (segments of KV rows; ``journal.py``); ``read`` handles both.

Durability: a snapshot is written into ``<root>/.tmp.<pid>.<rand>/``, every file is fsynced,
the directory is fsynced, then renamed to ``<root>/<id>`` and the root is fsynced. A crash at
any point leaves either no visible snapshot or a complete one; leftover temporary directories
are ignored by ``list()`` and removed once their writer process is gone. Every file's SHA-256
is in the manifest and is checked before anything is loaded, so a truncated or edited file is
refused (``CorruptSnapshot``). Tensors are safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import os
import re
import secrets
import shutil
import tarfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from superlinear import records
from superlinear.errors import Conflict, InvalidRequest, NotFound, TooLarge, Unavailable, UserError
from superlinear.process import pid_alive
from superlinear.sessions.journal import SESSION_STATE_TAG
from superlinear.sessions.manifest import (
    MAX_DEPTH,
    MAX_DESCRIPTION,
    MAX_MANIFEST_BYTES,
    MAX_TAG_LEN,
    MAX_TAGS,
    MAX_TITLE,
    CorruptSnapshot,
    Manifest,
    disk_error,
    model_identity,
    spl_version,
)
from superlinear.sessions.registry import MAX_ID_LEN, new_id, validate_id
from superlinear.sessions.tensorfile import now_iso, write_manifest

from . import journal, tensorfile

SCHEMA_VERSION = 1  # single-file snapshots; session journals (journal.py) are version 2
READABLE_SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
TRANSCRIPT = "transcript.json"
TENSORS = "tensors.safetensors"
EXPORT_SUFFIX = ".spl-snapshot.tar"
UPLOAD_NAME = "the uploaded file"  # how the server's import errors name an upload (the CLI puts the path back)

_TAR_SLACK = 1 << 20  # tar headers, padding and read-ahead beyond the files' own bytes
RESERVE_ENV = "SPL_STORE_RESERVE_BYTES"
DEFAULT_RESERVE_BYTES = 256 << 20  # what an import leaves free: the sessions' journals go on being written
_COPY_CHUNK = 8 << 20
# Tags in this namespace belong to spl (``SESSION_STATE_TAG`` marks a session's own journal), so
# a user snapshot must never carry one.
RESERVED_TAG_PREFIX = "spl:"
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_UNSET = object()


def reserve_bytes() -> int:
    """The free space an import must leave on the disk (``$SPL_STORE_RESERVE_BYTES``)."""
    value = os.environ.get(RESERVE_ENV, "")
    try:
        return max(0, int(value)) if value.strip() else DEFAULT_RESERVE_BYTES
    except ValueError:
        raise InvalidRequest(f"${RESERVE_ENV} must be a number of bytes, got {value!r}") from None


def room(path: str | os.PathLike) -> int:
    """The bytes that may still be written under ``path``: its disk's free space less the reserve."""
    return shutil.disk_usage(path).free - reserve_bytes()


class ModelMismatch(Conflict):
    """A snapshot was made with another model than the one loaded."""

    code = "model_mismatch"


def check_model(manifest: dict, model) -> None:
    """Refuse a snapshot made with another model, naming both models."""
    want = model_identity(model)
    have = manifest.get("model") or {}
    if have.get("fingerprint") != want["fingerprint"]:
        raise ModelMismatch(
            f"snapshot {manifest.get('id')!r} was made with model {have.get('name')!r} "
            f"(fingerprint {str(have.get('fingerprint'))[:16]}), but the loaded model is "
            f"{want['name']!r} (fingerprint {want['fingerprint'][:16]}); load it with the model it "
            "was made with",
            param="snapshot_id",
        )


def _clean_title(value, what: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string", param=what)
    if len(value) > limit:
        raise InvalidRequest(f"{what} is {len(value)} characters long; at most {limit} are allowed",
                             param=what)
    return value


def _clean_tags(tags, *, user: bool = True) -> list[str]:
    """Validated, de-duplicated tags. ``user``: tags a client gave, where the reserved ``spl:``
    namespace is refused (tags already in a manifest pass with ``user=False``)."""
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, (list, tuple)):
        raise InvalidRequest("tags must be a list of strings", param="tags")
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip():
            raise InvalidRequest(f"tags must be non-empty strings, got {tag!r}", param="tags")
        tag = tag.strip()
        if len(tag) > MAX_TAG_LEN or any(ord(c) < 32 for c in tag):
            raise InvalidRequest(f"invalid tag {tag!r}: at most {MAX_TAG_LEN} printable characters",
                                 param="tags")
        if user and tag.startswith(RESERVED_TAG_PREFIX):
            raise InvalidRequest(f"tag {tag!r} is reserved: tags starting with {RESERVED_TAG_PREFIX!r} are spl's own",
                                 param="tags")
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise InvalidRequest(f"{len(out)} tags; at most {MAX_TAGS} are allowed", param="tags")
    return out


class SnapshotStore:
    """Snapshots on disk under ``root`` (default ``superlinear.paths.snapshots_dir()``)."""

    def __init__(self, root: str | os.PathLike | None = None, *, cleanup: bool = True):
        if root is None:
            from superlinear.paths import snapshots_dir

            root = snapshots_dir()
        self.root = Path(root)
        self._lock = threading.RLock()
        self.skipped: list[dict] = []  # the snapshots the last ``list`` left out as unreadable
        if cleanup:
            try:
                self.cleanup()
            except OSError:  # a read-only or foreign directory: reading still works
                pass

    # ------------------------------------------------------------------ paths and ids
    def _dir(self, snapshot_id: str) -> Path:
        return self.root / validate_id(snapshot_id, "snapshot id", param="snapshot_id")

    def _tmp_dir(self, kind: str = "tmp", suffix: str = "") -> Path:
        name = f".{kind}.{os.getpid()}.{secrets.token_hex(6)}"
        return self.root / (name + (f".{suffix}" if suffix else ""))

    def exists(self, snapshot_id: str) -> bool:
        return (self._dir(snapshot_id) / MANIFEST).is_file()

    def cleanup(self) -> list[str]:
        """Remove what crashed writers left behind (``.tmp.*``, ``.del.*``) and put back a
        snapshot whose replacement was cut short (``.old.*``). Returns the names handled.
        Directories of live processes are left alone."""
        handled: list[str] = []
        if not self.root.is_dir():
            return handled
        for entry in self.root.iterdir():
            name = entry.name
            if not name.startswith(".") or not entry.is_dir():
                continue
            parts = name[1:].split(".", 3)
            if len(parts) < 3 or parts[0] not in ("tmp", "del", "old") or not parts[1].isdigit():
                continue
            if pid_alive(int(parts[1])):
                continue  # its writer (maybe this process) may still be at work
            if parts[0] == "old" and len(parts) == 4:
                target = self.root / parts[3]
                if not target.exists() and (entry / MANIFEST).is_file():
                    os.rename(entry, target)
                    handled.append(name)
                    continue
            shutil.rmtree(entry, ignore_errors=True)
            handled.append(name)
        if handled:
            tensorfile.fsync_dir(self.root)
        return handled

    # ------------------------------------------------------------------ writing
    def save(
        self,
        *,
        model,
        session: dict,
        transcript,
        tensors: dict,
        title: str | None = None,
        description: str | None = None,
        tags=None,
        snapshot_id: str | None = None,
        replace: bool = False,
    ) -> dict:
        """Write a new snapshot atomically; returns its manifest.

        ``model``: the model (or ``{"name", "fingerprint"}``); ``session``: at least
        ``position``, ``max_seq_len``, ``message_count``; ``transcript``: JSON-serialisable;
        ``tensors``: name -> torch.Tensor (any device). An existing id is a ``Conflict``
        unless ``replace`` (then the old snapshot is swapped out atomically).
        """
        snapshot_id = new_id("snap") if snapshot_id is None \
            else validate_id(snapshot_id, "snapshot id", param="snapshot_id")
        for key in ("position", "max_seq_len", "message_count"):
            if key not in session:
                raise ValueError(f"session info lacks {key!r}")
        created = now_iso()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "id": snapshot_id,
            "created_at": created,
            "updated_at": created,
            "model": model_identity(model),
            "session": dict(session),
            "title": _clean_title(title, "title", MAX_TITLE),
            "description": _clean_title(description, "description", MAX_DESCRIPTION),
            "tags": _clean_tags(tags),
            "files": {},
            "spl_version": spl_version(),
        }
        if not replace and self.exists(snapshot_id):
            raise Conflict(f"snapshot {snapshot_id!r} already exists; pick another id or delete it first",
                           param="snapshot_id")
        with self.staging(f"cannot write snapshot {snapshot_id!r} in {self.root}") as tmp:
            transcript_bytes = json.dumps(transcript, ensure_ascii=False, separators=(",", ":")).encode()
            manifest["files"][TRANSCRIPT] = tensorfile.write_bytes(tmp / TRANSCRIPT, transcript_bytes)
            manifest["files"][TENSORS] = tensorfile.write_safetensors(
                tmp / TENSORS, tensors, metadata={"snapshot_id": snapshot_id, "format": "spl-session"})
            write_manifest(tmp, manifest)
            tensorfile.fsync_dir(tmp)
            self.publish(tmp, snapshot_id, replace)
        return manifest

    @contextlib.contextmanager
    def staging(self, what: str) -> Iterator[Path]:
        """A temporary directory to write a snapshot into before ``publish``; removed when
        anything fails, a disk error then said as ``what`` (``disk_error``)."""
        tmp = self.make_temp_dir()
        try:
            yield tmp
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(what, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def make_temp_dir(self) -> Path:
        """A new temporary directory in the store, to write a snapshot into before ``publish``."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self._tmp_dir()
            tmp.mkdir()
        except OSError as exc:
            raise disk_error(f"cannot write to the snapshot directory {self.root}", exc) from exc
        return tmp

    def publish(self, tmp: Path, snapshot_id: str, replace: bool, *, keep_session_state: bool = False) -> None:
        """Rename a complete temporary directory to its final name. ``keep_session_state``:
        never replace a session's own journal (a user import over it would leave the live
        session writing manifests that name files it no longer has)."""
        target = self.root / snapshot_id
        with self._lock:
            old = None
            if target.exists():
                if not replace:
                    raise Conflict(f"snapshot {snapshot_id!r} already exists; pick another id or "
                                   "delete it first", param="snapshot_id")
                if keep_session_state and self._is_session_state(snapshot_id):
                    raise Conflict(f"snapshot {snapshot_id!r} is the saved state of a session and cannot be "
                                   "replaced; import it under another id", param="snapshot_id")
                old = self._tmp_dir("old", snapshot_id)
                os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError as exc:
                if old is not None:
                    os.rename(old, target)
                if target.exists():
                    raise Conflict(f"snapshot {snapshot_id!r} already exists", param="snapshot_id") from exc
                raise
            tensorfile.fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def _is_session_state(self, snapshot_id: str) -> bool:
        try:
            return SESSION_STATE_TAG in (self.get(snapshot_id).get("tags") or ())
        except (InvalidRequest, NotFound):
            return False

    # ------------------------------------------------------------------ reading
    def _load_manifest(self, directory: Path, snapshot_id: str, param: str | None = "snapshot_id") -> dict:
        """The manifest, checked against its schema (``param``: what errors name; None: the bad field)."""
        path = directory / MANIFEST
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise self._missing(snapshot_id) from None
        except OSError as exc:
            raise disk_error(f"cannot read snapshot {snapshot_id!r} in {self.root}", exc) from exc
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CorruptSnapshot(f"snapshot {snapshot_id!r}: manifest.json is over {MAX_MANIFEST_BYTES} bytes; "
                                  "the snapshot is damaged, delete it", param="snapshot_id")
        try:
            manifest = records.checked_json(raw, Manifest, what="manifest.json", max_bytes=MAX_MANIFEST_BYTES,
                                            max_depth=MAX_DEPTH)
        except records.BadRecord as exc:
            raise CorruptSnapshot(f"snapshot {snapshot_id!r}: {exc.message}; the snapshot is damaged, delete it",
                                  param=param or exc.param) from None
        if journal.is_journal(manifest) and (problem := journal.manifest_problem(manifest)):
            raise CorruptSnapshot(f"snapshot {snapshot_id!r}: manifest.json {problem}; the snapshot is "
                                  "damaged, delete it", param=param or "manifest.json")
        if manifest["schema_version"] > READABLE_SCHEMA_VERSION:
            raise InvalidRequest(
                f"snapshot {snapshot_id!r} has schema version {manifest['schema_version']}, newer than "
                f"this spl understands ({READABLE_SCHEMA_VERSION}); upgrade spl", param="snapshot_id")
        if manifest["id"] != snapshot_id:
            manifest = dict(manifest, id=snapshot_id)  # renamed by hand: the directory name wins
        return manifest

    def _missing(self, snapshot_id: str) -> Exception:
        """``NotFound``, unless the store's path is taken by something else than a directory (a
        file, a broken mount): then nothing can be said of the snapshot, and whoever acts on a
        not-found (closing a session whose journal it is) must not go on."""
        if self.root.is_dir() or not os.path.lexists(self.root):
            return NotFound(f"no snapshot {snapshot_id!r} in {self.root}", param="snapshot_id")
        return Unavailable(f"the snapshot directory {self.root} is not a directory; restore it or set "
                           "$SPL_SNAPSHOT_DIR", code="snapshot_store_unavailable")

    def get(self, snapshot_id: str) -> dict:
        """The manifest of one snapshot (files are not hashed; ``verify`` or ``read`` do)."""
        return self._load_manifest(self._dir(snapshot_id), snapshot_id)

    def list(self, *, tag: str | None = None, include_broken: bool = False) -> list[dict]:
        """Manifests of every snapshot, oldest first; ``tag`` filters. Broken ones are left
        out unless ``include_broken`` (then they appear as ``{"id", "error"}``); either way
        ``skipped`` names them until the next listing (``/health`` and ``spl ls`` warn of them)."""
        out: list[dict] = []
        skipped: list[dict] = []
        if not self.root.is_dir():
            self.skipped = skipped
            return out
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                validate_id(entry.name)
                manifest = self._load_manifest(entry, entry.name)
            except UserError as exc:  # damaged, unreadable or gone meanwhile: the listing goes on
                skipped.append({"id": entry.name[:MAX_ID_LEN], "error": str(exc)[:500]})
                if include_broken:
                    out.append(skipped[-1])
                continue
            if tag is None or tag in manifest.get("tags", ()):
                out.append(manifest)
        out.sort(key=lambda m: (m.get("created_at", ""), m["id"]))
        self.skipped = skipped
        return out

    def verify(self, snapshot_id: str) -> dict:
        """Check every file against the manifest's hashes; returns the manifest."""
        directory = self._dir(snapshot_id)
        manifest = self._load_manifest(directory, snapshot_id)
        _verify_files(directory, manifest, snapshot_id)
        return manifest

    def read(self, snapshot_id: str, *, model=None, device=None) -> tuple[dict, object, dict]:
        """``(manifest, transcript, tensors)`` after checking the model (if given) and every
        file's hash. Tensors are loaded onto ``device`` (default CPU)."""
        directory = self._dir(snapshot_id)
        manifest = self._load_manifest(directory, snapshot_id)
        if model is not None:
            check_model(manifest, model)
        _verify_files(directory, manifest, snapshot_id)
        try:
            if journal.is_journal(manifest):  # a session's own state, in segments
                transcript, tensors = journal.read(directory, manifest, snapshot_id, device=device)
            else:
                transcript = json.loads((directory / TRANSCRIPT).read_bytes())
                tensors = tensorfile.read_safetensors(directory / TENSORS, device=device)
        except CorruptSnapshot:
            raise
        except FileNotFoundError:
            raise NotFound(f"snapshot {snapshot_id!r} was deleted while it was read",
                           param="snapshot_id") from None
        except Exception as exc:  # a file that hashes right but does not parse
            raise CorruptSnapshot(f"snapshot {snapshot_id!r} cannot be read: {exc}",
                                  param="snapshot_id") from None
        return manifest, transcript, tensors

    def read_transcript(self, snapshot_id: str):
        """Only ``transcript.json`` (hash-checked), without loading any tensor."""
        directory = self._dir(snapshot_id)
        manifest = self._load_manifest(directory, snapshot_id)
        name = manifest.get("meta", TRANSCRIPT) if journal.is_journal(manifest) else TRANSCRIPT
        entry = manifest["files"].get(name)
        if entry is None:
            raise CorruptSnapshot(f"snapshot {snapshot_id!r} has no {name}", param="snapshot_id")
        _verify_files(directory, {"files": {name: entry}}, snapshot_id)
        try:
            return json.loads((directory / name).read_bytes())
        except Exception as exc:  # noqa: BLE001
            raise CorruptSnapshot(f"snapshot {snapshot_id!r}: transcript.json cannot be read: {exc}",
                                  param="snapshot_id") from None

    def bytes(self, snapshot_id: str) -> int:
        return sum(f["bytes"] for f in self.get(snapshot_id)["files"].values())

    # ------------------------------------------------------------------ metadata and removal
    def patch(self, snapshot_id: str, *, title=_UNSET, description=_UNSET, tags=_UNSET,
              add_tags=(), remove_tags=()) -> dict:
        """Change title / description / tags; the manifest is rewritten atomically."""
        directory = self._dir(snapshot_id)
        with self._lock:
            manifest = self._load_manifest(directory, snapshot_id)
            if title is not _UNSET:
                manifest["title"] = _clean_title(title, "title", MAX_TITLE)
            if description is not _UNSET:
                manifest["description"] = _clean_title(description, "description", MAX_DESCRIPTION)
            if tags is not _UNSET:
                manifest["tags"] = _clean_tags(tags)
            if add_tags or remove_tags:
                drop = set(_clean_tags(remove_tags))
                manifest["tags"] = _clean_tags([t for t in manifest.get("tags", []) if t not in drop]
                                               + _clean_tags(add_tags), user=False)
            manifest["updated_at"] = now_iso()
            try:
                write_manifest(directory, manifest)
            except OSError as exc:
                raise disk_error(f"cannot change snapshot {snapshot_id!r} in {self.root}", exc) from exc
            tensorfile.fsync_dir(directory)
        return manifest

    def delete(self, snapshot_id: str) -> None:
        """Remove a snapshot: renamed away first (atomic), then its files are deleted."""
        directory = self._dir(snapshot_id)
        with self._lock:
            if not directory.is_dir():
                raise self._missing(snapshot_id)
            trash = self._tmp_dir("del")
            try:
                os.rename(directory, trash)
            except OSError as exc:
                raise disk_error(f"cannot delete snapshot {snapshot_id!r} in {self.root}", exc) from exc
            tensorfile.fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ export / import
    def export(self, snapshot_id: str, dest: str | os.PathLike) -> Path:
        """Write one snapshot as a single tar file (``dest`` may be a directory). The files are
        verified first; the tar is written to a temporary name and renamed."""
        manifest = self.verify(snapshot_id)
        directory = self._dir(snapshot_id)
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{snapshot_id}{EXPORT_SUFFIX}"
        if not dest.parent.is_dir():
            raise NotFound(f"cannot export to {dest}: no directory {dest.parent}", param="path")
        part = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
                for name in [MANIFEST, *manifest["files"]]:
                    tar.add(directory / name, arcname=f"{snapshot_id}/{name}", recursive=False)
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(part, dest)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise disk_error(f"cannot export snapshot {snapshot_id!r} to {dest}", exc) from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        tensorfile.fsync_dir(dest.parent)
        return dest

    def import_(self, file: str | os.PathLike, *, snapshot_id: str | None = None,
                replace: bool = False, name: str | None = None) -> dict:
        """Add a snapshot from a file made by ``export``; every hash is checked before it
        becomes visible. ``snapshot_id`` renames it; an existing id is a ``Conflict`` (with
        ``replace``, too, when the existing one is a session's own state). Reserved ``spl:``
        tags of the file are dropped: an import is always a user snapshot. ``name`` is how
        messages call the file (the server's upload is a temporary file the user never saw)."""
        file = Path(file)
        label = name or str(file)
        if not file.is_file():
            raise NotFound(f"no such file: {label}", param="file")
        if snapshot_id is not None:
            validate_id(snapshot_id, "snapshot id", param="snapshot_id")
        with self.staging(f"cannot import {label} into {self.root}") as tmp:
            manifest = self._unpack(file, label, tmp)  # every file hashed as it was unpacked
            original = manifest["id"]
            missing = sorted(name for name in manifest["files"] if not (tmp / name).is_file())
            if missing:
                raise CorruptSnapshot(f"{label} is incomplete: {', '.join(missing)[:300]} missing", param="file")
            _check_transcript(tmp, manifest, label)
            final_id = snapshot_id or original
            tags = [t for t in manifest.get("tags", []) if not str(t).startswith(RESERVED_TAG_PREFIX)]
            if manifest.get("id") != final_id or tags != manifest.get("tags", []):
                manifest["id"], manifest["tags"] = final_id, tags
                write_manifest(tmp, manifest)
            tensorfile.fsync_dir(tmp)
            if not replace and self.exists(final_id):
                raise Conflict(f"snapshot {final_id!r} already exists; import it under another id "
                               "or delete the existing one", param="snapshot_id")
            self.publish(tmp, final_id, replace, keep_session_state=True)
        return manifest

    def _unpack(self, file: Path, label: str, tmp: Path) -> dict:
        """Copy the regular files of an export tar into ``tmp`` (no links, no paths, never
        ``extractall``); returns its manifest (``id``: the tar's top directory).

        A compressed tar may expand a thousandfold, so nothing is trusted before the manifest:
        it must come first and be small; every later entry must be a file it lists, with the
        size it declares, and everything it declares must fit on the disk. The tar is read
        through a budget of decompressed bytes, so not even its headers can expand past that."""
        top, declared = None, None
        try:
            with _open_decompressed(file) as raw:
                stream = _ReadBudget(raw, MAX_MANIFEST_BYTES + _TAR_SLACK)
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        parts = member.name.split("/")
                        if member.isdir() and len(parts) == 1:
                            continue
                        if (not member.isfile() or len(parts) != 2
                                or not _FILE_NAME_RE.fullmatch(parts[1]) or (top not in (None, parts[0]))):
                            raise CorruptSnapshot(f"{label} is not a snapshot export: unexpected entry "
                                                  f"{member.name!r}", param="file")
                        top, name = parts
                        if declared is None:
                            declared = self._unpack_manifest(tar, member, name, label, tmp)
                            stream.budget = stream.used + _declared_bytes(declared) + _TAR_SLACK
                            self._check_room(declared, label)
                            continue
                        want = declared["files"].get(name)
                        if want is None:
                            raise CorruptSnapshot(f"{label} holds files the manifest does not list: "
                                                  f"[{name!r}]", param="file")
                        if (tmp / name).exists():
                            raise CorruptSnapshot(f"{label}: entry {member.name!r} appears twice", param="file")
                        if member.size != want["bytes"]:
                            raise CorruptSnapshot(f"{label}: {name} has {member.size} bytes, the manifest "
                                                  f"declares {want['bytes']}; the file is damaged", param="file")
                        digest = _copy_member(tar, member, tmp / name, tensorfile.hash_of(want)[0], label)
                        if digest != tensorfile.hash_of(want)[1]:
                            raise CorruptSnapshot(f"{label}: the hash of {name} does not match its manifest (the "
                                                  "file was edited or corrupted)", param="file")
        except tarfile.ReadError:
            raise CorruptSnapshot(f"{label} is not a snapshot export (not a tar file made by a "
                                  "snapshot export)", param="file") from None
        except (tarfile.TarError, _UnreadableExport) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptSnapshot(f"{label} is not a readable snapshot export ({reason})", param="file") from None
        if declared is None:
            raise CorruptSnapshot(f"{label} is empty, not a snapshot export", param="file")
        return declared

    def _unpack_manifest(self, tar, member, name: str, label: str, tmp: Path) -> dict:
        if name != MANIFEST:
            raise CorruptSnapshot(f"{label} is not a snapshot export: its first entry is {name!r}, not "
                                  f"{MANIFEST}", param="file")
        if member.size > MAX_MANIFEST_BYTES:
            raise CorruptSnapshot(f"{label}: {MANIFEST} is {member.size} bytes; at most {MAX_MANIFEST_BYTES} "
                                  "are allowed", param="file")
        top = validate_id(member.name.split("/")[0], "snapshot id", param="file")
        _copy_member(tar, member, tmp / MANIFEST, None, label)
        return self._load_manifest(tmp, top, param=None)

    def _check_room(self, manifest: dict, label: str) -> None:
        need, free = _declared_bytes(manifest), room(self.root)
        if need > free:
            raise TooLarge(f"{label} declares {need} bytes of files, more than the {max(free, 0)} bytes free in "
                           f"{self.root} beyond ${RESERVE_ENV} ({reserve_bytes()} bytes, kept for the sessions' "
                           "journals); free space or set $SPL_SNAPSHOT_DIR to another directory", param="file",
                           code="insufficient_storage")


class _UnreadableExport(Exception):
    """The export's bytes cannot be read: bad compression, or more of them than declared."""


class _ReadBudget:
    """A file object that refuses to read past ``budget`` bytes (of decompressed data)."""

    def __init__(self, raw, budget: int):
        self.raw, self.budget, self.used = raw, budget, 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise _UnreadableExport(str(exc) or type(exc).__name__) from None
        self.used += len(data)
        if self.used > self.budget:
            raise _UnreadableExport("it expands past the size its manifest declares")
        return data


_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def _open_decompressed(file: Path):
    """``file`` opened for reading, decompressed when it is gzip, bzip2 or xz (by its magic)."""
    with open(file, "rb") as f:
        magic = f.read(6)
    opener = next((o for m, o in _COMPRESSED if magic.startswith(m)), None)
    return opener(file, "rb") if opener else open(file, "rb")


def _declared_bytes(manifest: dict) -> int:
    return sum(entry["bytes"] for entry in manifest["files"].values())


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, algorithm: str | None,
                 label: str) -> str | None:
    """Copy one entry to ``dest``, hashing it on the way (``algorithm``; returns the hex digest),
    and stop before a chunk that would leave less than the reserve free on the disk."""
    digest = tensorfile.new_digest(algorithm) if algorithm else None
    source = tar.extractfile(member)
    with open(dest, "wb") as out:
        while chunk := source.read(_COPY_CHUNK):
            if len(chunk) > room(dest.parent):
                raise TooLarge(f"{label}: the disk of {dest.parent.parent} would keep less than ${RESERVE_ENV} "
                               f"({reserve_bytes()} bytes) free; free space or set $SPL_SNAPSHOT_DIR to "
                               "another directory", param="file")
            out.write(chunk)
            if digest is not None:
                digest.update(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest() if digest is not None else None


def _check_transcript(directory: Path, manifest: dict, label: str) -> None:
    """The transcript (a journal's meta file) must be a JSON object at the manifest's position:
    a loaded snapshot is rebuilt from both, so one that disagrees is refused on import, not on load."""
    name = manifest.get("meta", TRANSCRIPT) if journal.is_journal(manifest) else TRANSCRIPT
    if name not in manifest["files"]:
        raise CorruptSnapshot(f"{label}: the manifest lists no {name}", param="files")
    try:
        meta = json.loads((directory / name).read_bytes())
    except (ValueError, RecursionError):
        raise CorruptSnapshot(f"{label}: {name} is not valid JSON", param="file") from None
    position = manifest["session"]["position"]
    if not isinstance(meta, dict) or meta.get("position", position) != position:
        raise CorruptSnapshot(f"{label}: the manifest's session.position ({position}) is not the transcript's "
                              f"({meta.get('position') if isinstance(meta, dict) else None!r})",
                              param="session.position")


def _verify_files(directory: Path, manifest: dict, snapshot_id: str) -> None:
    for name, want in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CorruptSnapshot(f"snapshot {snapshot_id!r} is incomplete: {name} is missing; delete it",
                                  param="snapshot_id")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CorruptSnapshot(
                f"snapshot {snapshot_id!r} is damaged: {name} has {size} bytes, the manifest says "
                f"{want['bytes']} (truncated or edited); it cannot be loaded, delete it",
                param="snapshot_id")
        algorithm, expected = tensorfile.hash_of(want)
        if tensorfile.file_digest(path, algorithm)[algorithm] != expected:
            raise CorruptSnapshot(
                f"snapshot {snapshot_id!r} is damaged: the {algorithm} hash of {name} does not match the "
                "manifest (the file was edited or corrupted); it cannot be loaded, delete it",
                param="snapshot_id")
