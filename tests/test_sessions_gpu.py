"""Sessions on a device: snapshots of device caches (bf16 on CUDA), continuation identical after save/load,
fork and rollback with CUDA-graph decode, eviction to disk and reload, a hybrid on the GPU.

Uses tiny random checkpoints (tests/sessions_tiny.py) so nothing large has to be on the machine;
the tokenizer comes from ``$SPL_TEST_TOKENIZER_DIR`` or the converted default model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from sessions_tiny import greedy_turn, write_tiny_hybrid, write_tiny_llama

from superlinear.sessions import SessionManager, SnapshotStore


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    where = os.environ.get("SPL_TEST_TOKENIZER_DIR")
    if not where:
        from superlinear.model.default import default_dir, is_converted

        if not is_converted():
            pytest.skip("no tokenizer: set SPL_TEST_TOKENIZER_DIR or convert the default model")
        where = str(default_dir())
    return AutoTokenizer.from_pretrained(where)


def _load(path: Path, device: str):
    from superlinear.model import load_model

    return load_model(str(path), device=device, dtype="bfloat16" if device == "cuda" else "float32")


def turn(manager, session_id, text, max_tokens=6):
    return greedy_turn(manager, session_id, text, max_tokens)


@pytest.mark.parametrize("kind", ["llama", "hybrid"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sessions_round_trip(kind, tokenizer, tmp_path):
    round_trip(kind, tokenizer, tmp_path, "cuda")


@pytest.mark.parametrize("kind", ["llama", "hybrid"])
def test_cpu_sessions_round_trip(kind, tokenizer, tmp_path):
    """The same on CPU, so that the GPU test's budgets cannot go stale unseen."""
    round_trip(kind, tokenizer, tmp_path, "cpu")


def round_trip(kind, tokenizer, tmp_path, device):
    write = write_tiny_llama if kind == "llama" else write_tiny_hybrid
    model = _load(write(tmp_path / "model", tokenizer), device)
    assert model.device.type == device
    store = SnapshotStore(tmp_path / "snaps")
    manager = SessionManager(model, store, default_max_seq_len=256)
    manager.create("a")
    turn(manager, "a", "hello")
    conv = manager.get("a").conversation
    assert conv.cache.keys[model.layout.attention_layers[0]].device.type == device
    after1 = conv.token_ids
    snap = manager.save("a")
    fork = manager.fork("a", "f")
    d2 = turn(manager, "a", "again")
    after2 = manager.get("a").conversation.token_ids

    _, _, tensors = store.read(snap)
    assert any(t.dtype == model.dtype for t in tensors.values())
    e = turn(manager, fork.id, "again")
    assert e.message == d2.message and fork.conversation.token_ids == after2
    loaded = manager.load(snap, "l", max_seq_len=512)
    assert loaded.conversation.token_ids == after1
    e = turn(manager, "l", "again")
    assert e.message == d2.message and loaded.conversation.token_ids == after2
    manager.rollback("l", 2)
    assert loaded.conversation.token_ids == after1
    e = turn(manager, "l", "again")
    assert e.message == d2.message and loaded.conversation.token_ids == after2
    manager.resize("l", 300)
    e = turn(manager, "l", "and more")

    # eviction to disk frees device memory and reloads transparently: a budget that holds one
    # full session of 256 tokens (a cache grows on demand, so a fresh one holds less: creating
    # it must be allowed), not two
    one = manager.sizes.full(256)
    small = SessionManager(model, store, memory_budget=one, evict_to_disk=True, default_max_seq_len=256)
    small.load(snap, "x")
    used = torch.cuda.memory_allocated() if device == "cuda" else 0
    small.create("y")  # evicts "x"
    assert not small.info("x")["resident"]
    if device == "cuda":  # x's cache was freed before y's was allocated
        assert torch.cuda.memory_allocated() <= used + one // 8
    e = turn(small, "x", "again")  # "y" goes to disk, "x" comes back
    assert e.message == d2.message and small.get("x").conversation.token_ids == after2
