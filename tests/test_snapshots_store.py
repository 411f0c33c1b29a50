"""SnapshotStore on real files: atomic writes, hashes, ids, metadata, export/import.

No model is needed: tensors are made up, the model identity is a dict.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from superlinear.errors import Conflict, InvalidRequest, NotFound, TooLarge, UserError
from superlinear.sessions import CorruptSnapshot, ModelMismatch, SnapshotStore, check_model, tensorfile
from superlinear.sessions.snapshots import MANIFEST, TENSORS, TRANSCRIPT

MODEL = {"name": "tiny-a", "fingerprint": "a" * 64}
OTHER = {"name": "tiny-b", "fingerprint": "b" * 64}
REPO = Path(__file__).resolve().parents[1]


def make_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.k": torch.randn(1, 2, 7, 4, generator=g).to(torch.bfloat16),
        "layers.0.v": torch.randn(1, 2, 7, 4, generator=g).to(torch.float16),
        "token_ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5),
    }


def save(store, **kw):
    args = dict(model=MODEL, session={"position": 7, "max_seq_len": 16, "message_count": 2},
                transcript={"messages": [{"role": "user", "content": "héllo ☃"}]}, tensors=make_tensors())
    args.update(kw)
    return store.save(**args)


@pytest.fixture
def store(tmp_path):
    return SnapshotStore(tmp_path / "snaps")


def test_round_trip_and_manifest(store):
    m = save(store, title="first", description="d", tags=["x", "y", "x"], snapshot_id="s1")
    assert m["id"] == "s1" and m["schema_version"] == 1
    assert m["tags"] == ["x", "y"]
    assert set(m["files"]) == {TRANSCRIPT, TENSORS}
    d = store.root / "s1"
    assert sorted(p.name for p in d.iterdir()) == sorted([MANIFEST, TRANSCRIPT, TENSORS])
    on_disk = json.loads((d / MANIFEST).read_text())
    assert on_disk == m
    manifest, transcript, tensors = store.read("s1")
    assert transcript["messages"][0]["content"] == "héllo ☃"
    want = make_tensors()
    assert set(tensors) == set(want)
    for k, v in want.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k
    # the file is a standard safetensors file
    from safetensors import safe_open

    with safe_open(str(d / TENSORS), framework="pt") as f:
        assert set(f.keys()) == set(want)
    assert [x["id"] for x in store.list()] == ["s1"]
    assert store.get("s1")["title"] == "first"
    assert store.bytes("s1") == sum(f["bytes"] for f in m["files"].values())


def test_generated_ids_and_duplicates(store):
    a = save(store)
    b = save(store)
    assert a["id"] != b["id"] and a["id"].startswith("snap-")
    with pytest.raises(Conflict, match="already exists"):
        save(store, snapshot_id=a["id"])
    assert [m["id"] for m in store.list()] == [a["id"], b["id"]]


@pytest.mark.parametrize("bad", ["../x", "..", "/", "/etc", "a/b", "", ".hidden", "a\\b", "x y",
                                 "a..b", "é", "x" * 129, "-lead", "a\nb", "a\x00b"])
def test_bad_ids_refused(store, bad, tmp_path):
    save(store, snapshot_id="ok")
    for call in (lambda: save(store, snapshot_id=bad), lambda: store.get(bad), lambda: store.read(bad),
                 lambda: store.delete(bad), lambda: store.patch(bad, title="t"),
                 lambda: store.export(bad, tmp_path)):
        with pytest.raises(InvalidRequest, match="id"):
            call()
    exported = store.export("ok", tmp_path)
    with pytest.raises(InvalidRequest):
        store.import_(exported, snapshot_id=bad)
    assert not (tmp_path / "x").exists()
    assert [m["id"] for m in store.list()] == ["ok"]


def test_missing_is_not_found(store):
    for call in (lambda: store.get("nope"), lambda: store.read("nope"), lambda: store.delete("nope"),
                 lambda: store.patch("nope", title="x")):
        with pytest.raises(NotFound, match="nope"):
            call()
    assert store.list() == []  # root does not even exist yet


def test_patch_delete(store):
    save(store, snapshot_id="s", title="a", tags=["t1"])
    before = store.verify("s")
    m = store.patch("s", title="b", description="long text", add_tags=["t2"])
    assert (m["title"], m["description"], m["tags"]) == ("b", "long text", ["t1", "t2"])
    m = store.patch("s", remove_tags=["t1"])
    assert m["tags"] == ["t2"]
    m = store.patch("s", tags=[])
    assert m["tags"] == [] and store.get("s")["title"] == "b"
    assert m["created_at"] == before["created_at"] and m["files"] == before["files"]
    assert sorted(p.name for p in (store.root / "s").iterdir()) == sorted([MANIFEST, TRANSCRIPT, TENSORS])
    store.read("s")  # still valid
    with pytest.raises(InvalidRequest):
        store.patch("s", tags=["ok", ""])
    with pytest.raises(InvalidRequest):
        store.patch("s", title="x" * 1000)
    assert store.list(tag="t2") == []
    store.patch("s", tags=["t2"])
    assert [x["id"] for x in store.list(tag="t2")] == ["s"]
    store.delete("s")
    assert store.list() == [] and list(store.root.iterdir()) == []
    with pytest.raises(NotFound):
        store.read("s")


def test_replace_is_atomic_and_interrupted_replace_is_recovered(store):
    save(store, snapshot_id="s", title="old")
    save(store, snapshot_id="s", title="new", replace=True)
    assert store.get("s")["title"] == "new"
    assert [p.name for p in store.root.iterdir()] == ["s"]
    # a replace cut short after the old one was moved aside: cleanup puts it back
    os.rename(store.root / "s", store.root / ".old.999999999.abcd.s")
    assert store.list() == []
    assert SnapshotStore(store.root).get("s")["title"] == "new"


def test_new_files_get_xxh3_and_older_sha256_snapshots_still_load(store):
    import hashlib

    import xxhash

    m = save(store, snapshot_id="s")
    d = store.root / "s"
    for name, entry in m["files"].items():  # new snapshots: XXH3-128 of every file
        assert set(entry) == {"xxh3_128", "bytes"}
        assert entry["xxh3_128"] == xxhash.xxh3_128((d / name).read_bytes()).hexdigest()
    # a snapshot an older spl wrote: SHA-256 entries. It is read, checked with SHA-256.
    old = json.loads((d / MANIFEST).read_text())
    old["files"] = {name: {"sha256": hashlib.sha256((d / name).read_bytes()).hexdigest(),
                           "bytes": entry["bytes"]} for name, entry in old["files"].items()}
    (d / MANIFEST).write_text(json.dumps(old))
    manifest, transcript, tensors = SnapshotStore(store.root).read("s")
    assert transcript["messages"][0]["content"] == "héllo ☃" and set(tensors) == set(make_tensors())
    _corrupt(d / TENSORS, "flip")  # and a damaged old one is still refused, by its SHA-256
    with pytest.raises(CorruptSnapshot, match="sha256 hash of"):
        SnapshotStore(store.root).read("s")


def _corrupt(path: Path, how: str):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = len(data) - 3
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize("name,how,msg", [
    (TENSORS, "truncate", "truncated or edited"),
    (TENSORS, "flip", "xxh3_128 hash"),
    (TRANSCRIPT, "flip", "xxh3_128 hash"),
    (TENSORS, "delete", "missing"),
])
def test_corrupted_files_refused(store, name, how, msg):
    save(store, snapshot_id="s")
    _corrupt(store.root / "s" / name, how)
    with pytest.raises(CorruptSnapshot, match=msg) as err:
        store.read("s")
    assert "'s'" in err.value.message and name in err.value.message
    assert isinstance(err.value, UserError) and err.value.http_status == 400
    with pytest.raises(CorruptSnapshot):
        store.export("s", store.root.parent)
    # the store itself keeps working
    save(store, snapshot_id="t")
    store.read("t")


def test_broken_manifest(store):
    save(store, snapshot_id="s")
    save(store, snapshot_id="t")
    (store.root / "s" / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptSnapshot, match="manifest.json"):
        store.read("s")
    assert [m["id"] for m in store.list()] == ["t"]
    broken = [m for m in store.list(include_broken=True) if "error" in m]
    assert [m["id"] for m in broken] == ["s"]
    store.delete("s")  # a damaged snapshot can still be deleted
    m = json.loads((store.root / "t" / MANIFEST).read_text())
    m["schema_version"] = 99
    (store.root / "t" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(InvalidRequest, match="newer"):
        store.read("t")


def test_model_mismatch_names_both(store):
    save(store, snapshot_id="s")
    store.read("s", model=MODEL)
    with pytest.raises(ModelMismatch) as err:
        store.read("s", model=OTHER)
    assert "tiny-a" in err.value.message and "tiny-b" in err.value.message
    assert err.value.http_status == 409
    with pytest.raises(ModelMismatch):
        check_model(store.get("s"), OTHER)


def test_export_import_round_trip(store, tmp_path):
    save(store, snapshot_id="s", title="t", tags=["a"])
    f = store.export("s", tmp_path)
    assert f.name == "s.spl-snapshot.tar" and f.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    other = SnapshotStore(tmp_path / "elsewhere")
    m = other.import_(f)
    assert m["id"] == "s" and m["title"] == "t" and m["tags"] == ["a"]
    _, transcript, tensors = other.read("s", model=MODEL)
    _, transcript0, tensors0 = store.read("s")
    assert transcript == transcript0
    assert all(torch.equal(tensors[k], tensors0[k]) for k in tensors0)
    with pytest.raises(Conflict):
        other.import_(f)
    m2 = other.import_(f, snapshot_id="s-copy")
    assert m2["id"] == "s-copy" and other.get("s-copy")["id"] == "s-copy"
    other.read("s-copy")
    explicit = store.export("s", tmp_path / "named.tar")
    assert explicit == tmp_path / "named.tar"


def _tar_with(path: Path, entries: dict[str, bytes], symlink: str | None = None):
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)


def test_import_refuses_tampered_and_hostile_files(store, tmp_path):
    save(store, snapshot_id="s")
    f = store.export("s", tmp_path)
    files = {}
    with tarfile.open(f) as tar:
        for m in tar:
            files[m.name] = tar.extractfile(m).read()
    def refused(name: str, entries: dict, match: str, **tar_options) -> None:
        _tar_with(tmp_path / f"{name}.tar", entries, **tar_options)
        with pytest.raises(CorruptSnapshot, match=match):
            store.import_(tmp_path / f"{name}.tar", snapshot_id=name)

    data = files["s/" + TENSORS]
    refused("bad", {**files, "s/" + TENSORS: data[:-1] + bytes([data[-1] ^ 1])}, "hash of")  # tampered tensors
    refused("evil", {**files, "s/../../evil": b"x"}, "unexpected entry")  # path traversal inside the tar
    refused("link", files, "unexpected entry", symlink="s/link")
    refused("extra", {**files, "s/extra.bin": b"x"}, "does not list")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(CorruptSnapshot):
        store.import_(tmp_path / "junk.tar")
    with pytest.raises(NotFound):
        store.import_(tmp_path / "missing.tar")
    assert not (tmp_path.parent / "evil").exists()
    assert [m["id"] for m in store.list()] == ["s"]
    assert [p.name for p in store.root.iterdir()] == ["s"]  # no temp dirs left over


def _export_files(store, tmp_path) -> dict[str, bytes]:
    save(store, snapshot_id="s")
    with tarfile.open(store.export("s", tmp_path)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _gz_tar(path: Path, entries: list[tuple[str, bytes, dict | None]]) -> Path:
    """A gzip-compressed tar of ``(name, data, pax_headers)``: zeros compress a thousandfold."""
    import io

    with tarfile.open(path, "w:gz", compresslevel=1, format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:
                info.pax_headers = pax
            tar.addfile(info, io.BytesIO(data))
    return path


def test_deeply_nested_manifest_is_refused_not_a_crash(store, tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    _tar_with(tmp_path / "deep.tar", {"d/" + MANIFEST: deep})
    with pytest.raises(CorruptSnapshot, match="nested too deeply"):
        store.import_(tmp_path / "deep.tar")
    (store.root / "deep").mkdir(parents=True)
    (store.root / "deep" / MANIFEST).write_bytes(deep)
    with pytest.raises(CorruptSnapshot, match="nested too deeply"):
        store.get("deep")
    (store.root / "deep" / MANIFEST).write_bytes(b" " * (17 << 20))
    with pytest.raises(CorruptSnapshot, match="over"):
        store.get("deep")


def test_compressed_import_never_expands_past_what_the_manifest_declares(store, tmp_path):
    files = _export_files(store, tmp_path)
    manifest = json.loads(files["s/" + MANIFEST])
    # a member far larger than declared: refused from its header, before a byte of it is written
    bomb = _gz_tar(tmp_path / "bomb.tar.gz", [("s/" + MANIFEST, files["s/" + MANIFEST], None),
                                              ("s/" + TENSORS, bytes(64 << 20), None)])
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CorruptSnapshot, match="the manifest declares"):
        store.import_(bomb)
    # headers expand too: a huge pax header before the manifest is refused while it is read
    pax = _gz_tar(tmp_path / "pax.tar.gz", [("s/" + MANIFEST, files["s/" + MANIFEST], {"comment": "x" * (24 << 20)}),
                                            *[(n, d, None) for n, d in files.items() if not n.endswith(MANIFEST)]])
    with pytest.raises(CorruptSnapshot, match="expands past"):
        store.import_(pax)
    # the manifest must come first (nothing is written before it is known)
    later = _gz_tar(tmp_path / "later.tar.gz", [(n, d, None) for n, d in reversed(files.items())])
    with pytest.raises(CorruptSnapshot, match="first entry"):
        store.import_(later)
    # more than the disk holds: refused before anything but the manifest is written
    manifest["files"][TENSORS]["bytes"] = 1 << 60
    huge = _gz_tar(tmp_path / "huge.tar.gz", [("s/" + MANIFEST, json.dumps(manifest).encode(), None)])
    with pytest.raises(TooLarge, match="bytes free"):
        store.import_(huge)
    assert [p.name for p in store.root.iterdir()] == ["s"]  # nothing left behind
    other = SnapshotStore(tmp_path / "other")  # a well-formed compressed export still imports
    good = _gz_tar(tmp_path / "good.tar.gz", [(n, d, None) for n, d in files.items()])
    assert other.import_(good)["id"] == "s"
    other.read("s", model=MODEL)


def test_an_import_never_takes_the_disk_below_the_reserve(store, tmp_path, monkeypatch):
    """The repro: a bz2 upload of under a KiB declaring almost all the free space in zeros (with a
    wrong hash) was written in full before its hash was checked. With the room (free space less
    $SPL_STORE_RESERVE_BYTES) at 1 GiB: what declares more is refused before a byte of it is
    written; what fits is hashed as it is unpacked and refused, leaving nothing."""
    import bz2
    import io
    import shutil

    files = _export_files(store, tmp_path)
    manifest = json.loads(files["s/" + MANIFEST])
    monkeypatch.setenv("SPL_STORE_RESERVE_BYTES", str(shutil.disk_usage(store.root).free - (1 << 30)))

    def bomb(name: str, declared: int, data: int) -> Path:
        manifest["files"][TENSORS] = {"bytes": declared, "xxh3_128": "0" * 32}
        with bz2.open(tmp_path / name, "wb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
            for entry, size, source in ((MANIFEST, None, json.dumps(manifest).encode()), (TENSORS, data, None)):
                info = tarfile.TarInfo("s/" + entry)
                info.size = len(source) if size is None else size
                tar.addfile(info, io.BytesIO(source if size is None else bytes(size)))
        return tmp_path / name

    big = bomb("big.tar.bz2", 4 << 30, 0)
    assert big.stat().st_size < 1024
    with pytest.raises(TooLarge, match="SPL_STORE_RESERVE_BYTES"):
        store.import_(big)
    with pytest.raises(CorruptSnapshot, match="hash of tensors.safetensors does not match"):
        store.import_(bomb("fits.tar.bz2", 32 << 20, 32 << 20))
    assert [p.name for p in store.root.iterdir()] == ["s"]  # nothing left behind


def test_leftover_temp_dirs_ignored_and_cleaned(store):
    save(store, snapshot_id="s")
    dead = store.root / ".tmp.999999999.0123456789ab"
    dead.mkdir()
    (dead / TENSORS).write_bytes(b"partial")
    live = store.root / f".tmp.{os.getpid()}.0123456789ab"
    live.mkdir()
    stray = store.root / "stray-file"
    stray.write_text("x")
    assert [m["id"] for m in store.list()] == ["s"]
    fresh = SnapshotStore(store.root)
    assert not dead.exists()
    assert live.exists()  # a live writer's directory is never touched
    assert [m["id"] for m in fresh.list()] == ["s"]


CHILD = textwrap.dedent("""
    import sys, time, torch
    from superlinear.sessions import SnapshotStore, tensorfile
    tensorfile.CHUNK_BYTES = 1 << 20
    orig = tensorfile._write
    def slow(f, data, digest):
        orig(f, data, digest)
        f.flush()
        time.sleep(0.01)
    tensorfile._write = slow
    store = SnapshotStore(sys.argv[1])
    store.save(model={"name": "m", "fingerprint": "f" * 64},
               session={"position": 1, "max_seq_len": 2, "message_count": 1},
               transcript={"messages": []}, tensors={"big": torch.ones(64 << 18)}, snapshot_id="big")
    print("saved", flush=True)
