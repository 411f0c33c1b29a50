"""A growing KV cache never holds two copies of itself (issue 18, section 5).

The cache moves its KV one tensor at a time (``Cache._reallocate``). These tests watch the real
CPU allocator through torch's memory profiler (every allocation and free of the process, not the
cache's own bookkeeping) across a growth, for the default llama-family cache and a hybrid's
(Mamba state + attention KV): the peak is the grown cache plus one old tensor, exactly what
``growth_bytes`` told the memory budget beforehand. The content survives bit for bit, and greedy
decoding with the cache forced to grow every few tokens gives the same logits as a cache
allocated once.
"""

from __future__ import annotations

import pytest
import torch
from test_model_hybrid import SPAN, tiny_hybrid_config
from torch.profiler import ProfilerActivity, profile, record_function

from superlinear.model.random_weights import random_model

TINY_LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, **SPAN}


@pytest.fixture(scope="module", params=["llama", "hybrid"])
def model(request):
    from superlinear.model.default import ensure_default
    from superlinear.model.loaders import load_tokenizer

    config = TINY_LLAMA if request.param == "llama" else tiny_hybrid_config()
    model = random_model(config, name=f"tiny-{request.param}", device="cpu", dtype="fp32", seed=3)
    model.tokenizer = load_tokenizer(ensure_default())  # for sessions (the ids fed stay below 512)
    return model


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def mark(name: str) -> None:
    """A point in the profiled run (an empty range: a free inside a range would be booked at
    the range's start, so the code under test runs outside any)."""
    with record_function(name):
        pass


class AllocatorTrace:
    """Live bytes of the CPU allocator along a profiled run, from the profiler's allocation and
    free events, between two ``mark``s: ``before`` (live bytes at the first), ``peak`` and
    ``after``."""

    def __init__(self, prof, start: str, end: str):
        events = prof.events()
        steps = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage)
        t0, t1 = (next(e.time_range.start for e in events if e.name == name) for name in (start, end))
        self.before = sum(delta for when, delta in steps if when < t0)
        self.peak = level = self.before
        for when, delta in steps:
            if t0 <= when < t1:
                level += delta
                self.peak = max(self.peak, level)
        self.after = level


def test_growth_peak_is_the_new_cache_plus_one_old_tensor(model):
    # everything the cache holds is allocated inside the profiled window, so its frees are seen
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cache = model.new_cache(4096)
        model.prefill(cache, _ids(700), chunk_size=256)
        old_bytes, old_capacity = cache.nbytes(), cache.capacity
        promised = cache.growth_bytes(3000)
        one_tensor = cache.transient_bytes()
        before = {k: v.clone() for k, v in cache.state_tensors().items()}
        mark("grow")
        cache.reserve(3000)
        mark("grown")
        new_bytes = cache.nbytes()
    trace = AllocatorTrace(prof, "grow", "grown")
    tensors = 2 * len(model.layout.attention_layers)
    assert cache.capacity > old_capacity and new_bytes > old_bytes
    assert one_tensor * tensors == old_capacity * model.kv_bytes_per_token()
    # the allocator saw the growth add what nbytes says, and peak at the new cache + one old tensor
    assert trace.after - trace.before == new_bytes - old_bytes
    assert trace.peak - trace.before == new_bytes - old_bytes + one_tensor
    assert trace.peak - trace.before == promised  # what the memory budget was told before the growth
    assert trace.peak - trace.before < new_bytes  # holding both copies would need old + new
    after = cache.state_tensors()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_shrinking_resize_moves_one_tensor_at_a_time(model):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cache = model.new_cache(4096)
        model.prefill(cache, _ids(300), chunk_size=256)
        cache.reserve(3000)
        old_bytes = cache.nbytes()
        mark("shrink")
        cache.resize(400)
        mark("shrunk")
    trace = AllocatorTrace(prof, "shrink", "shrunk")
    one_new = 400 * model.kv_bytes_per_token() // (2 * len(model.layout.attention_layers))
    assert cache.capacity == 400
    assert trace.peak - trace.before == one_new  # never the old cache and a whole new one
    assert trace.after - trace.before == cache.nbytes() - old_bytes < 0


