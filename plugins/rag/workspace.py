"""A RAG workspace: a folder under ``superlinear.paths.workspaces_dir()/NAME``.

```
manifest.json    roots, chunking, one entry per file (sha256, size, chunks), the context
                 snapshot of the workspace session (id, model, tokens) when there is one
chunks.jsonl     one passage a line: id, path, start, end, section, text
index/<name>/    what each retriever keeps on disk (bm25: the bm25s index)
```
Writes are atomic (temporary file + rename) and an ingest holds ``.lock``, so a crash or two
ingests at once never leave a half-written workspace.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from superlinear import paths
from superlinear.errors import Conflict, InvalidRequest, NotFound

from .chunking import DEFAULT_MAX_CHARS, DEFAULT_OVERLAP, chunk_lines
from .files import file_hash, read_lines, walk

SCHEMA = 1
DEFAULT_WORKSPACE = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Progress = Callable[[int, int, str], None]  # (done, total, current path)


@dataclass(frozen=True)
class Chunk:
    """One passage of one document: ``path`` is absolute, ``start``/``end`` are 1-based lines."""

    id: int
    path: str
    start: int
    end: int
    text: str
    section: str | None = None

    @property
    def display_path(self) -> str:
        return display_path(self.path)

    @property
    def citation(self) -> str:
        lines = f"{self.start}" if self.start == self.end else f"{self.start}-{self.end}"
        return f"{self.display_path}:{lines}"


def display_path(path: str) -> str:
    """Relative to the current folder when the file is under it, else absolute."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def workspaces_root() -> Path:
    """``$SPL_WORKSPACES_DIR`` or ``superlinear.paths.workspaces_dir()``."""
    override = os.environ.get("SPL_WORKSPACES_DIR")
    return Path(override) if override else paths.workspaces_dir()


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise InvalidRequest(
            f"invalid workspace name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)",
            param="workspace",
        )
    return name


@dataclass
class IngestReport:
    workspace: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    files: int = 0
    chunks: int = 0
    chars: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["changed"] = self.changed
        return out


