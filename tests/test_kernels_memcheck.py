"""Every Triton kernel at small, deliberately ragged sizes, under a memory check: on CPU the
interpreter's bounds check (tests/triton_memcheck.py), on the GPU compute-sanitizer
(scripts/gpu_suite.sh runs these ``-m gpu`` tests under memcheck and racecheck). The sizes: head
dims, lengths, expert counts and widths that are not multiples of the block sizes, decode
positions where fewer candidates exist than spans are selected, key masks, a static cache longer
than the live keys. Each address a mask lets through must lie in a tensor argument; the results
must also match the oracles (a masked-off lane must not leak in).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (imported lazily below)
pytest.importorskip("triton")

from test_kernels_reference import make_inputs  # noqa: E402
from test_model_ops import MOE_CASES, PROLOGUE_CASES, moe_inputs, prologue_inputs  # noqa: E402
from triton_memcheck import OutOfBounds, bounds_checked  # noqa: E402

from superlinear.kernels import (  # noqa: E402
    KVRows,
    SpanParams,
    superlinear_decode,
    superlinear_decode_rows,
    superlinear_prefill,
)
from superlinear.kernels.attention.reference import reference_decode, reference_prefill  # noqa: E402
from superlinear.kernels.moe_decode import fused_moe_decode, moe_decode_reference  # noqa: E402

# the interpreter with its bounds check where there is no GPU; the device (under compute-sanitizer
# when scripts/gpu_suite.sh runs them) where there is one
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs where there is no GPU")),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])]


def checked(device: str, also=()):
    return bounds_checked(also) if device == "cpu" else contextlib.nullcontext()

# (params, B, HQ, HKV, LQ, LKV, D, left pad): window and none, forward spans and none, GQA,
# integer and float powers; D, LQ and LKV off the block sizes (16 on CPU)
ATTENTION = [(SpanParams(3, 3, 3.0, 1.0, 0.5, inv_search_power=2), 1, 6, 2, 37, 53, 12, None),
             (SpanParams(0, 3, 2.0, 0.0, 0.55, search_power=0.55), 2, 3, 1, 29, 29, 20, [0, 7]),
             (SpanParams(2, 4, 1.5, 0.5, 0.6, inv_search_power=3), 1, 2, 2, 45, 45, 8, None)]


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs where there is no GPU")
def test_the_check_sees_an_out_of_bounds_read():
    import triton
    import triton.language as tl

    @triton.jit
    def past_the_end(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n + 1), mask=i < n)

    x, out = torch.zeros(5), torch.empty(5)
    with bounds_checked(), pytest.raises(Exception, match="outside every tensor argument") as err:
        past_the_end[(1,)](x, out, 5, BLOCK=8)
    assert isinstance(err.value, OutOfBounds) or isinstance(err.value.__cause__, OutOfBounds)
    with bounds_checked():
        past_the_end[(1,)](x, out, 4, BLOCK=8)  # in bounds: no complaint


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(ATTENTION)))
def test_attention_prefill_and_decode_stay_in_bounds(case, device):
    params, B, HQ, HKV, LQ, LKV, D, pad = ATTENTION[case]
    q1, q2, k, v, pos, mask = (None if x is None else x.to(device)
                               for x in make_inputs(B, HQ, HKV, LQ, LKV, D, seed=40 + case, left_pad=pad))
    with checked(device):
        out = superlinear_prefill(q1, q2, k, v, pos, params, key_mask=mask, backend="triton")
    torch.testing.assert_close(out, reference_prefill(q1, q2, k, v, pos, params, mask), atol=2e-5, rtol=1e-5)
    # decode on a static cache longer than the keys, at the first positions (fewer candidate
    # stripes than spans: the empty slots) and at the last one
    cap = LKV + 19
    kc, vc = torch.zeros(B, HKV, cap, D, device=device), torch.zeros(B, HKV, cap, D, device=device)
    kc[:, :, :LKV], vc[:, :, :LKV] = k, v
    mc = None
    if mask is not None:
        mc = torch.zeros(B, cap, dtype=torch.bool, device=device)
        mc[:, :LKV] = mask
    for t in (0, 1, params.window_len + 1, LKV - 1):
        if t >= LKV:
            continue
        row = t - (LKV - LQ)
        if row < 0:
            continue
        posd = torch.full((B,), t, dtype=torch.long, device=device)
        qa, qb = q1[:, :, row:row + 1], q2[:, :, row:row + 1]
        with checked(device):
            got = superlinear_decode(qa, qb, kc, vc, posd, params, key_mask=mc, backend="triton")
        want = reference_decode(qa, qb, kc, vc, posd, params, mc)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(ATTENTION)))
def test_batched_decode_rows_stays_in_bounds(case, device):
    """The batched decode over sequences in their own K/V tensors (reached through a table of
    addresses): capacities off the blocks, positions at 0, inside the window and at the end."""
    params, _, HQ, HKV, _, _, D, _ = ATTENTION[case]
    capacities, positions = [37, 1, 53, 20], [36, 0, 30, 1]
    g = torch.Generator().manual_seed(case)
    keys = [((torch.randn(1, HKV, c, D, generator=g) * 2).round() / 4).to(device) for c in capacities]
    values = [torch.randn(1, HKV, c, D, generator=g).to(device) for c in capacities]
    q1 = ((torch.randn(len(capacities), HQ, 1, D, generator=g) * 2).round() / 4).to(device)
    q2 = torch.randn(len(capacities), HQ, 1, D, generator=g).to(device)
    pos = torch.tensor(positions, device=device)
    rows = KVRows.of(keys, values)
    with checked(device, also=keys + values):
        got = superlinear_decode_rows(q1, q2, rows, pos, params, backend="triton")
    for b, (k, v) in enumerate(zip(keys, values, strict=True)):
        want = reference_decode(q1[b:b + 1], q2[b:b + 1], k, v, pos[b:b + 1], params)
        torch.testing.assert_close(got[b:b + 1], want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(MOE_CASES)))
def test_fused_moe_decode_stays_in_bounds(case, device):
    E, H, inner, shared_inner, K, latent = MOE_CASES[case]
    inputs = moe_inputs(E, H, inner, shared_inner, torch.float32, latent, seed=case, tokens=1 + case % 3)
    kw = dict(top_k=K, norm_topk=True, scaling=2.5, act="relu2")
    with checked(device):
        got = fused_moe_decode(**inputs, **kw, block_e=8, block_i=16, block_h=32, block_o=16)
    torch.testing.assert_close(got, moe_decode_reference(**inputs, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(PROLOGUE_CASES)))
def test_mamba_step_prologue_stays_in_bounds(case, device):
    from superlinear.kernels.mamba2_step import step_prologue, step_prologue_reference

    *shape, bias = PROLOGUE_CASES[case]
    dims, inputs = prologue_inputs(*shape, dtype=torch.float32, bias=bias, seed=case)
    ref_state = inputs["conv_state"].clone()
    expected = step_prologue_reference(**{**inputs, "conv_state": ref_state}, dims=dims)
    with checked(device):
        got = step_prologue(**inputs, dims=dims)
    assert torch.equal(inputs["conv_state"], ref_state)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