def _greedy(model, cache, prompt, steps, grow_every=None):
    logits = model.prefill(cache, prompt, chunk_size=64)
    out, seen = [], [logits]
    for _ in range(steps):
        if grow_every and cache.position + 1 > cache.capacity:
            cache.reserve(cache.position + grow_every, exact=True)  # the real growth path, forced often
        out.append(int(logits.argmax()))
        logits = model.decode_step(cache, out[-1])
        seen.append(logits)
    return out, seen


def test_generation_with_forced_growth_equals_a_cache_allocated_once(model):
    prompt, steps = _ids(40, seed=1), 60
    fixed = model.new_cache(200)
    fixed.reserve(200, exact=True)
    expected, expected_logits = _greedy(model, fixed, prompt, steps)
    grown = model.new_cache(200)
    grown.reserve(len(prompt), exact=True)  # full after the prompt: a growth every 7 tokens
    got, got_logits = _greedy(model, grown, prompt, steps, grow_every=7)
    assert grown.capacity == len(prompt) + -(-steps // 7) * 7  # it grew 9 times
    assert got == expected
    for a, b in zip(got_logits, expected_logits, strict=True):
        assert torch.equal(a, b)
    a, b = grown.state_tensors(), fixed.state_tensors()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_session_budget_counts_the_tensor_a_growth_moves(model, tmp_path):
    """A generation may use the rows allocated already; growing past them needs one old KV tensor
    beside the new ones, so with less free budget than that the room ends at the capacity and a
    decode past it is refused before anything is allocated."""
    from superlinear.errors import OverBudget, TooLarge
    from superlinear.sessions import SessionManager, SnapshotStore

    def session_after_prompt(budget):
        manager = SessionManager(model, SnapshotStore(tmp_path / str(budget)), memory_budget=budget)
        conv = manager.create("s", max_seq_len=760).conversation
        conv.sync_tokens(_ids(700))  # the cache takes all 760 rows
        conv.resize(4096)  # a larger limit allocates nothing
        return manager, conv

    probe, conv = session_after_prompt(None)
    held, transient = probe.bytes_in_use(), conv.cache.transient_bytes()
    manager, conv = session_after_prompt(held + transient // 2)  # room for some tokens' KV, not the tensor
    spare = conv.cache.capacity - conv.position
    assert spare == 60 and manager.free_bytes() // model.kv_bytes_per_token() >= 60
    assert conv.memory.room(conv) == spare
    token = int(conv.logits.argmax())
    for _ in range(spare):
        token = int(conv.step(token).argmax())
    with pytest.raises((OverBudget, TooLarge)):
        conv.step(token)
    assert conv.cache.capacity == 760


def test_a_10m_prompt_leaves_room_for_a_long_answer_and_its_growth_one_tensor():
    """The 30B hybrid's cache on the meta device (shapes only): the numbers of docs/sessions.md."""
    from superlinear.model.cache import Cache, CacheLayout

    layout = CacheLayout(attention_layers=(5, 12, 19, 26, 33, 42), num_kv_heads=2, head_dim=128,
                         mamba_layers=tuple(range(23)), conv_shape=(6144, 4), ssm_shape=(64, 64, 128))
    prompt, gib = 10 * 2**20, 2**30
    cache = Cache(layout, prompt + 200_000, "meta", torch.bfloat16)
    cache.reserve(prompt)
    cache.position = prompt
    assert cache.capacity - prompt == 81_920  # 0.8% headroom: 80K answer tokens without a growth
    assert cache.nbytes() - layout.recurrent_bytes(torch.bfloat16) == cache.capacity * 6144
    assert round(cache.capacity * 6144 / gib, 2) == 60.47
    grown = cache.capacity_for(cache.capacity + 1)
    transient = cache.growth_bytes(cache.capacity + 1) - (grown - cache.capacity) * 6144
    assert transient == cache.transient_bytes() == cache.capacity * 2 * 128 * 2  # one K tensor: 5.04 GiB
    cache.reserve(cache.capacity + 1)
    assert cache.capacity == 10_650_368