""")


def test_kill_during_save_leaves_store_consistent(store, tmp_path):
    save(store, snapshot_id="before")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(store.root)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    partial = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            temps = [p for p in store.root.iterdir() if p.name.startswith(".tmp.")]
            files = [p / TENSORS for p in temps if (p / TENSORS).exists()]
            if files and files[0].stat().st_size > (8 << 20):
                partial = files[0]
                break
            time.sleep(0.005)
        assert partial is not None, proc.communicate()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert partial.exists() and partial.stat().st_size < (64 << 20)  # killed mid-write
    # the half-written snapshot is invisible; the old one is intact
    assert [m["id"] for m in store.list()] == ["before"]
    with pytest.raises(NotFound):
        store.read("big")
    store.read("before")
    # a new store (e.g. the server restarting) removes the dead writer's leftovers
    fresh = SnapshotStore(store.root)
    assert [p.name for p in fresh.root.iterdir()] == ["before"]
    save(fresh, snapshot_id="big")  # the id is free
    fresh.read("big")


def test_read_transcript_only(store):
    save(store, snapshot_id="s")
    assert store.read_transcript("s")["messages"][0]["content"] == "héllo ☃"
    _corrupt(store.root / "s" / TENSORS, "flip")
    assert store.read_transcript("s")["messages"]  # the tensors are not needed (nor checked)
    _corrupt(store.root / "s" / TRANSCRIPT, "flip")
    with pytest.raises(CorruptSnapshot, match="hash of"):
        store.read_transcript("s")


def test_concurrent_saves_and_patches(store):
    import threading

    errors = []

    def work(i):
        try:
            save(store, snapshot_id=f"s{i}")
            for k in range(5):
                store.patch(f"s{i}", title=f"t{k}", add_tags=[f"k{k}"])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(m["id"] for m in store.list()) == sorted(f"s{i}" for i in range(8))
    for i in range(8):
        m = store.verify(f"s{i}")
        assert m["title"] == "t4" and m["tags"] == [f"k{k}" for k in range(5)]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]


def test_disk_errors_are_clear(store, tmp_path, monkeypatch):
    import errno

    from superlinear.errors import Unavailable
    from superlinear.sessions import tensorfile

    save(store, snapshot_id="s")
    with pytest.raises(NotFound, match="no directory"):
        store.export("s", tmp_path / "missing" / "x.tar")

    def full(f, data, digest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorfile, "_write", full)
    with pytest.raises(Unavailable, match="disk is full"):
        save(store, snapshot_id="t")
    assert [p.name for p in store.root.iterdir()] == ["s"]  # nothing half-written left


def test_views_into_a_preallocated_cache_are_written_without_a_copy(store):
    """The writer streams non-contiguous views (KV trimmed to the position) block by block."""
    cache = torch.randn(1, 3, 4096, 64)
    view = cache[:, :, :1000]
    assert not view.is_contiguous()
    odd = torch.randn(64, 64).t()  # transposed: no contiguous suffix, copied once
    save(store, snapshot_id="v", tensors={"kv": view, "odd": odd, "step": torch.arange(20)[::2]})
    _, _, tensors = store.read("v")
    assert torch.equal(tensors["kv"], view) and torch.equal(tensors["odd"], odd)
    assert torch.equal(tensors["step"], torch.arange(0, 20, 2))


def test_reserved_tags_are_refused_and_dropped_on_import(store, tmp_path):
    from superlinear.sessions.snapshots import SESSION_STATE_TAG

    for tags in ([SESSION_STATE_TAG], ["ok", "spl:anything"], SESSION_STATE_TAG):
        with pytest.raises(InvalidRequest, match="reserved") as e:
            save(store, tags=tags)
        assert e.value.param == "tags"
    save(store, snapshot_id="mine", tags=["ok"])
    for change in ({"tags": [SESSION_STATE_TAG]}, {"add_tags": ["spl:x"]}):
        with pytest.raises(InvalidRequest, match="reserved"):
            store.patch("mine", **change)
    assert store.get("mine")["tags"] == ["ok"]
    # a file carrying the tag (an exported session journal, or edited by hand) imports as a user snapshot
    path = store.export("mine", tmp_path)
    with tarfile.open(path) as tar:
        files = {m.name.split("/")[1]: tar.extractfile(m).read() for m in tar if m.isfile()}
    manifest = json.loads(files[MANIFEST])
    manifest["tags"] = ["ok", SESSION_STATE_TAG]
    files[MANIFEST] = json.dumps(manifest).encode()
    tagged = tmp_path / "tagged.tar"
    _tar_with(tagged, {f"mine/{k}": v for k, v in files.items()})
    assert store.import_(tagged, snapshot_id="imported")["tags"] == ["ok"]
    assert store.get("imported")["tags"] == ["ok"] and store.list(tag=SESSION_STATE_TAG) == []


def test_import_never_replaces_a_session_state(store, tmp_path):
    """``replace=True`` onto a session's own journal would leave the live session writing
    manifests that name files it lost: refused (409), the journal untouched."""
    save(store, snapshot_id="user")
    state = save(store, snapshot_id="session-s1")
    manifest = dict(state, tags=["spl:session-state"])  # the tag a session's journal carries
    tensorfile.write_manifest(store.root / "session-s1", manifest)
    path = store.export("user", tmp_path)
    with pytest.raises(Conflict, match="saved state of a session"):
        store.import_(path, snapshot_id="session-s1", replace=True)
    assert store.get("session-s1")["tags"] == ["spl:session-state"]
    assert store.import_(path, snapshot_id="user", replace=True)["id"] == "user"  # a user snapshot: replaced


def test_import_errors_name_the_file_in_one_line(store, tmp_path):
    text = tmp_path / "hostname"
    text.write_text("myhost\n")
    for name, expect in ((None, str(text)), ("the upload", "the upload")):
        with pytest.raises(CorruptSnapshot) as e:
            store.import_(text, name=name)
        assert e.value.message.startswith(f"{expect} is not a snapshot export") and "\n" not in e.value.message


@pytest.fixture
def read_only_store(tmp_path):
    """A store whose directory cannot be written: a read-only bind mount (root), or no write
    permission (anyone else)."""
    root = tmp_path / "ro"
    store = SnapshotStore(root)
    save(store, snapshot_id="s")
    if os.geteuid() != 0:
        root.chmod(0o555)
        (root / "s").chmod(0o555)
        yield store
        (root / "s").chmod(0o755)
        root.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(root), str(root)], capture_output=True).returncode == 0
    if not mounted or subprocess.run(["mount", "-o", "remount,bind,ro", str(root)],
                                     capture_output=True).returncode != 0:
        if mounted:
            subprocess.run(["umount", str(root)])
        pytest.skip("root without the right to mount: cannot make a directory read-only")
    try:
        yield store
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_delete_and_patch_on_a_read_only_disk_are_503(read_only_store):
    from superlinear.errors import Unavailable

    for action in (lambda: read_only_store.delete("s"), lambda: read_only_store.patch("s", title="new")):
        with pytest.raises(Unavailable) as e:
            action()
        assert e.value.http_status == 503 and e.value.code == "snapshot_write_failed"
    assert read_only_store.get("s")["title"] == ""  # unchanged, still there
