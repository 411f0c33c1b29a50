"""Session journals: a session's own state on disk, written incrementally after every change.

A journal is a snapshot directory of the store (``<root>/session-<id>/``, tag
``spl:session-state``) whose KV cache is split into **segments** by position, so persisting a
session after a turn writes only the rows appended since the last persist::

    <root>/session-s1/
      manifest.json                              schema_version 2, "format": "spl-journal",
                                                 "generation", "segments", "meta", "state", files
      seg-<start>-<end>-<rand>.safetensors       KV rows [start, end) of every attention layer
                                                 (layers.<i>.key / .value [1, heads, end-start, dim])
                                                 and conversation.token_ids [end-start] int64
      state-<generation>-<rand>.safetensors      small: next-token logits, recurrent (Mamba) state
      ckpt-<position>-<rand>.safetensors         a hybrid's recurrent checkpoint at a message boundary
      meta-<generation>-<rand>.json              the conversation meta (transcript, boundaries, ...)

Every file is listed in ``manifest["files"]`` with its size and hash (the store's usual check),
and the segments cover ``[0, position)`` without gaps.

A persist (``Persistence.persist``): new files get fresh names, are written and fsynced, the directory is
fsynced, then the manifest is written to a temporary file, fsynced and renamed over
``manifest.json`` (atomic), the directory fsynced again, and only then the files the new
manifest no longer lists are deleted. A crash at any point leaves the previous or the new
manifest, each complete; files of a cut-short persist are not in any manifest and are removed
by the next persist. A rollback below the persisted position drops the segments past it; the
one it cuts is rewritten up to the current position. The first persist of a session (or one
whose conversation was replaced, e.g. by a snapshot load) writes a whole journal through the
store's atomic publish (temporary directory, rename). Past ``MAX_SEGMENTS`` segments the
journal is rewritten as one segment.

Reading (``read``) checks the model and every file's hash first (``CorruptSnapshot`` names the
file), then assembles the same ``(meta, tensors)`` a single-file snapshot holds.

What a snapshot (journal or single file) holds of a conversation is ``export``'s ``(meta,
tensors)``: the conversation's own state (``Conversation.state_tensors()``: KV trimmed to the
position, recurrent state, token ids, last logits) plus, for hybrid (Mamba) models, the
recurrent-state checkpoints at message boundaries (``recurrent.<position>.<name>``), so a loaded
hybrid session can still roll back without replaying its whole history; ``restore`` rebuilds the
conversation from them.

``Persistence`` keeps the sessions durable with it: ``persist`` after every turn and change,
``evict`` to free an idle session's memory, ``persist_all`` on shutdown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import weakref
from pathlib import Path

from superlinear.errors import InvalidRequest, NotFound
from superlinear.sessions.manifest import CorruptSnapshot, disk_error, model_identity, spl_version
from superlinear.sessions.memory import free_memory

from . import tensorfile

log = logging.getLogger(__name__)

# A session's own journal carries this tag (hidden from listings, restored as a session on start,
# deleted with the session); tags starting with ``spl:`` are spl's own.
SESSION_STATE_TAG = "spl:session-state"
FORMAT = "spl-journal"
SCHEMA_VERSION = 2
MAX_SEGMENTS = 256
_KV_RE = re.compile(r"layers\.\d+\.(key|value)")
_CKPT_PREFIX = "recurrent."
_CKPT_RE = re.compile(r"recurrent\.(\d+)\.(.+)")  # export's recurrent.<position>.<name>
IDS = "conversation.token_ids"


class Tracker:
    """What a session's journal on disk holds, to know what the next persist must write: the
    conversation it mirrors (weakly), the token ids persisted, the conversation's edit counter
    at that time, and the manifest written."""

    def __init__(self, conv, snapshot_id: str, manifest: dict):
        self.conv = weakref.ref(conv)
        self.snapshot_id = snapshot_id
        self.manifest = manifest
        self.ids = conv.token_ids
        self.edit_seq = conv.edit_count
        self.meta_bytes: bytes | None = None

    @property
    def position(self) -> int:
        return int(self.manifest["session"]["position"])

    def valid_prefix(self, conv) -> int:
        """Rows of the persisted KV that are still what the cache holds: the common token prefix,
        capped by the lowest position the cache was truncated to since (rows past it may have
        been recomputed)."""
        from superlinear.engine.conversation import common_token_prefix

        valid = common_token_prefix(self.ids, conv.token_ids)
        lowest = conv.lowest_edit_since(self.edit_seq)
        if lowest is not None:
            valid = min(valid, lowest)
        return max(0, min(valid, self.position))


def meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()


def split(meta: dict, tensors: dict) -> tuple[dict, object, dict, dict]:
    """``export`` output -> (kv tensors, token ids tensor, small tensors, recurrent checkpoints
    ``{position: {name: tensor}}``)."""
    kv = {k: v for k, v in tensors.items() if _KV_RE.fullmatch(k)}
    ids = tensors.get(IDS)
    checkpoints: dict[int, dict] = {}
    small = {}
    for k, v in tensors.items():
        if k in kv or k == IDS:
            continue
        m = _CKPT_RE.fullmatch(k)
        if m:
            checkpoints.setdefault(int(m.group(1)), {})[m.group(2)] = v
        else:
            small[k] = v
    small.update({k: v[:, :, :0] for k, v in kv.items()})  # 0 rows: names, shapes, dtypes for reading
    return kv, ids, small, checkpoints


def _segment_tensors(kv: dict, ids, start: int, end: int) -> dict:
    out = {name: t[:, :, start:end] for name, t in kv.items()}
    if ids is not None:
        out[IDS] = ids[start:end]
    return out


def _segment_name(start: int, end: int) -> str:
    return f"seg-{start:010d}-{end:010d}-{secrets.token_hex(4)}.safetensors"


def state_snapshot_id(session_id: str) -> str:
    """The snapshot id under which a session's own state is kept (eviction, shutdown)."""
    sid = f"session-{session_id}"
    if len(sid) > 128:
        sid = "session-" + hashlib.sha256(session_id.encode()).hexdigest()[:40]
    return sid


