"""``Model.decode_batch`` on a CUDA GPU in bf16: the bucket's CUDA graph (device tables of K/V
addresses, padding rows, stacked recurrent buffers) against each sequence's own graph-decoded
``decode_step``. The hybrid's rows run other ops than one sequence's step (the grouped matmul
and fla's conv/recurrence, where one sequence runs the fused MoE and Mamba-2 kernels), so they
agree within the bound the fused ops meet against the default path (tests/test_model_ops.py).
Run on the device machine: scripts/gpu_batch.sh."""

from __future__ import annotations

import pytest
import torch
from test_model_decode_batch import TINY_LLAMA
from test_model_hybrid_gpu import gpu_hybrid, rel  # noqa: F401 - the fixture, shared

from superlinear.kernels import SpanParams
from superlinear.model.random_weights import random_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _batched_against_alone(model, lengths, steps, grow=()):
    """Greedy decode together (``decode_batch``) and alone (``decode_step``, clones), the
    alone tokens fed to both; caches in ``grow`` are allocated exactly to their prompt, so the
    batched step grows them (new tensors)."""
    g = torch.Generator().manual_seed(5)
    caches, tokens = [], []
    for i, length in enumerate(lengths):
        cache = model.new_cache(length + steps + 2048)
        if i in grow:
            cache.reserve(length, exact=True)
        tokens.append(int(model.prefill(cache, torch.randint(0, model.vocab_size, (length,), generator=g),
                                        chunk_size=256).argmax()))
        caches.append(cache)
    alone = [c.clone() for c in caches]
    worst, same = 0.0, 0
    for _ in range(steps):
        batched = model.decode_batch(caches, tokens)
        single = torch.stack([model.decode_step(c, t) for c, t in zip(alone, tokens, strict=True)])
        worst = max(worst, rel(batched, single))
        same += int(torch.equal(batched.argmax(-1), single.argmax(-1)))
        tokens = single.argmax(-1).tolist()
    assert [c.position for c in caches] == [c.position for c in alone]
    return worst, same


def test_hybrid_bucket_graph_equals_each_sequence_alone(gpu_hybrid):  # noqa: F811
    worst, same = _batched_against_alone(gpu_hybrid, [5, 40, 700, 300, 1200], steps=24, grow=(2,))
    info = gpu_hybrid.info()
    assert info["batch_graph_error"] is None and info["cuda_graph_error"] is None
    assert [s["bucket"] for s in gpu_hybrid.batch_steps() if s["graph"]] == [8]
    assert worst < 3e-2, worst
    assert same >= 22, same  # bf16: a near-tie may flip a step's argmax, rarely


def test_hybrid_buckets_2_to_16_and_a_cache_past_the_bound(gpu_hybrid):  # noqa: F811
    for count in (2, 3, 9):
        worst, _ = _batched_against_alone(gpu_hybrid, [17 + 50 * i for i in range(count)], steps=4)
        assert worst < 3e-2, (count, worst)
    # a cache longer than the bucket's bound: the step is rebuilt for a larger bound
    worst, _ = _batched_against_alone(gpu_hybrid, [40, 1500], steps=4)
    assert worst < 3e-2
    assert {s["bucket"]: s["bound"] for s in gpu_hybrid.batch_steps()}[2] == 4096


def test_llama_bucket_graph_equals_each_sequence_alone():
    spans = SpanParams(sw_index=2, num_spans=2, backward_factor=3.0, forward_factor=1.0, span_power=0.5,
                       inv_search_power=2)
    config = dict(TINY_LLAMA, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=2048)
    model = random_model(config, name="gpu-llama", device="cuda", dtype="bf16", span_params=spans, seed=2)
    worst, same = _batched_against_alone(model, [3, 100, 900, 64], steps=16, grow=(1,))
    assert model.info()["batch_graph_error"] is None
    assert worst < 1e-2 and same >= 15, (worst, same)
