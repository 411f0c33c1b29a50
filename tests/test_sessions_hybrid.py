"""Sessions on a hybrid (Mamba + attention) model: the recurrent state cannot be truncated, so
snapshots carry the state checkpoints at message boundaries and rollback uses them.

The model is a tiny random Nemotron-H checkpoint written to a temporary directory and loaded
through ``load_model`` like any local checkpoint (random weights: the text is noise, but greedy
decoding is deterministic, which is all these tests need).
"""

from __future__ import annotations

import pytest
from sessions_tiny import greedy_turn, write_tiny_hybrid

from superlinear.sessions import SessionManager, SnapshotStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hybrid(request, tmp_path_factory):
    import warnings

    from superlinear.model import load_model

    try:
        default = request.getfixturevalue("default_model")
    except pytest.FixtureLookupError:
        default = load_model("default")
    tokenizer = default.tokenizer
    path = tmp_path_factory.mktemp("tiny-hybrid")
    write_tiny_hybrid(path, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(str(path), device="cpu", dtype="float32")
    assert model.has_recurrent_state
    model.test_default = default
    return model


def turn(manager, session_id, text, max_tokens=4):
    return greedy_turn(manager, session_id, text, max_tokens)


def test_hybrid_snapshot_keeps_boundary_checkpoints_and_rolls_back(hybrid, tmp_path):
    store = SnapshotStore(tmp_path)
    manager = SessionManager(hybrid, store, default_max_seq_len=128)
    manager.create("h")
    turn(manager, "h", "hi")
    conv = manager.get("h").conversation
    after1 = (conv.token_ids, list(conv.transcript))
    snap = manager.save("h")
    d2 = turn(manager, "h", "again")
    after2 = manager.get("h").conversation.token_ids

    manifest, meta, tensors = store.read(snap)
    ckpts = meta["recurrent_checkpoints"]
    assert ckpts and all(0 < p < manifest["session"]["position"] for p in ckpts)
    assert any(k.startswith(f"recurrent.{ckpts[0]}.") for k in tensors)

    loaded = manager.load(snap, "l")
    assert sorted(loaded.conversation._states) == sorted({0, *ckpts, manifest["session"]["position"]})
    e2 = turn(manager, "l", "again")
    assert e2.message == d2.message and manager.get("l").conversation.token_ids == after2

    # rollback to the first turn uses a checkpoint: no replay of the whole history
    manager.rollback("l", 2)
    conv = manager.get("l").conversation
    assert (conv.token_ids, list(conv.transcript)) == after1
    e3 = turn(manager, "l", "again")
    assert e3.message == d2.message and conv.token_ids == after2
    assert e3.usage["cached_tokens"] >= max(ckpts)

    fork = manager.fork("h")
    manager.rollback(fork.id, 2)
    assert fork.conversation.token_ids == after1[0]
    assert manager.get("h").conversation.token_ids == after2


def test_snapshot_of_another_architecture_is_refused(hybrid, tmp_path):
    from superlinear.sessions import ModelMismatch

    store = SnapshotStore(tmp_path)
    manager = SessionManager(hybrid, store, default_max_seq_len=64)
    manager.create("h")
    snap = manager.save("h")
    default = hybrid.test_default
    other = SessionManager(default, store, default_max_seq_len=64)
    with pytest.raises(ModelMismatch) as err:
        other.load(snap)
    assert hybrid.name in err.value.message and default.name in err.value.message
    assert other.list() == []


def test_hybrid_journal_is_incremental_and_restores_checkpoints(hybrid, tmp_path):
    """The session journal of a hybrid: recurrent checkpoints are files of their own, written
    once; a restart restores them, so a rollback there is as cheap as in the original."""
    import json

    from superlinear.sessions import state_snapshot_id

    store = SnapshotStore(tmp_path)
    manager = SessionManager(hybrid, store, default_max_seq_len=128)
    manager.create("h")
    turn(manager, "h", "hi")
    manager.persist("h")
    path = store.root / state_snapshot_id("h") / "manifest.json"
    m1 = json.loads(path.read_text())
    assert m1["checkpoints"]
    after1 = manager.get("h").conversation.token_ids
    d2 = turn(manager, "h", "again")
    manager.persist("h")
    m2 = json.loads(path.read_text())
    assert all(m2["checkpoints"][p] == f for p, f in m1["checkpoints"].items())  # not rewritten
    assert len(m2["segments"]) == 2

    again = SessionManager(hybrid, SnapshotStore(tmp_path), default_max_seq_len=128)
    assert again.restore_index() == ["h"]
    conv = again.get("h").conversation
    assert sorted(conv._states) == sorted({0, *map(int, m2["checkpoints"]), m2["session"]["position"]})
    again.rollback("h", 2)
    assert conv.token_ids == after1
    e2 = turn(again, "h", "again")
    assert e2.message == d2.message