def export(conv) -> tuple[dict, dict]:
    """``(meta, tensors)`` of a conversation: meta is JSON (a snapshot's transcript.json)."""
    meta = dict(conv.state_meta())
    # views into the cache: the writer streams them, no second copy on the device
    tensors = dict(conv.state_tensors(copy=False))
    states = conv.recurrent_checkpoints
    if conv.hybrid:
        kept = sorted(p for p in states if 0 < p < conv.position)
        meta["recurrent_checkpoints"] = kept
        for p in kept:
            for name, t in states[p].items():
                tensors[f"{_CKPT_PREFIX}{p}.{name}"] = t
    return meta, tensors


def restore(model, meta: dict, tensors: dict, *, position: int, max_seq_len: int, chunk_size: int | None = None):
    """Rebuild a conversation from ``export``'s output (a snapshot's transcript + tensors)."""
    from superlinear.engine.conversation import Conversation

    tensors = dict(tensors)
    checkpoints: dict[int, dict] = {}
    for key in [k for k in tensors if k.startswith(_CKPT_PREFIX)]:
        pos, _, name = key[len(_CKPT_PREFIX):].partition(".")
        checkpoints.setdefault(int(pos), {})[name] = tensors.pop(key).to(model.device)
    if int(meta.get("position", position)) != position:
        raise InvalidRequest(f"snapshot is inconsistent: manifest position {position}, "
                             f"transcript position {meta.get('position')}")
    kwargs = {"chunk_size": chunk_size} if chunk_size else {}
    conv = Conversation.from_state(model, meta, tensors, max_seq_len, **kwargs)
    if checkpoints and conv.hybrid:
        conv.add_recurrent_checkpoints(checkpoints)
    return conv


