"""SessionManager with the real default model: continuation after save/load, fork and rollback,
prefix reuse, memory budget and eviction, durability across a restart, atomic failures.

Greedy decoding is deterministic on one machine, so "the same continuation" is checked as equal
token ids and text. Turns are kept to a few tokens: these tests exercise state handling, not
the model.
"""

from __future__ import annotations

import threading

import pytest

from superlinear.errors import Busy, Conflict, InvalidRequest, NotFound, TooLarge
from superlinear.sessions import (
    SESSION_STATE_TAG,
    CorruptSnapshot,
    ModelMismatch,
    SessionManager,
    SnapshotStore,
    state_snapshot_id,
)

pytestmark = pytest.mark.slow

Q1 = "What is the capital of France?"
Q2 = "And of Italy?"
MAX_TOKENS = 6
LEN = 256


@pytest.fixture(scope="module")
def model(request):
    """The session-scoped ``default_model`` of conftest.py (loaded here if it is missing)."""
    try:
        return request.getfixturevalue("default_model")
    except pytest.FixtureLookupError:
        from superlinear.model import load_model

        return load_model("default")


def turn(manager, session_id, text, max_tokens=MAX_TOKENS, cancel=None):
    """One greedy chat turn on a session, as the server runs it (session lock held)."""
    from superlinear.engine import ChatRequest, Done, SamplingParams, run_turn

    with manager.use(session_id) as session:
        conv = session.conversation
        messages = conv.transcript + [{"role": "user", "content": text}]
        request = ChatRequest(messages=messages, sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens))
        done = [ev for ev in run_turn(conv, request, cancel) if isinstance(ev, Done)][-1]
    return done


