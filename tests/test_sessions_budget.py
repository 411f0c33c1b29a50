"""The session memory budget on caches that grow as tokens arrive: what a session holds is what
its cache has allocated, every prefill is checked before the cache grows, a generation stops
where the budget ends, and max_seq_len is capped by what a full cache fits in the budget.

The model is the engine's fake (real tokenizer and chat template, a real Conversation and
SessionManager) with a cache whose size is its position x 8 bytes, like a lazily allocated KV.
"""

from __future__ import annotations

import pytest
import torch
from engine_fakes import FakeCache, FakeModel

from superlinear.engine import ChatRequest, Done, SamplingParams, run_turn
from superlinear.errors import OverBudget, TooLarge
from superlinear.sessions import SessionManager, SnapshotStore

KV_BYTES = 8  # per cached token


class GrowingCache(FakeCache):
    """Allocates as tokens arrive, exactly what they need (no growth steps)."""

    def nbytes(self) -> int:
        return KV_BYTES * self.position

    @property
    def capacity(self) -> int:
        return self.position

    def capacity_for(self, tokens: int, exact: bool = False) -> int:
        return max(self.position, int(tokens))

    def growth_bytes(self, tokens: int, exact: bool = False) -> int:
        return KV_BYTES * max(0, int(tokens) - self.position)

    def clone(self) -> GrowingCache:
        other = GrowingCache(self.max_seq_len, self.hybrid)
        other.tokens, other.hashes, other.state = list(self.tokens), list(self.hashes), self.state
        return other


class GrowingModel(FakeModel):
    name = "growing-fake"
    fingerprint = "f" * 32
    dtype = torch.float32
    def kv_bytes_per_token(self) -> int:
        return KV_BYTES

    def new_cache(self, max_seq_len: int) -> GrowingCache:
        return GrowingCache(max_seq_len, self.has_recurrent_state)


@pytest.fixture(scope="module")
def tokenizer():
    from superlinear.model.default import ensure_default
    from superlinear.model.loaders import load_tokenizer

    return load_tokenizer(ensure_default())


def turn(manager, session_id, text, max_tokens=8) -> Done:
    with manager.use(session_id) as session:
        conv = session.conversation
        request = ChatRequest(messages=conv.transcript + [{"role": "user", "content": text}],
                              sampling=SamplingParams(max_tokens=max_tokens))
        return [e for e in run_turn(conv, request) if isinstance(e, Done)][-1]


def make(tokenizer, tmp_path, budget_tokens: int, sessions: int = 2) -> SessionManager:
    model = GrowingModel(tokenizer)
    probe = SessionManager(model, SnapshotStore(tmp_path), memory_budget=None, default_max_seq_len=4096)
    overhead = probe.estimate_bytes(4096)  # an empty session: only its fixed overhead
    return SessionManager(model, SnapshotStore(tmp_path), memory_budget=sessions * overhead + budget_tokens * KV_BYTES,
                          default_max_seq_len=1024)


def test_empty_sessions_cost_only_their_overhead(tokenizer, tmp_path):
    manager = make(tokenizer, tmp_path, budget_tokens=2000)
    a = manager.create("a")
    assert a.nbytes() == manager.estimate_bytes(1024) == manager.sizes.overhead  # no KV yet
    turn(manager, "a", "Hello there")
    assert a.nbytes() == manager.sizes.overhead + KV_BYTES * a.position


def test_a_prefill_past_the_budget_is_refused_and_changes_nothing(tokenizer, tmp_path):
    manager = make(tokenizer, tmp_path, budget_tokens=300)
    manager.create("a")
    manager.create("b")
    turn(manager, "a", "word " * 200)  # a now holds ~220 of the 300 tokens the budget has room for
    turn(manager, "b", "Hi")
    before = manager.info("b")
    with pytest.raises(OverBudget) as e:
        turn(manager, "b", "word " * 150)
    assert e.value.http_status == 429 and e.value.code == "memory_budget_exceeded"
    after = manager.info("b")
    assert (after["position"], after["message_count"], after["bytes"]) == (before["position"],
                                                                          before["message_count"], before["bytes"])
    assert manager.bytes_in_use() <= manager.memory_budget
    manager.close("a")  # the memory is back: the same turn fits now
    assert turn(manager, "b", "word " * 150).finish_reason in ("length", "stop")


def test_a_generation_stops_where_the_budget_ends(tokenizer, tmp_path):
    manager = make(tokenizer, tmp_path, budget_tokens=400)
    manager.create("a")
    manager.create("b")
    turn(manager, "a", "word " * 250)
    done = turn(manager, "b", "Tell me everything", max_tokens=1000)
    assert done.finish_reason == "memory"  # the server answers "length", stop_reason "memory_budget"
    assert manager.bytes_in_use() <= manager.memory_budget


def test_max_seq_len_is_capped_by_a_full_cache_in_the_budget(tokenizer, tmp_path):
    manager = make(tokenizer, tmp_path, budget_tokens=5000, sessions=1)
    limit = manager.max_seq_len_limit()
    assert 5000 <= limit < 5000 + 2 * manager.sizes.overhead // KV_BYTES
    with pytest.raises(TooLarge, match=f"at most {limit} tokens"):
        manager.create("big", max_seq_len=limit + 1)
    assert manager.create("edge", max_seq_len=limit).max_seq_len == limit
    with pytest.raises(TooLarge):
        manager.resize("edge", limit + 1)