class Persistence:
    """Keeps sessions durable: each session's own state is a journal in ``store`` (the
    snapshot ``state_snapshot_id(session id)``, tagged ``SESSION_STATE_TAG``), brought up to date
    by ``persist``. It records on the session what is on disk (``state_snapshot``, ``journal``,
    ``disk_info``, ``last_persist_bytes``, ``persist_error``)."""

    def __init__(self, store, model):
        self.store = store
        self._model = model_identity(model)  # what every manifest names: fixed for the process
        self._version = spl_version()

    def persist(self, session) -> str | None:
        """Make one session durable now (the server calls it after every turn and every change):
        its journal gets only what changed since the last persist — the KV rows appended since
        (``new tokens x kv_bytes_per_token``), a small state file (logits, recurrent state) and
        the transcript — then an atomically replaced manifest. Returns the state snapshot id.
        A failure stays in ``session.persist_error`` (shown by ``info``) until a persist
        succeeds; the journal on disk keeps its last good state."""
        with session.lock:
            if session.closed:
                raise NotFound(f"session {session.id!r} was closed", param="session_id")
            if not session.resident or session.ephemeral:
                return session.state_snapshot
            try:
                sid = self._write(session)
            except Exception as exc:
                session.persist_error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                raise
            session.persist_error = None
            return sid

    def evict(self, session) -> bool:
        """Write an idle session's state out and free its memory. False if it became busy."""
        if not session.lock.acquire(blocking=False):
            return False
        try:
            if session.lock.depth > 1 or not session.resident or session.closed:
                return False  # the calling thread itself holds it
            self.persist(session)
            session.conversation = None
            log.info("session %s evicted to snapshot %s", session.id, session.state_snapshot)
            free_memory()
            return True
        finally:
            session.lock.release()

    def persist_all(self, sessions, timeout: float | None = 30.0) -> list[str]:
        """On a clean shutdown: bring every session's journal up to date, so the next start lists
        them again. Returns the session ids written. A session whose lock cannot be taken within
        ``timeout`` is skipped (and logged)."""
        written = []
        for session in sessions:
            if not session.lock.acquire(timeout=-1 if timeout is None else timeout):
                log.warning("session %s busy at shutdown; its state was not saved", session.id)
                continue
            try:
                if session.closed or session.ephemeral:
                    continue
                self.persist(session)
                written.append(session.id)
            except Exception:  # keep saving the others
                log.exception("could not save session %s", session.id)
            finally:
                session.lock.release()
        return written

    def resume(self, session, manifest: dict) -> None:
        """``session``'s conversation was just loaded back from its state snapshot (``manifest``):
        when that is a journal, the next persist appends to it."""
        session.journal = None
        if is_journal(manifest):
            tracker = Tracker(session.conversation, session.state_snapshot, manifest)
            tracker.meta_bytes = meta_bytes(export(session.conversation)[0])
            session.journal = tracker

    @staticmethod
    def restart(session) -> None:
        """``session`` holds another conversation now (a snapshot loaded over it): the next
        persist writes a whole new journal. The old one stays until then, replaced atomically,
        so a crash in between finds the session as it was, not gone."""
        session.journal = None

    def _state_id(self, session) -> str:
        """The state snapshot id of a session; never one that holds something else (a user's
        snapshot that happens to be called ``session-<id>``)."""
        if session.state_snapshot:
            return session.state_snapshot
        sid = state_snapshot_id(session.id)
        try:
            manifest = self.store.get(sid)
        except NotFound:
            return sid
        except Exception:  # noqa: BLE001 - damaged: do not overwrite it, use another id
            manifest = {}
        if SESSION_STATE_TAG in manifest.get("tags", ()) and manifest.get("session", {}).get("id") == session.id:
            return sid
        return f"{sid[:110]}-{secrets.token_hex(4)}"

    def _write(self, session) -> str:
        """Bring a resident session's journal up to date, writing only what changed since the
        last write."""
        snapshot_id = self._state_id(session)
        tracker, written = self._write_journal(snapshot_id, session.conversation, session_meta(session),
                                               session.journal, title=f"state of session {session.id}")
        session.journal = tracker
        session.state_snapshot = snapshot_id
        session.disk_info = {k: tracker.manifest["session"][k] for k in ("position", "message_count")}
        session.last_persist_bytes = written
        if written:
            log.debug("session %s persisted: %d bytes written, position %d", session.id, written,
                      tracker.position)
        return snapshot_id

    def _write_journal(self, snapshot_id: str, conv, session: dict, tracker: Tracker | None, *,
                       title: str) -> tuple[Tracker, int]:
        """Bring the journal ``snapshot_id`` up to date with ``conv``; returns ``(tracker, bytes
        written)``. ``tracker`` is the previous one (None: write a whole new journal)."""
        meta, tensors = export(conv)
        position = int(session["position"])
        kv, ids, small, checkpoints = split(meta, tensors)
        meta_json = meta_bytes(meta)
        store = self.store
        directory = store.root / snapshot_id
        incremental = (tracker is not None and tracker.conv() is conv and tracker.snapshot_id == snapshot_id
                       and (directory / "manifest.json").is_file()
                       and len(tracker.manifest.get("segments", [])) < MAX_SEGMENTS)
        if incremental:
            valid = tracker.valid_prefix(conv)
            if (valid == tracker.position == position and meta_json == tracker.meta_bytes
                    and tracker.manifest["session"] == session):
                return tracker, 0  # nothing changed
            old = tracker.manifest
            keep = [s for s in old["segments"] if s["end"] <= valid]
            start = keep[-1]["end"] if keep else 0
            # a hybrid's recurrent checkpoint at p depends on the tokens before p only
            kept_ckpts = {p: f for p, f in old.get("checkpoints", {}).items()
                          if int(p) <= valid and int(p) in checkpoints}
        else:
            old, keep, start, kept_ckpts = None, [], 0, {}
        generation = (old["generation"] + 1) if old else 1
        now = tensorfile.now_iso()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": FORMAT,
            "id": snapshot_id,
            "created_at": (old or {}).get("created_at") or now,
            "updated_at": now,
            "model": dict(self._model),
            "session": dict(session),
            "title": title,
            "description": "",
            "tags": [SESSION_STATE_TAG],
            "generation": generation,
            "segments": [dict(s) for s in keep],
            "checkpoints": dict(kept_ckpts),
            "files": {f: old["files"][f] for f in [*(s["file"] for s in keep), *kept_ckpts.values()]} if old else {},
            "spl_version": self._version,
        }
        target = directory if incremental else store.make_temp_dir()
        written = 0
        new_files: list[str] = []  # named before they are written: a write cut short is undone too

        def write_tensors(name: str, tensors: dict, metadata: dict) -> dict:
            new_files.append(name)
            entry = tensorfile.write_safetensors(target / name, tensors, metadata=metadata)
            manifest["files"][name] = entry
            return entry

        try:
            if position > start:
                name = _segment_name(start, position)
                entry = write_tensors(name, _segment_tensors(kv, ids, start, position),
                                      {"format": "spl-journal-segment", "start": start, "end": position})
                manifest["segments"].append({"file": name, "start": start, "end": position})
                written += entry["bytes"]
            for p in sorted(checkpoints):
                if str(p) in kept_ckpts:
                    continue
                name = f"ckpt-{p:010d}-{secrets.token_hex(4)}.safetensors"
                entry = write_tensors(name, checkpoints[p], {"format": "spl-journal-checkpoint", "position": p})
                manifest["checkpoints"][str(p)] = name
                written += entry["bytes"]
            state_name = f"state-{generation:08d}-{secrets.token_hex(4)}.safetensors"
            entry = write_tensors(state_name, small, {"format": "spl-journal-state"})
            manifest["state"] = state_name
            meta_name = f"meta-{generation:08d}-{secrets.token_hex(4)}.json"
            new_files.append(meta_name)
            manifest["files"][meta_name] = tensorfile.write_bytes(target / meta_name, meta_json)
            manifest["meta"] = meta_name
            written += entry["bytes"] + len(meta_json)
            tensorfile.fsync_dir(target)
            tensorfile.write_manifest(target, manifest)  # temp file, fsync, atomic rename
            tensorfile.fsync_dir(target)
            if incremental:
                remove_orphans(target, manifest)
            else:
                store.publish(target, snapshot_id, replace=True)
        except OSError as exc:
            _undo(target, incremental, new_files)
            raise disk_error(f"cannot persist session state {snapshot_id!r} in {store.root}", exc) from exc
        except BaseException:
            _undo(target, incremental, new_files if incremental else [])
            raise
        written += len(json.dumps(manifest, ensure_ascii=False, indent=2)) + 1
        out = Tracker(conv, snapshot_id, manifest)
        out.meta_bytes = meta_json
        return out, written


