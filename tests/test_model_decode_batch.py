"""``Model.decode_batch`` against ``decode_step`` of each sequence alone, on CPU in fp32.

Sequences of mixed lengths (inside the window and past it, where spans are searched), several
steps, greedy tokens fed back, a member leaving midway; the default model (llama), a tiny
superlinear-exp hybrid (Mamba-2, MoE, attention), and the static-table step a CUDA graph
captures (run eagerly here, its Triton kernels under the interpreter).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated

from test_model_hybrid import make_state_matter, tiny_hybrid_config  # noqa: E402

from superlinear.errors import InvalidRequest  # noqa: E402
from superlinear.kernels import SpanParams  # noqa: E402
from superlinear.model.batch import BUCKETS, bound_for, bucket_for  # noqa: E402
from superlinear.model.random_weights import random_model  # noqa: E402

# a window of 8 tokens: the longer sequences below are in the superlinear regime
SMALL_SPANS = SpanParams(sw_index=2, num_spans=2, backward_factor=3.0, forward_factor=1.0, span_power=0.5,
                         inv_search_power=2)
TINY_LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 4096, "tie_word_embeddings": True}


def _prefilled(model, lengths, seed=0, exact=False):
    g = torch.Generator().manual_seed(seed)
    caches, first = [], []
    for length in lengths:
        cache = model.new_cache(length + 64)
        if exact:  # capacity = the prompt: the first decode step grows the cache (a new tensor)
            cache.reserve(length, exact=True)
        first.append(int(model.prefill(cache, torch.randint(0, model.vocab_size, (length,), generator=g)).argmax()))
        caches.append(cache)
    return caches, first


def _batched_equals_alone(model, lengths, steps, leave_at=None, graph=None, atol=1e-4, exact=False, alone_model=None):
    """Decode ``lengths`` sequences together and each alone (clones; prefilled and decoded alone
    by ``alone_model``, the same weights on the reference kernels, if given), greedy; the row of
    sequence 0 leaves the batch at step ``leave_at``. Returns the batched tokens."""
    reference = alone_model or model
    caches, first = _prefilled(reference, lengths, exact=exact)
    alone = [c.clone() for c in caches]
    tokens, alone_tokens = list(first), list(first)
    live = list(range(len(lengths)))
    history = []
    for step in range(steps):
        if step == leave_at:
            live = live[1:]
        batched = model.decode_batch([caches[i] for i in live], [tokens[i] for i in live], graph=graph)
        assert batched.shape == (len(live), model.vocab_size) and batched.dtype == torch.float32
        for row, i in enumerate(live):
            single = reference.decode_step(alone[i], alone_tokens[i])
            torch.testing.assert_close(batched[row], single, rtol=1e-4, atol=atol)
            tokens[i], alone_tokens[i] = int(batched[row].argmax()), int(single.argmax())
            assert tokens[i] == alone_tokens[i], (step, i)
            assert caches[i].position == alone[i].position
        history.append([tokens[i] for i in live])
    for cache, ref in zip(caches, alone, strict=True):
        for name, tensor in ref.state_tensors().items():
            torch.testing.assert_close(cache.state_tensors()[name], tensor, rtol=1e-4, atol=1e-4)
    return history


def test_default_model_batch_equals_alone_in_window_and_superlinear_regimes(default_model):
    assert default_model.window > 1000  # the shipped window: these lengths are exact attention
    # the default model's logits run to tens: a batched fp32 matmul sums in another order (1e-4
    # of absolute difference was seen at one of 49,152 logits); greedy tokens must still agree
    _batched_equals_alone(default_model, [3, 40, 17], steps=3, atol=5e-4)
    sparse = default_model.with_attention("superlinear", span_params=SMALL_SPANS)
    assert sparse.window == 8
    history = _batched_equals_alone(sparse, [5, 90, 200, 33], steps=4, leave_at=2, atol=5e-4)
    assert len({tuple(h) for h in history}) > 1  # the rows move


@pytest.fixture(scope="module")
def hybrid():
    model = random_model(tiny_hybrid_config(), name="tiny-hybrid", device="cpu", dtype="fp32", seed=1)
    return make_state_matter(model, router_std=0.5)


def test_hybrid_batch_equals_alone(hybrid):
    assert hybrid.window == 15 and hybrid.has_recurrent_state
    # inside the window, just past it, far past it; the first row leaves at step 3
    _batched_equals_alone(hybrid, [4, 30, 150, 70, 9], steps=5, leave_at=3)


def test_static_step_equals_alone_with_padding_and_a_growing_cache(hybrid):
    """The step a CUDA graph captures (device tables, bucket padding, stacked recurrent
    buffers), run eagerly on the Triton interpreter: 3 sequences in the bucket of 4, each
    cache allocated exactly to its prompt, so the first step grows it (new tensors: the
    tables must follow); then one leaves, and the other two run twice in the bucket of 2."""
    model = random_model(hybrid.arch_config, name="tiny-hybrid", device="cpu", dtype="fp32", seed=1,
                         backend="triton")
    model.hf.load_state_dict(hybrid.hf.state_dict())
    _batched_equals_alone(model, [6, 40, 90], steps=3, leave_at=1, graph=True, atol=2e-4, exact=True,
                          alone_model=hybrid)
    assert model.batch_steps() == [{"bucket": 2, "bound": 1024, "graph": False},
                                   {"bucket": 4, "bound": 1024, "graph": False}]


def test_llama_static_step_equals_alone():
    model, reference = (random_model(TINY_LLAMA, name="tiny-llama", device="cpu", dtype="fp32", backend=backend,
                                     span_params=SMALL_SPANS) for backend in ("triton", "reference"))
    _batched_equals_alone(model, [7, 60], steps=1, graph=True, atol=2e-4, alone_model=reference)


def test_buckets_and_bounds():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    with pytest.raises(ValueError):
        bucket_for(BUCKETS[-1] + 1)
    assert bound_for(1) == 1024 and bound_for(1024) == 1024 and bound_for(1025) == 2048
    assert bound_for((1 << 20) + 1) == 1 << 21


def test_decode_batch_rejects_bad_batches(hybrid):
    caches, first = _prefilled(hybrid, [5, 6])
    with pytest.raises(InvalidRequest, match="one token per cache"):
        hybrid.decode_batch(caches, first[:1])
    with pytest.raises(InvalidRequest, match="same cache twice"):
        hybrid.decode_batch([caches[0], caches[0]], first)
    assert hybrid.decode_batch([], []).shape == (0, hybrid.vocab_size)
    assert [c.position for c in caches] == [5, 6]  # nothing appended


def test_more_rows_than_the_largest_bucket_run_in_slices():
    model = random_model(TINY_LLAMA, name="tiny-llama", device="cpu", dtype="fp32")
    caches, first = _prefilled(model, [3 + i % 5 for i in range(BUCKETS[-1] + 3)])
    alone = [c.clone() for c in caches]
    batched = model.decode_batch(caches, first)
    single = torch.stack([model.decode_step(c, t) for c, t in zip(alone, first, strict=True)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