def state(manager, session_id):
    conv = manager.get(session_id).conversation
    return conv.token_ids, [dict(m) for m in conv.transcript], conv.position


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The original session: turn 1, a snapshot, turn 2 (and what each produced)."""
    store = SnapshotStore(tmp_path_factory.mktemp("ref-snaps"))
    manager = SessionManager(model, store, default_max_seq_len=LEN)
    manager.create("orig")
    d1 = turn(manager, "orig", Q1)
    after1 = state(manager, "orig")
    snap = manager.save("orig", title="after turn 1", tags=["t"])
    fork = manager.fork("orig", "orig-fork")
    d2 = turn(manager, "orig", Q2)
    return {"manager": manager, "store": store, "snap": snap, "d1": d1, "d2": d2, "after1": after1,
            "after2": state(manager, "orig"), "fork": fork.id}


def copy_snapshot(reference, store, tmp_path):
    """The reference snapshot, moved into ``store`` the way a user would (export + import)."""
    exported = reference["store"].export(reference["snap"], tmp_path / "ref.tar")
    return store.import_(exported)["id"]


def same_turn(a, b):
    assert a.message == b.message
    assert a.usage["completion_tokens"] == b.usage["completion_tokens"]


def test_second_turn_prefills_only_new_tokens(reference):
    d1, d2 = reference["d1"], reference["d2"]
    assert d1.usage["cached_tokens"] == 0 and d1.usage["prefill_tokens"] == d1.usage["prompt_tokens"]
    ids1, _, pos1 = reference["after1"]
    # turn 2 reuses everything turn 1 left in the cache; only the new user message (and the
    # generation prompt) is prefilled
    assert d2.usage["cached_tokens"] >= pos1 - 1
    assert d2.usage["prefill_tokens"] == d2.usage["prompt_tokens"] - d2.usage["cached_tokens"]
    assert d2.usage["prefill_tokens"] <= 20 < d2.usage["prompt_tokens"]


def test_save_then_load_continues_identically(reference, model):
    manager, snap = reference["manager"], reference["snap"]
    manifest = reference["store"].get(snap)
    ids1, transcript1, pos1 = reference["after1"]
    assert manifest["session"]["position"] == pos1 and manifest["session"]["message_count"] == 2
    assert manifest["model"] == {"name": model.name, "fingerprint": model.fingerprint}
    loaded = manager.load(snap, "loaded")
    assert state(manager, "loaded") == reference["after1"]
    d2 = turn(manager, "loaded", Q2)
    same_turn(d2, reference["d2"])
    assert state(manager, "loaded") == reference["after2"]
    assert d2.usage["cached_tokens"] == reference["d2"].usage["cached_tokens"]  # no re-prefill
    # into a larger cache
    big = manager.load(snap, max_seq_len=2 * LEN)
    assert big.info()["max_seq_len"] == 2 * LEN and big.id != "loaded"
    assert state(manager, big.id) == reference["after1"]
    assert loaded.info()["message_count"] == 4
    for sid in ("loaded", big.id):
        manager.close(sid)


def test_fork_continues_identically_and_independently(reference):
    manager, fork = reference["manager"], reference["fork"]
    assert manager.info(fork)["position"] == reference["after1"][2]
    d2 = turn(manager, fork, Q2)
    same_turn(d2, reference["d2"])
    assert d2.usage["cached_tokens"] == reference["d2"].usage["cached_tokens"]  # forked, not re-prefilled
    assert state(manager, fork) == reference["after2"]
    orig = state(manager, "orig")
    manager.rollback(fork, 0)  # the original does not notice
    assert manager.info(fork)["position"] == 0
    assert state(manager, "orig") == orig
    manager.close(fork)
    with pytest.raises(NotFound):
        manager.get(fork)


def test_rollback_to_a_turn_then_replay(reference, model):
    manager = reference["manager"]
    manager.fork("orig", "r")
    assert state(manager, "r") == reference["after2"]
    info = manager.rollback("r", 2)
    assert info["message_count"] == 2
    ids, transcript, _ = state(manager, "r")
    assert transcript == reference["after1"][1]
    assert ids == reference["after1"][0][: len(ids)]  # truncated, never re-prefilled from scratch
    d2 = turn(manager, "r", Q2)
    same_turn(d2, reference["d2"])
    assert state(manager, "r") == reference["after2"]
    assert d2.usage["prefill_tokens"] < d2.usage["prompt_tokens"] // 2
    with pytest.raises(InvalidRequest, match="has 4 messages"):
        manager.rollback("r", 5)
    with pytest.raises(InvalidRequest):
        manager.rollback("r", -1)
    manager.rollback("r", 0)
    assert manager.info("r")["position"] == 0 and manager.info("r")["message_count"] == 0


def test_ids_duplicates_and_missing(model, tmp_path):
    manager = SessionManager(model, SnapshotStore(tmp_path), default_max_seq_len=32)
    s = manager.create()
    assert s.id.startswith("sess-")
    for bad in ("../x", "/", "", "a/b", ".x", "x y"):
        with pytest.raises(InvalidRequest):
            manager.create(bad)
        with pytest.raises(InvalidRequest):
            manager.get(bad)
    manager.create("a")
    with pytest.raises(Conflict, match="already exists"):
        manager.create("a")
    with pytest.raises(Conflict):
        manager.fork(s.id, "a")
    with pytest.raises(NotFound, match="no session 'nope'"):
        manager.get("nope")
    with pytest.raises(NotFound):
        manager.close("nope")
    with pytest.raises(InvalidRequest):
        manager.create("b", max_seq_len=0)
    listing = manager.list()
    assert [i["id"] for i in listing] == [s.id, "a"]
    assert listing.count == 2 and listing.bytes == 2 * manager.estimate_bytes(32)
    assert listing.as_dict()["bytes"] == listing.bytes
    info = manager.info("a")
    assert {"id", "position", "max_seq_len", "bytes", "message_count", "created_at", "last_used"} <= set(info)


def test_full_cache_error_says_how_to_resize_and_changes_nothing(model, tmp_path):
    manager = SessionManager(model, SnapshotStore(tmp_path), default_max_seq_len=LEN)
    manager.create("small", max_seq_len=48)
    d1 = turn(manager, "small", "Hi", max_tokens=2)
    before = state(manager, "small")
    with pytest.raises(TooLarge, match="resize") as err:
        turn(manager, "small", "Tell me a long story about " + "dragons and castles " * 4)
    assert err.value.http_status == 400 and err.value.code == "context_length_exceeded"
    assert state(manager, "small") == before  # transcript and cache did not drift
    # resize up keeps the state; the same request now fits
    info = manager.resize("small", 512)
    assert info["max_seq_len"] == 512 and info["position"] == before[2]
    assert state(manager, "small") == before
    d2 = turn(manager, "small", "Tell me a long story about " + "dragons and castles " * 4, max_tokens=2)
    assert d2.usage["cached_tokens"] >= before[2] - 1
    # down, to exactly the position, still fine; below it is refused with a clear message
    pos = manager.info("small")["position"]
    assert manager.resize("small", pos)["max_seq_len"] == pos
    with pytest.raises(InvalidRequest, match=f"at least {pos}"):
        manager.resize("small", pos - 1)
    with pytest.raises(TooLarge, match="resize"):
        turn(manager, "small", "more")
    assert manager.info("small")["position"] == pos
    assert d1.finish_reason in ("length", "stop")


def test_cancelled_or_abandoned_turn_leaves_state(reference, model, tmp_path):
    from superlinear.engine import ChatRequest, SamplingParams, TextDelta, run_turn

    manager = reference["manager"]
    manager.load(reference["snap"], "c")
    before = state(manager, "c")
    cancel = threading.Event()
    cancel.set()
    done = turn(manager, "c", Q2, cancel=cancel)
    assert done.finish_reason == "cancelled"
    assert state(manager, "c") == before
    # a consumer that stops reading mid-generation (client disconnect): generator closed
    conv = manager.get("c").conversation
    gen = run_turn(conv, ChatRequest(messages=conv.transcript + [{"role": "user", "content": Q2}],
                                     sampling=SamplingParams(max_tokens=20)))
    for ev in gen:
        if isinstance(ev, TextDelta):
            break
    gen.close()
    assert state(manager, "c") == before


def test_memory_budget_refuses_clearly(model, tmp_path):
    one = SessionManager(model, SnapshotStore(tmp_path), default_max_seq_len=LEN).sizes.full(LEN)
    manager = SessionManager(model, SnapshotStore(tmp_path), memory_budget=2 * one + one // 10,
                             default_max_seq_len=LEN)
    empty = manager.estimate_bytes(LEN)
    assert empty < one // 20  # the cache is allocated lazily: an empty session costs little
    for sid in ("a", "b"):
        manager.create(sid)
        turn(manager, sid, Q1)  # a turn allocates the cache (LEN tokens: all of it)
    assert manager.list().bytes == 2 * one == manager.bytes_in_use()
    manager.create("c")  # fits: it holds nothing yet
    before = state(manager, "c")
    with pytest.raises(Busy, match="budget") as err:
        turn(manager, "c", Q1)  # its prefill needs the cache, which the budget does not have
    assert err.value.http_status == 429
    assert state(manager, "c") == before  # the refused turn changed nothing
    with pytest.raises(TooLarge, match="whole session memory budget"):
        manager.create("huge", max_seq_len=LEN * 10)
    manager.resize("c", 2 * LEN)  # a larger limit allocates nothing: allowed
    with pytest.raises(Busy):
        manager.fork("a")
    assert [i["id"] for i in manager.list()] == ["a", "b", "c"]
    manager.close("b")
    turn(manager, "c", Q1)
    assert manager.store.list() == []  # nothing was written to disk without eviction


def test_lru_eviction_to_disk_and_transparent_reload(reference, model, tmp_path):
    store = SnapshotStore(tmp_path)
    one = SessionManager(model, store, default_max_seq_len=LEN).sizes.full(LEN)
    manager = SessionManager(model, store, memory_budget=2 * one, evict_to_disk=True, default_max_seq_len=LEN)
    snap = copy_snapshot(reference, store, tmp_path)
    manager.load(snap, "a")
    assert state(manager, "a") == reference["after1"]
    manager.create("b")
    manager.load(snap, "b", force=True)  # "b" holds a full cache too: the budget is used up
    manager.create("c")  # over budget: "a", the least recently used idle session, goes to disk
    infos = {i["id"]: i for i in manager.list()}
    assert not infos["a"]["resident"] and infos["a"]["bytes"] == 0
    assert infos["a"]["position"] == reference["after1"][2] and infos["a"]["message_count"] == 2
    assert infos["b"]["resident"] and infos["c"]["resident"]
    assert manager.history("a") == reference["after1"][1]  # read from disk, not loaded
    assert not manager.info("a")["resident"]
    saved = store.get(state_snapshot_id("a"))
    assert SESSION_STATE_TAG in saved["tags"] and saved["session"]["id"] == "a"
    # a busy session is never evicted: hold "b" while "a" comes back, so "c" goes
    b = manager.get("b")
    with b.lock:
        d2 = turn(manager, "a", Q2)  # reloads "a" transparently
    same_turn(d2, reference["d2"])
    assert state(manager, "a") == reference["after2"]
    infos = {i["id"]: i for i in manager.list()}
    assert infos["a"]["resident"] and infos["b"]["resident"] and not infos["c"]["resident"]
    assert store.exists(state_snapshot_id("a"))  # kept as the durable copy until close
    assert manager.bytes_in_use() <= 2 * one
    # every session busy: no room can be made
    with manager.get("a").lock, manager.get("b").lock:
        with pytest.raises(Busy, match="busy"):
            manager.get("c")
    for sid in ("a", "b", "c"):  # closing a session removes its state from disk
        manager.close(sid)
    assert [m["id"] for m in store.list()] == [snap]


def test_persist_all_then_restore_index_after_restart(reference, model, tmp_path):
    store = SnapshotStore(tmp_path)
    manager = SessionManager(model, store, default_max_seq_len=LEN)
    manager.load(copy_snapshot(reference, store, tmp_path), "s1")
    manager.create("s2", max_seq_len=64)
    assert sorted(manager.persist_all()) == ["s1", "s2"]
    assert {m["session"]["id"] for m in store.list(tag=SESSION_STATE_TAG)} == {"s1", "s2"}
    del manager  # "restart"
    manager = SessionManager(model, SnapshotStore(tmp_path), default_max_seq_len=LEN)
    assert sorted(manager.restore_index()) == ["s1", "s2"]
    infos = {i["id"]: i for i in manager.list()}
    assert not infos["s1"]["resident"] and infos["s1"]["position"] == reference["after1"][2]
    assert infos["s2"]["max_seq_len"] == 64
    same_turn(turn(manager, "s1", Q2), reference["d2"])  # loaded on first use
    assert manager.info("s2")["resident"] is False
    assert manager.get("s2").info()["max_seq_len"] == 64
    # a restore with another model ignores them (nothing is loaded into the wrong model)
    other = SessionManager(model.with_attention("dense"), SnapshotStore(tmp_path))
    assert other.restore_index() == []


def test_load_failures_leave_the_session_untouched(reference, model, tmp_path):
    import shutil

    store = SnapshotStore(tmp_path)
    manager = SessionManager(model, store, default_max_seq_len=LEN)
    manager.create("x")
    turn(manager, "x", "Hello")
    before = state(manager, "x")
    good = copy_snapshot(reference, store, tmp_path)
    with pytest.raises(Conflict, match="force"):
        manager.load(good, "x")
    shutil.copytree(store.root / good, store.root / "bad")
    (store.root / "bad" / "tensors.safetensors").open("r+b").truncate(1000)
    with pytest.raises(CorruptSnapshot, match="truncated"):
        manager.load("bad", "x", force=True)
    with pytest.raises(InvalidRequest, match="smaller than"):
        manager.load(good, "x", force=True, max_seq_len=8)
    with pytest.raises(NotFound):
        manager.load("missing", "x", force=True)
    with pytest.raises(InvalidRequest):
        manager.load("../etc", "x", force=True)
    assert state(manager, "x") == before
    assert [i["id"] for i in manager.list()] == ["x"]
    manager.load(good, "x", force=True)
    assert state(manager, "x") == reference["after1"]


def test_snapshot_of_another_model_is_refused(reference, model, tmp_path):
    dense = model.with_attention("dense")
    assert dense.fingerprint != model.fingerprint
    manager = SessionManager(dense, SnapshotStore(reference["store"].root), default_max_seq_len=LEN)
    with pytest.raises(ModelMismatch) as err:
        manager.load(reference["snap"])
    msg = err.value.message
    assert model.fingerprint[:16] in msg and dense.fingerprint[:16] in msg and model.name in msg
    assert manager.list() == []


def test_eviction_never_overwrites_a_user_snapshot(model, tmp_path):
    store = SnapshotStore(tmp_path)
    one = SessionManager(model, store, default_max_seq_len=64).sizes.full(64)
    manager = SessionManager(model, store, memory_budget=one, evict_to_disk=True, default_max_seq_len=64)
    manager.create("a")
    turn(manager, "a", Q1)  # "a" now holds its whole cache: the budget
    user_snap = manager.save("a", title="mine", snapshot_id=state_snapshot_id("a"))
    manager.create("b")  # evicts "a"; its state must go elsewhere
    assert not manager.info("a")["resident"]
    assert store.get(user_snap)["title"] == "mine" and SESSION_STATE_TAG not in store.get(user_snap)["tags"]
    state_id = manager.info("a")["state_snapshot"]
    assert state_id != user_snap and SESSION_STATE_TAG in store.get(state_id)["tags"]
    with manager.use("a") as session:  # back in memory ("b" goes to disk)
        assert session.resident and session.lock.locked()
    assert not manager.info("b")["resident"]
    store.delete(manager.info("b")["state_snapshot"])  # someone removed its state by hand
    with pytest.raises(NotFound, match="session 'b' is on disk as snapshot .* close the session"):
        manager.get("b")
    manager.close("b")
    manager.close("a")
    assert store.exists(user_snap) and not store.exists(state_id)


def test_threads_a_busy_session_is_neither_evicted_nor_closed_under_its_user(model, tmp_path):
    import time

    store = SnapshotStore(tmp_path)
    one = SessionManager(model, store, default_max_seq_len=64).sizes.full(64)
    manager = SessionManager(model, store, memory_budget=2 * one, evict_to_disk=True, default_max_seq_len=64)
    for sid in ("a", "b"):
        manager.create(sid)
        turn(manager, sid, Q1)  # each holds its whole cache: the budget is used up
    entered, release = threading.Event(), threading.Event()

    def hold():
        with manager.use("a"):
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(10)
    manager.get("b")  # "a" is now the least recently used, but another thread is using it
    manager.create("c")
    assert manager.info("a")["resident"] and not manager.info("b")["resident"]
    closer = threading.Thread(target=manager.close, args=("a",))
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive() and "a" in manager  # close waits for the turn to end
    release.set()
    holder.join(10)
    closer.join(10)
    assert "a" not in manager
    with pytest.raises(NotFound):
        manager.get("a")