def session_meta(session) -> dict:
    """What a snapshot's manifest says of the session it holds. ``last_used`` travels with the
    state: a restart lists every session as last used when it was."""
    return {"id": session.id, "position": session.position, "max_seq_len": session.max_seq_len,
            "message_count": session.message_count, "created_at": session.created_at,
            "last_used": session.last_used}


def _undo(target: Path, incremental: bool, new_files: list[str]) -> None:
    if not incremental:
        shutil.rmtree(target, ignore_errors=True)
        return
    try:  # only files the current manifest does not list (it may already be the new one)
        listed = set(json.loads((target / "manifest.json").read_bytes()).get("files", {}))
    except (OSError, ValueError):
        return
    for name in new_files:
        if name not in listed:
            (target / name).unlink(missing_ok=True)


def remove_orphans(directory: Path, manifest: dict) -> list[str]:
    """Delete files of the journal that its manifest does not list (left by a persist that was
    cut short, or dropped by this one). Returns their names."""
    keep = {"manifest.json", *manifest.get("files", {})}
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if entry.name not in keep and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    if removed:
        tensorfile.fsync_dir(directory)
    return removed


def is_journal(manifest: dict) -> bool:
    return manifest.get("format") == FORMAT


def manifest_problem(manifest: dict) -> str | None:
    """Structural checks beyond the store's: segments, state and meta files listed and hashed,
    segments contiguous over [0, position)."""
    files = manifest.get("files", {})
    segments = manifest.get("segments")
    if not isinstance(segments, list) or not isinstance(manifest.get("generation"), int):
        return "lacks valid 'segments' / 'generation'"
    for key in ("state", "meta"):
        if manifest.get(key) not in files:
            return f"does not list its {key} file"
    pos = 0
    for seg in segments:
        if not (isinstance(seg, dict) and seg.get("file") in files and isinstance(seg.get("start"), int)
                and isinstance(seg.get("end"), int)):
            return "has an invalid segment entry"
        if seg["start"] != pos or seg["end"] <= seg["start"]:
            return f"has segments that do not cover the positions contiguously (gap at {pos})"
        pos = seg["end"]
    if pos != int(manifest.get("session", {}).get("position", -1)):
        return f"has segments ending at {pos}, not at the session's position"
    ckpts = manifest.get("checkpoints", {})
    if not isinstance(ckpts, dict) or any(not str(p).isdigit() or f not in files for p, f in ckpts.items()):
        return "has an invalid checkpoint entry"
    return None


