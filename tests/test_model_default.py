"""The embedded default model (SmolLM2-135M, superlinear retrofit) on CPU: answers, equalities
between chunked / unchunked / decode paths, superlinear vs dense, cache operations."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from superlinear.errors import TooLarge
from superlinear.model import Cancelled

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
STORY = ("Rome was founded, according to legend, in 753 BC by Romulus and Remus. Over time it grew "
         "from a small town into a vast empire that dominated the Mediterranean world. Its legions "
         "conquered Gaul, Britain, Egypt and much of the Near East. Latin, the language of Rome, became "
         "the basis of the Romance languages. The empire was divided in 395 AD, and the western half "
         "fell in 476 AD. Question: in which year was Rome founded according to legend?")


def greedy(model, ids, n, max_seq_len=1024):
    cache = model.new_cache(max_seq_len)
    logits = model.prefill(cache, ids)
    out = []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        if token == model.tokenizer.eos_token_id:
            break
        logits = model.decode_step(cache, token)
    return out


def test_default_answers_paris(default_model):
    ids = default_model.chat_token_ids(PROMPT)
    text = default_model.tokenizer.decode(greedy(default_model, ids, 16))
    assert "Paris" in text, text


def test_default_config_and_info(default_model):
    info = default_model.info()
    assert info["name"] == "default"
    assert info["attention"]["mode"] == "superlinear"
    assert info["attention"]["window"] == default_model.window >= 2000
    assert info["attention"]["routing_query"] == "attention query"
    assert info["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4  # layers * (k, v) * kv heads * dim * fp32
    assert info["layer_types"] == {"full_attention": 30}
    assert 130e6 < info["parameters"] < 140e6
    assert len(default_model.fingerprint) == 32
    dense = default_model.with_attention("dense")
    assert dense.fingerprint != default_model.fingerprint
    assert default_model.with_attention("superlinear").fingerprint == default_model.fingerprint


def test_chunked_prefill_equals_unchunked(default_model):
    ids = default_model.tokenizer.encode(STORY)
    full = default_model.prefill(default_model.new_cache(256), ids)
    chunked = default_model.prefill(default_model.new_cache(256), ids, chunk_size=40)
    torch.testing.assert_close(chunked, full, atol=2e-3, rtol=1e-3)


def test_prefill_then_decode_equals_full_prefill(default_model):
    ids = default_model.tokenizer.encode(STORY)
    full = default_model.prefill(default_model.new_cache(256), ids)
    cache = default_model.new_cache(256)
    default_model.prefill(cache, ids[:-3])
    for token in ids[-3:]:
        logits = default_model.decode_step(cache, token)
    assert cache.position == len(ids)
    torch.testing.assert_close(logits, full, atol=2e-3, rtol=1e-3)


def test_superlinear_equals_dense_inside_the_window(default_model):
    dense = default_model.with_attention("dense")
    ids = default_model.chat_token_ids([{"role": "user", "content": STORY}])
    assert len(ids) + 24 < default_model.window
    a = default_model.prefill(default_model.new_cache(512), ids)
    b = dense.prefill(dense.new_cache(512), ids)
    # the model runs dense SDPA there (the same function, cheaper): identical, not just close
    assert torch.equal(a, b)
    assert greedy(default_model, ids, 12) == greedy(dense, ids, 12)


def test_superlinear_runs_dense_inside_the_window_only(tiny_llama):
    """Bit-identical to dense attention while every query's context fits the window (prefill in
    chunks and decode), superlinear once the context reaches past it."""
    from superlinear.kernels import SpanParams
    from superlinear.model import load_model

    model = load_model(str(tiny_llama), device="cpu", dtype=torch.float32)
    small = SpanParams(sw_index=5, num_spans=2, backward_factor=3.0, forward_factor=1.0,
                       span_power=0.5, inv_search_power=2)  # W = 35
    sparse = model.with_attention("superlinear", span_params=small)
    dense = model.with_attention("dense")
    ids = list(range(3, 3 + 80))
    W = small.window_len
    cs, cd = sparse.new_cache(128), dense.new_cache(128)
    with _kernel_calls() as calls:
        assert torch.equal(sparse.prefill(cs, ids[:20], chunk_size=8), dense.prefill(cd, ids[:20], chunk_size=8))
        for token in ids[20:W]:  # decode up to the last position inside the window
            assert torch.equal(sparse.decode_step(cs, token), dense.decode_step(cd, token))
    assert cs.position == W
    assert not calls  # dense SDPA, not the superlinear kernels
    # past the window the spans leave keys out (2 of 3 candidates at the last position)
    with _kernel_calls() as calls:
        a, b = sparse.prefill(cs, ids[W:]), dense.prefill(cd, ids[W:])
    assert "reference_prefill" in calls
    assert (a - b).abs().max() > 1e-4


@contextlib.contextmanager
def _kernel_calls():
    """Names of the functions of superlinear.kernels.attention.reference called inside the block."""
    import superlinear.kernels.attention.reference as reference

    calls: set[str] = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == reference.__file__:
            calls.add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(None)


def test_beyond_the_window_differs_but_stays_sane(default_model):
    from superlinear.kernels import SpanParams

    # The same weights with a 63-token window: a ~150-token prompt reaches well past it.
    small = SpanParams(sw_index=7, num_spans=3, backward_factor=3.0, forward_factor=1.0,
                       span_power=0.5, inv_search_power=2)
    sparse = default_model.with_attention("superlinear", span_params=small)
    dense = default_model.with_attention("dense")
    ids = default_model.chat_token_ids([{"role": "user", "content": STORY}])
    assert len(ids) > 2 * small.window_len
    # inside the window both compute the same function
    head = ids[:small.window_len]
    torch.testing.assert_close(sparse.prefill(sparse.new_cache(256), head),
                               dense.prefill(dense.new_cache(256), head), atol=1e-4, rtol=1e-4)
    a = sparse.prefill(sparse.new_cache(256), ids)
    b = dense.prefill(dense.new_cache(256), ids)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-2  # spans + window is not dense attention
    out = greedy(sparse, ids, 12, max_seq_len=256)
    text = default_model.tokenizer.decode(out, skip_special_tokens=True)
    assert len(set(out)) >= 4 and sum(ch.isalpha() for ch in text) >= 10, text


def test_cache_truncate_clone_resize_state_roundtrip(default_model):
    m = default_model
    ids = m.tokenizer.encode(STORY)[:60]
    cache = m.new_cache(64)
    per_token = m.info()["kv_bytes_per_token"]
    assert cache.nbytes() == 0 and cache.capacity == 0  # KV is allocated lazily
    m.prefill(cache, ids[:40])
    assert 40 <= cache.capacity <= 64 and cache.nbytes() == cache.capacity * per_token
    branch = cache.clone()
    after = m.prefill(cache, ids[40:50])
    # truncate and redo: the same logits
    cache.truncate(40)
    assert cache.position == 40
    torch.testing.assert_close(m.prefill(cache, ids[40:50]), after)
    # the clone is independent and continues the same way
    torch.testing.assert_close(m.prefill(branch, ids[40:50]), after)
    # past max_seq_len: TooLarge saying how to resize
    with pytest.raises(TooLarge, match="resize"):
        m.prefill(cache, ids[:20])
    assert cache.position == 50
    with pytest.raises(TooLarge):
        cache.resize(10)
    held = cache.nbytes()
    cache.resize(128)
    assert cache.max_seq_len == 128 and cache.nbytes() == held  # a larger limit allocates nothing
    nxt = m.decode_step(cache, ids[50])
    # state tensors -> a new cache continues identically
    state = branch.state_tensors()
    assert set(state) == {f"layers.{i}.{kv}" for i in range(30) for kv in ("key", "value")}
    assert state["layers.0.key"].shape == (1, 3, 50, 64)
    restored = m.cache_from_state(state, branch.position, 100)
    assert restored.position == 50 and restored.max_seq_len == 100
    torch.testing.assert_close(m.decode_step(restored, ids[50]), nxt)
    assert cache.recurrent_state() == {}


def test_cache_grows_on_demand_and_keeps_its_content(default_model):
    m = default_model
    ids = m.tokenizer.encode(STORY) * 40

    from superlinear.model.cache import capacity_to_hold

    first = capacity_to_hold(250, 4096)
    cut = first + 20  # past the first capacity: the cache grows

    def run(cache):
        m.prefill(cache, ids[:250])
        capacity = cache.capacity
        m.prefill(cache, ids[250:cut])
        return capacity, [m.decode_step(cache, t) for t in ids[cut:cut + 10]]

    fixed = m.new_cache(4096)
    fixed.reserve(4096)  # allocated once up front: no growth
    _, expected = run(fixed)
    grown = m.new_cache(4096)
    assert grown.capacity == 0 and grown.nbytes() == 0  # nothing allocated before it is needed
    got_first, got = run(grown)
    assert len(ids) > cut + 10 and got_first == first
    # the first allocation leaves decode headroom; the next one is a step, not one token more
    assert 250 + 1000 <= first < cut < cut + 1000 <= grown.capacity <= 4096
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)  # same computation; only the reallocation differs
    shrink = m.new_cache(4096)
    m.prefill(shrink, ids[:100])
    shrink.resize(120)  # below the capacity: the memory is given back, the content kept
    assert shrink.capacity == 120
    assert torch.equal(m.decode_step(shrink, ids[100]), m.decode_step(_prefilled(m, ids[:100]), ids[100]))


def _prefilled(m, ids):
    cache = m.new_cache(len(ids) + 8)
    m.prefill(cache, ids)
    return cache


def test_prefill_cancels_between_chunks(default_model):
    ids = default_model.tokenizer.encode(STORY)[:40]
    cache = default_model.new_cache(64)
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        default_model.prefill(cache, ids, chunk_size=16, should_cancel=should_cancel)
    assert cache.position == 32  # two chunks finished
