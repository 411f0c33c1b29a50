"""The batched decode over sequences of different lengths (``superlinear_decode_rows``) against
the PyTorch reference of each sequence alone.

Without CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` at small sizes in fp32/fp16.
Each sequence has its own K/V tensor (its own capacity) and position: some inside the window
(no span yet), the others past it, where spans are searched and attended.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated

triton = pytest.importorskip("triton")

from superlinear.kernels import KVRows, SpanParams, append_kv_rows, superlinear_decode_rows  # noqa: E402
from superlinear.kernels.attention.reference import reference_decode  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
PARAMS = [
    SpanParams(sw_index=3, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.5, inv_search_power=2),
    SpanParams(sw_index=1, num_spans=2, backward_factor=4.0, forward_factor=0.0, span_power=0.6, search_power=0.6),
]


def _sequences(capacities, positions, hq, hkv, d, dtype, seed):
    """Per-sequence K/V ``[1, HKV, capacity, D]`` (garbage past the position, as in a cache) and
    the queries; routing inputs are multiples of 1/4 so scores are exact in any order."""
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for cap in capacities:
        keys.append(((torch.randn(1, hkv, cap, d, generator=g) * 2).round() / 4).to(DEVICE, dtype))
        values.append(torch.randn(1, hkv, cap, d, generator=g).to(DEVICE, dtype))
    b = len(capacities)
    q1 = ((torch.randn(b, hq, 1, d, generator=g) * 2).round() / 4).to(DEVICE, dtype)
    q2 = torch.randn(b, hq, 1, d, generator=g).to(DEVICE, dtype)
    return q1, q2, keys, values, torch.tensor(positions, device=DEVICE)


def _alone(q1, q2, keys, values, positions, params):
    return torch.cat([reference_decode(q1[b:b + 1].float(), q2[b:b + 1].float(), keys[b].float(), values[b].float(),
                                       positions[b:b + 1], params) for b in range(len(keys))])


@pytest.mark.parametrize("params,dtype,hq,hkv", [(PARAMS[0], torch.float32, 4, 2), (PARAMS[1], torch.float16, 3, 1),
                                                 (PARAMS[0], torch.float16, 6, 2)], ids=["fp32", "fp16-mqa", "fp16"])
def test_rows_kernel_equals_each_sequence_alone(params, dtype, hq, hkv):
    # positions inside the window (W = 15 / 3) and far past it; capacities all different
    capacities, positions = [40, 300, 129, 16, 257], [9, 299, 100, 2, 200]
    q1, q2, keys, values, pos = _sequences(capacities, positions, hq, hkv, 16, dtype, seed=hq)
    rows = KVRows.of(keys, values)
    out = superlinear_decode_rows(q1, q2, rows, pos, params, backend="triton")
    assert out.shape == (5, hq, 1, 16) and out.dtype == dtype
    ref = _alone(q1, q2, keys, values, pos, params)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    # the reference backend of the batched entry is each sequence alone, exactly
    torch.testing.assert_close(superlinear_decode_rows(q1, q2, rows, pos, params, backend="reference"),
                               ref.to(dtype), rtol=0, atol=0)


def test_rows_kernel_reads_each_rows_own_tensor_under_a_larger_bound():
    """A table built for a larger bound (a graph captured for longer caches) and rows swapped
    between calls (another batch replayed): each row reads its own tensor."""
    params = PARAMS[0]
    q1, q2, keys, values, pos = _sequences([200, 64, 180], [190, 63, 20], 4, 2, 16, torch.float32, seed=7)
    ref = _alone(q1, q2, keys, values, pos, params)
    out = superlinear_decode_rows(q1, q2, KVRows.of(keys, values, bound=1024), pos, params, backend="triton")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    order = [2, 0, 1]
    swapped = KVRows.of([keys[i] for i in order], [values[i] for i in order], bound=1024)
    out = superlinear_decode_rows(q1[order], q2[order], swapped, pos[order], params, backend="triton")
    torch.testing.assert_close(out, ref[order], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_append_writes_each_row_at_its_position(backend):
    _, _, keys, values, pos = _sequences([8, 20, 12], [3, 19, 0], 4, 2, 16, torch.float16, seed=3)
    before = [k.clone() for k in keys]
    new_k = torch.randn(3, 2, 1, 16, device=DEVICE).to(torch.float16)
    new_v = torch.randn(3, 2, 1, 16, device=DEVICE).to(torch.float16)
    append_kv_rows(new_k, new_v, KVRows.of(keys, values), pos, backend=backend)
    for b, t in enumerate(pos.tolist()):
        torch.testing.assert_close(keys[b][0, :, t], new_k[b, :, 0], rtol=0, atol=0)
        torch.testing.assert_close(values[b][0, :, t], new_v[b, :, 0], rtol=0, atol=0)
        expected = before[b].clone()
        expected[0, :, t] = new_k[b, :, 0]
        assert torch.equal(keys[b], expected)  # nothing else written


def test_rows_reject_mismatched_inputs():
    _, _, keys, values, _ = _sequences([8, 9], [1, 2], 4, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="contiguous"):
        KVRows.of([keys[0][:, :, :4]], [values[0][:, :, :4]])
    shifted = torch.zeros(2 * 8 * 16 + 1, device=DEVICE)[1:].view(1, 2, 8, 16)  # contiguous, 4 bytes off
    with pytest.raises(ValueError, match="16-byte"):
        KVRows.of([shifted], [shifted])
    rows = KVRows.of(keys, values)
    q = torch.zeros(3, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="3 queries"):
        superlinear_decode_rows(q, q, rows, torch.zeros(3, dtype=torch.long, device=DEVICE), PARAMS[0])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_bf16_rows_at_the_30b_heads_against_the_fp32_reference_and_a_graph_replay():
    """bf16 at the 30B's attention shape (32 query heads on 2 KV heads of 128), the shipped span
    parameters, contexts from inside the window to 64K; then the kernel captured in a CUDA graph
    and replayed on the same sequences in another order (tables rewritten)."""
    from superlinear.model.loaders import span_params_from
    from superlinear.model.random_weights import read_shape

    params = span_params_from(read_shape("superlinear-exp-30b"))
    capacities, positions = [70000, 3000, 40, 20000], [65535, 2999, 12, 16000]
    q1, q2, keys, values, pos = _sequences(capacities, positions, 32, 2, 128, torch.bfloat16, seed=11)
    ref = _alone(q1, q2, keys, values, pos, params)
    rows = KVRows.of(keys, values, bound=1 << 17)
    out = superlinear_decode_rows(q1, q2, rows, pos, params)
    assert (out.float() - ref).abs().max().item() < 2e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = superlinear_decode_rows(q1, q2, rows, pos, params)
    order = [3, 1, 0, 2]
    swapped = KVRows.of([keys[i] for i in order], [values[i] for i in order], bound=1 << 17)
    for table, new in ((rows.k_ptrs, swapped.k_ptrs), (rows.v_ptrs, swapped.v_ptrs), (rows.capacity, swapped.capacity)):
        table.copy_(new)
    q1.copy_(q1[order].clone())
    q2.copy_(q2[order].clone())
    pos.copy_(pos[order].clone())
    graph.replay()
    assert (captured.float() - ref[order]).abs().max().item() < 2e-2