def read(directory: Path, manifest: dict, snapshot_id: str, device=None) -> tuple[object, dict]:
    """``(meta, tensors)`` of a verified journal (the caller checked the hashes): KV rows of all
    segments assembled into one tensor per layer (host memory: one copy of the KV)."""
    import torch
    from safetensors import safe_open


    problem = manifest_problem(manifest)
    if problem:
        raise CorruptSnapshot(f"session state {snapshot_id!r}: manifest.json {problem}; it cannot be "
                              "loaded, close the session", param="snapshot_id")
    meta = json.loads((directory / manifest["meta"]).read_bytes())
    tensors = tensorfile.read_safetensors(directory / manifest["state"], device=device)
    for p, name in manifest.get("checkpoints", {}).items():
        for k, v in tensorfile.read_safetensors(directory / name, device=device).items():
            tensors[f"recurrent.{int(p)}.{k}"] = v
    position = int(manifest["session"]["position"])
    templates = {k: v for k, v in tensors.items() if _KV_RE.fullmatch(k)}  # 0-row KV: names, shapes
    kv = {k: torch.empty((*t.shape[:2], position, *t.shape[3:]), dtype=t.dtype, device="cpu")
          for k, t in templates.items()}
    ids = torch.empty(position, dtype=torch.int64)
    for seg in manifest["segments"]:
        a, b = seg["start"], seg["end"]
        with safe_open(str(directory / seg["file"]), framework="pt", device="cpu") as f:
            names = set(f.keys())
            if names != set(kv) | {IDS}:
                raise CorruptSnapshot(f"session state {snapshot_id!r}: segment {seg['file']} does not hold "
                                      "the tensors of the journal's state", param="snapshot_id")
            for name in names:
                t = f.get_tensor(name)
                rows = t.shape[0] if name == IDS else t.shape[2]
                if rows != b - a:
                    raise CorruptSnapshot(f"session state {snapshot_id!r}: {name} in {seg['file']} has "
                                          f"{rows} rows, the manifest says {b - a}", param="snapshot_id")
                if name == IDS:
                    ids[a:b] = t
                else:
                    kv[name][:, :, a:b] = t
    tensors.update(kv if device is None else {k: v.to(device) for k, v in kv.items()})
    tensors[IDS] = ids
    return meta, tensors