class Workspace:
    """Open with ``Workspace.open(name)`` (must exist) or ``Workspace.create(name)``."""

    def __init__(self, name: str, root: Path | None = None):
        self.name = check_name(name)
        self.path = (root or workspaces_root()) / name
        self._manifest: dict | None = None
        self._chunks: list[Chunk] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def open(cls, name: str) -> Workspace:
        ws = cls(name)
        if not (ws.path / "manifest.json").is_file():
            raise NotFound(f"no workspace {name!r} (create it with `spl rag ingest PATH --workspace {name}`)",
                           param="workspace")
        try:
            ws.manifest  # noqa: B018 - read now so a damaged one is one clear error
        except ValueError as exc:
            raise Conflict(f"workspace {name!r} has a damaged manifest.json; remove it with "
                           f"`spl rag rm {name}` and ingest again") from exc
        return ws

    @classmethod
    def create(cls, name: str) -> Workspace:
        ws = cls(name)
        if not (ws.path / "manifest.json").is_file():
            ws.path.mkdir(parents=True, exist_ok=True)
            manifest = {"schema": SCHEMA, "name": name, "created": _now(), "updated": _now(), "roots": [],
                        "chunking": {"max_chars": DEFAULT_MAX_CHARS, "overlap": DEFAULT_OVERLAP},
                        "files": {}, "chunks": 0, "chars": 0, "corpus_hash": "", "context": None}
            _write_atomic(ws.path / "chunks.jsonl", "")
            ws.save_manifest(manifest)
        return ws

    @classmethod
    def exists(cls, name: str) -> bool:
        return (cls(name).path / "manifest.json").is_file()

    @staticmethod
    def names() -> list[str]:
        root = workspaces_root()
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())

    def remove(self) -> None:
        with self.lock():
            shutil.rmtree(self.path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise Conflict(f"workspace {self.name!r} is being ingested by another process") from exc
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- contents ----------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = json.loads((self.path / "manifest.json").read_text(encoding="utf-8"))
        return self._manifest

    def save_manifest(self, manifest: dict) -> None:
        manifest["updated"] = _now()
        _write_atomic(self.path / "manifest.json", json.dumps(manifest, indent=1))
        self._manifest = manifest

    @property
    def version(self) -> str:
        """Changes whenever the passages change: retrievers key their on-disk caches by it."""
        return self.manifest.get("corpus_hash", "")

    def chunks(self) -> list[Chunk]:
        if self._chunks is None:
            out = []
            with open(self.path / "chunks.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        out.append(Chunk(**json.loads(line)))
            self._chunks = out
        return self._chunks

    def index_dir(self, retriever: str) -> Path:
        """A folder a retriever may keep its index in (created on demand)."""
        folder = self.path / "index" / retriever
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def files(self) -> dict[str, dict]:
        return self.manifest.get("files", {})

    def info(self) -> dict:
        m = self.manifest
        return {
            "name": self.name, "path": str(self.path), "created": m.get("created"), "updated": m.get("updated"),
            "roots": m.get("roots", []), "files": len(m.get("files", {})), "chunks": m.get("chunks", 0),
            "chars": m.get("chars", 0), "chunking": m.get("chunking"), "context": m.get("context"),
            "mode": "context" if m.get("context") else "retrieval-only",
            "retrieval_only_reason": None if m.get("context") else m.get("retrieval_only_reason"),
        }

    # -- ingest ------------------------------------------------------------------------------
    def ingest(self, roots: list[str], globs: tuple[str, ...] = (), max_chars: int | None = None,
               overlap: int | None = None, progress: Progress | None = None) -> IngestReport:
        """Sync the workspace with ``roots``: add new files, re-read changed ones, drop the
        ones deleted (or now ignored) under those roots. With no roots, re-sync the recorded ones."""
        started = time.perf_counter()
        report = IngestReport(self.name)
        with self.lock():
            self._manifest, self._chunks = None, None
            manifest = self.manifest
            chunking = dict(manifest.get("chunking") or {})
            chunking["max_chars"] = int(max_chars or chunking.get("max_chars") or DEFAULT_MAX_CHARS)
            chunking["overlap"] = int(overlap if overlap is not None else chunking.get("overlap", DEFAULT_OVERLAP))
            if chunking["max_chars"] < 100 or chunking["overlap"] < 0 or chunking["overlap"] >= chunking["max_chars"]:
                raise InvalidRequest("chunk size must be >= 100 characters and overlap in [0, chunk size)")
            rechunk_all = chunking != manifest.get("chunking")

            recorded = {r["path"]: r for r in manifest.get("roots", [])}
            if roots:
                targets = [{"path": os.path.abspath(os.path.expanduser(r)), "globs": list(globs)} for r in roots]
            else:
                if not recorded:
                    raise InvalidRequest(f"workspace {self.name!r} has no documents yet: name a PATH to ingest")
                targets = [{"path": r["path"], "globs": r.get("globs", [])} for r in recorded.values()
                           if os.path.exists(r["path"])]
                recorded = {t["path"]: t for t in targets}  # a root deleted from disk is forgotten
            for target in targets:
                recorded[target["path"]] = target

            found: dict[str, Path] = {}
            for target in targets:
                result = walk([Path(target["path"])], tuple(target["globs"]))
                report.skipped.update(result.skipped)
                for f in result.files:
                    found.setdefault(str(f.path), f.path)

            old_files: dict[str, dict] = manifest.get("files", {})
            old_chunks: dict[str, list[Chunk]] = {}
            for chunk in self.chunks():
                old_chunks.setdefault(chunk.path, []).append(chunk)

            def under_targets(path: str) -> bool:
                return any(path == t["path"] or path.startswith(t["path"].rstrip(os.sep) + os.sep) for t in targets)

            new_files: dict[str, dict] = {}
            new_pieces: dict[str, list[tuple[int, int, str, str | None]]] = {}
            # Files kept from other roots (still on disk) are carried over untouched.
            for path, meta in old_files.items():
                if path in found:
                    continue
                if under_targets(path) or not os.path.exists(path):
                    report.removed.append(path)
                else:
                    found_meta = dict(meta)
                    new_files[path] = found_meta
            total = len(found)
            for done, (path, p) in enumerate(sorted(found.items()), start=1):
                if progress:
                    progress(done, total, path)
                try:
                    data = p.read_bytes()
                except OSError as exc:
                    report.skipped[path] = f"unreadable ({exc.strerror})"
                    if path in old_files:
                        report.removed.append(path)
                    continue
                digest = file_hash(data)
                old = old_files.get(path)
                stat = p.stat()
                if (old and old.get("sha256") == digest and not rechunk_all
                        and len(old_chunks.get(path, ())) == old.get("chunks")):
                    report.unchanged += 1
                    new_files[path] = old
                    continue
                try:
                    lines, kind, encoding = read_lines(p, data)
                except Exception as exc:  # a malformed PDF must not stop the ingest
                    report.skipped[path] = f"unreadable ({type(exc).__name__}: {exc})".splitlines()[0]
                    if old:
                        report.removed.append(path)
                    continue
                pieces = chunk_lines(lines, chunking["max_chars"], chunking["overlap"])
                new_pieces[path] = [(pc.start, pc.end, pc.text, pc.section) for pc in pieces]
                (report.updated if old else report.added).append(path)
                new_files[path] = {"sha256": digest, "size": stat.st_size, "mtime": stat.st_mtime, "kind": kind,
                                   "encoding": encoding, "lines": lines[-1][0] if lines else 0,
                                   "chunks": len(pieces)}

            # Rewrite the passages: ids are positions in chunks.jsonl.
            records: list[Chunk] = []
            for path in sorted(new_files):
                if path in new_pieces:
                    for start, end, text, section in new_pieces[path]:
                        records.append(Chunk(len(records), path, start, end, text, section))
                else:
                    for c in old_chunks.get(path, []):
                        records.append(Chunk(len(records), c.path, c.start, c.end, c.text, c.section))
            corpus = hashlib.sha256()
            for path in sorted(new_files):
                corpus.update(f"{path}\0{new_files[path]['sha256']}\n".encode())
            corpus.update(json.dumps(chunking, sort_keys=True).encode())

            _write_atomic(self.path / "chunks.jsonl",
                          "".join(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in records))
            manifest["roots"] = sorted(recorded.values(), key=lambda r: r["path"])
            manifest["files"] = new_files
            manifest["chunking"] = chunking
            manifest["chunks"] = len(records)
            manifest["chars"] = sum(len(c.text) for c in records)
            manifest["corpus_hash"] = corpus.hexdigest()[:32]
            self.save_manifest(manifest)
            self._chunks = records

        report.files = len(new_files)
        report.chunks = len(records)
        report.chars = manifest["chars"]
        report.seconds = time.perf_counter() - started
        return report

    def set_context(self, context: dict | None, reason: str | None = None) -> None:
        """Record the context snapshot; or none, with the ``reason`` questions are retrieval-only."""
        with self.lock():
            self._manifest = None
            manifest = self.manifest
            manifest["context"] = context
            manifest["retrieval_only_reason"] = None if context else reason
            self.save_manifest(manifest)
