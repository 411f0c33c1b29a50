"""Triton kernels of superlinear attention against the PyTorch reference.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` at small sizes with fp32/fp16 inputs
(the interpreter's bf16 arithmetic is wrong). ``@pytest.mark.gpu`` tests run on the device
machine: bf16 against an fp32 reference, lengths up to 64K, CUDA-graph decode.

Routing inputs (q1, k) are multiples of 1/4 (see ``make_inputs``), so routing scores are exact in
fp32 and bf16 in any summation order: the selected anchors must match exactly, ties included.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # must be set before the kernels are decorated (their modules are imported below)
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from test_kernels_reference import COMBOS, make_inputs  # noqa: E402

from superlinear.kernels import SpanParams, superlinear_decode, superlinear_prefill  # noqa: E402
from superlinear.kernels.attention.reference import reference_decode, reference_prefill  # noqa: E402

cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where there is no GPU")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _prefill(*args, **kw):
    return superlinear_prefill(*args, backend="triton", **kw)


def _decode(*args, **kw):
    return superlinear_decode(*args, backend="triton", **kw)


# ---------------------------------------------------------------------------------------------
# CPU: TRITON_INTERPRET=1, small sizes, fp32 / fp16
# ---------------------------------------------------------------------------------------------

# GQA ratios 1, 3, 16; int and float power; window and none; ff = 0 and > 0; masks
INTERP = [0, 1, 2, 3, 4]


@cpu_only
@pytest.mark.parametrize("ci", INTERP)
def test_interp_prefill_and_decode_match_reference(ci):
    cfg, B, HQ, HKV, LQ, LKV, _, pad = COMBOS[ci]
    LQ, LKV = min(LQ, 24), min(LKV, 110)
    if HQ == 16:
        LQ, LKV = 8, 80
    p = SpanParams(**cfg)
    q1, q2, k, v, pos, mask = make_inputs(B, HQ, HKV, LQ, LKV, 16, seed=100 + ci, left_pad=pad)
    ref = reference_prefill(q1, q2, k, v, pos, p, mask)
    out = _prefill(q1, q2, k, v, pos, p, key_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # decode at the last position, static cache with a garbage (NaN) tail
    cap = LKV + 37
    kc = torch.full((B, HKV, cap, 16), float("nan"))
    vc = torch.full((B, HKV, cap, 16), float("nan"))
    kc[:, :, :LKV], vc[:, :, :LKV] = k, v
    mc = None
    if mask is not None:
        mc = torch.zeros(B, cap, dtype=torch.bool)
        mc[:, :LKV] = mask
    posd = torch.full((B,), LKV - 1, dtype=torch.long)
    od = _decode(q1[:, :, -1:], q2[:, :, -1:], kc, vc, posd, p, key_mask=mc)
    torch.testing.assert_close(od, ref[:, :, -1:], atol=2e-5, rtol=1e-5)


@cpu_only
def test_interp_fp16_and_equalities():
    cfg, B, HQ, HKV, _, _, _, _ = COMBOS[0]
    p = SpanParams(**cfg)
    L = 72
    q1, q2, k, v, pos, mask = make_inputs(2, 3, 1, L, L, 16, seed=7, left_pad=[0, 11])
    h = [x.half() for x in (q1, q2, k, v)]
    ref = reference_prefill(*(x.float() for x in h), pos, p, mask)
    full = _prefill(*h, pos, p, key_mask=mask)
    assert full.dtype == torch.float16
    torch.testing.assert_close(full.float(), ref, atol=2e-3, rtol=2e-3)
    # chunked prefill == full prefill (tail after each chunk is garbage)
    start = 0
    for size in (40, 32):
        end = start + size
        kc, vc = h[2].clone(), h[3].clone()
        kc[:, :, end:] = float("nan")
        vc[:, :, end:] = float("nan")
        o = _prefill(h[0][:, :, start:end], h[1][:, :, start:end], kc, vc, torch.arange(start, end), p,
                     key_mask=mask)
        torch.testing.assert_close(o.float(), full[:, :, start:end].float(), atol=2e-3, rtol=2e-3)
        start = end
    # decode == last row of prefill, at several positions, different per sequence
    ts = torch.tensor([16, 61])
    bi = torch.arange(2)
    qa = h[0][bi, :, ts][:, :, None]
    qb = h[1][bi, :, ts][:, :, None]
    kc, vc = h[2].clone(), h[3].clone()
    for b, t in enumerate(ts.tolist()):
        kc[b, :, t + 1:] = float("nan")
        vc[b, :, t + 1:] = float("nan")
    o = _decode(qa, qb, kc, vc, ts, p, key_mask=mask)
    torch.testing.assert_close(o.float(), full[bi, :, ts][:, :, None].float(), atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

MODEL_CFG = dict(sw_index=3, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.5,
                 inv_search_power=2)
GPU_COMBOS = [
    # (params, B, HQ, HKV, L, LQ, D, left_pad)
    (MODEL_CFG, 1, 8, 2, 4096, 4096, 64, None),
    (dict(MODEL_CFG, forward_factor=0.0, sw_index=0), 2, 6, 2, 3000, 1000, 128, [0, 333]),
    (dict(sw_index=65, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.55,
          search_power=0.55), 1, 16, 1, 8192, 512, 128, None),
    (dict(sw_index=2, num_spans=2, backward_factor=2.0, forward_factor=0.5, span_power=0.6, search_power=0.6),
     1, 3, 3, 2048, 700, 64, [100]),
    (dict(MODEL_CFG, inv_search_power=3, sw_index=1), 1, 4, 4, 2048, 2048, 64, None),
]


def _gpu_inputs(B, HQ, HKV, LQ, L, D, seed, pad, dtype):
    q1, q2, k, v, _, mask = make_inputs(B, HQ, HKV, LQ, L, D, seed=seed, left_pad=pad)
    pos = torch.arange(L - LQ, L)
    dev = "cuda"
    xs = [x.to(dtype).to(dev) for x in (q1, q2, k, v)]
    return xs + [pos.to(dev), None if mask is None else mask.to(dev)]


@gpu
@needs_cuda
@pytest.mark.parametrize("ci", range(len(GPU_COMBOS)))
def test_gpu_bf16_prefill_decode_vs_fp32_reference(ci):
    cfg, B, HQ, HKV, L, LQ, D, pad = GPU_COMBOS[ci]
    p = SpanParams(**cfg)
    q1, q2, k, v, pos, mask = _gpu_inputs(B, HQ, HKV, LQ, L, D, 200 + ci, pad, torch.bfloat16)
    ref = reference_prefill(q1.float(), q2.float(), k.float(), v.float(), pos, p, mask)
    out = _prefill(q1, q2, k, v, pos, p, key_mask=mask)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 2e-2
    # decode at the last position == reference decode == last row of prefill
    posd = torch.full((B,), L - 1, device="cuda", dtype=torch.long)
    od = _decode(q1[:, :, -1:], q2[:, :, -1:], k, v, posd, p, key_mask=mask)
    assert (od.float() - ref[:, :, -1:]).abs().max().item() < 2e-2
    assert (od.float() - out[:, :, -1:].float()).abs().max().item() < 2e-2


@gpu
@needs_cuda
def test_gpu_fp32_tight():
    cfg, B, HQ, HKV, L, LQ, D, pad = GPU_COMBOS[1]
    p = SpanParams(**cfg)
    q1, q2, k, v, pos, mask = _gpu_inputs(B, HQ, HKV, LQ, L, D, 5, pad, torch.float32)
    ref = reference_prefill(q1, q2, k, v, pos, p, mask)
    out = _prefill(q1, q2, k, v, pos, p, key_mask=mask)
    assert (out - ref).abs().max().item() < 1e-4


@gpu
@needs_cuda
def test_gpu_chunked_equals_full_and_64k():
    p = SpanParams(**MODEL_CFG)
    L, LQ = 65536, 1024
    B, HQ, HKV, D = 1, 8, 2, 128
    q1, q2, k, v, pos, _ = _gpu_inputs(B, HQ, HKV, LQ, L, D, 9, None, torch.bfloat16)
    full = _prefill(q1, q2, k, v, pos, p)
    ref = reference_prefill(q1.float(), q2.float(), k.float(), v.float(), pos, p)
    assert (full.float() - ref).abs().max().item() < 2e-2
    kc, vc = k.clone(), v.clone()
    for c0 in range(0, LQ, 256):
        end = L - LQ + c0 + 256
        kc[:, :, end:] = float("nan")
        vc[:, :, end:] = float("nan")
        o = _prefill(q1[:, :, c0:c0 + 256], q2[:, :, c0:c0 + 256], kc, vc, pos[c0:c0 + 256], p)
        assert (o.float() - full[:, :, c0:c0 + 256].float()).abs().max().item() < 1e-2
        kc[:, :, end:], vc[:, :, end:] = k[:, :, end:], v[:, :, end:]
    posd = torch.tensor([L - 1], device="cuda")
    od = _decode(q1[:, :, -1:], q2[:, :, -1:], k, v, posd, p)
    assert (od.float() - ref[:, :, -1:]).abs().max().item() < 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("cfg", [MODEL_CFG, GPU_COMBOS[2][0]])
def test_gpu_decode_cuda_graph_replay(cfg):
    p = SpanParams(**cfg)
    B, HQ, HKV, D, cap = 2, 16, 2, 128, 32768
    g = torch.Generator(device="cuda").manual_seed(3)
    k = ((torch.randn(B, HKV, cap, D, device="cuda", generator=g) * 2).round() / 4).bfloat16()
    v = torch.randn(B, HKV, cap, D, device="cuda", generator=g).bfloat16()
    q1 = torch.zeros(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    q2 = torch.zeros_like(q1)
    pos = torch.zeros(B, device="cuda", dtype=torch.long)
    _decode(q1, q2, k, v, pos, p)  # warm up: compile, tables
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _decode(q1, q2, k, v, pos, p)
    for step, (t0, t1) in enumerate([(5, 9), (100, 3000), (20000, 777), (32767, 32000)]):
        q1.copy_(((torch.randn(B, HQ, 1, D, device="cuda", generator=g) * 2).round() / 4).bfloat16())
        q2.copy_(torch.randn(B, HQ, 1, D, device="cuda", generator=g).bfloat16())
        pos.copy_(torch.tensor([t0, t1], device="cuda"))
        graph.replay()
        eager = _decode(q1, q2, k, v, pos, p)
        ref = reference_decode(q1.float(), q2.float(), k.float(), v.float(), pos, p)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), step
        assert (out.float() - ref).abs().max().item() < 2e-2, step
