"""Every Triton kernel under the interpreter's bounds check (tests/triton_memcheck.py), at small,
deliberately ragged sizes: head dims, lengths, expert counts and widths that are not multiples of
the block sizes, decode positions where fewer candidates exist than spans are selected, key
masks, a static cache longer than the live keys. Each address a mask lets through must lie in a
tensor argument; the results must also match the oracles (a masked-off lane must not leak in).
On the GPU, compute-sanitizer does the same (scripts/gpu_suite.sh, step "memcheck").
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (imported lazily below)
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's check runs where there is no GPU")
pytest.importorskip("triton")

from test_kernels_reference import make_inputs  # noqa: E402
from test_model_ops import MOE_CASES, PROLOGUE_CASES, moe_inputs, prologue_inputs  # noqa: E402
from triton_memcheck import OutOfBounds, bounds_checked  # noqa: E402

from superlinear.kernels import SpanParams, superlinear_decode, superlinear_prefill  # noqa: E402
from superlinear.kernels.attention.reference import reference_decode, reference_prefill  # noqa: E402
from superlinear.kernels.moe_decode import expert_rows_reference, fused_moe_decode, moe_decode_reference  # noqa: E402

# (params, B, HQ, HKV, LQ, LKV, D, left pad): window and none, forward spans and none, GQA,
# integer and float powers; D, LQ and LKV off the block sizes (16 on CPU)
ATTENTION = [
    (dict(sw_index=3, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.5, inv_search_power=2),
     1, 6, 2, 37, 53, 12, None),
    (dict(sw_index=0, num_spans=3, backward_factor=2.0, forward_factor=0.0, span_power=0.55, search_power=0.55),
     2, 3, 1, 29, 29, 20, [0, 7]),
    (dict(sw_index=2, num_spans=4, backward_factor=1.5, forward_factor=0.5, span_power=0.6, inv_search_power=3),
     1, 2, 2, 45, 45, 8, None),
]


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


@pytest.mark.parametrize("case", range(len(ATTENTION)))
def test_attention_prefill_and_decode_stay_in_bounds(case):
    cfg, B, HQ, HKV, LQ, LKV, D, pad = ATTENTION[case]
    params = SpanParams(**cfg)
    q1, q2, k, v, pos, mask = make_inputs(B, HQ, HKV, LQ, LKV, D, seed=40 + case, left_pad=pad)
    with bounds_checked():
        out = superlinear_prefill(q1, q2, k, v, pos, params, key_mask=mask, backend="triton")
    torch.testing.assert_close(out, reference_prefill(q1, q2, k, v, pos, params, mask), atol=2e-5, rtol=1e-5)
    # decode on a static cache longer than the keys, at the first positions (fewer candidate
    # stripes than spans: the empty slots) and at the last one
    cap = LKV + 19
    kc, vc = torch.zeros(B, HKV, cap, D), torch.zeros(B, HKV, cap, D)
    kc[:, :, :LKV], vc[:, :, :LKV] = k, v
    mc = None
    if mask is not None:
        mc = torch.zeros(B, cap, dtype=torch.bool)
        mc[:, :LKV] = mask
    for t in (0, 1, params.window_len + 1, LKV - 1):
        if t >= LKV:
            continue
        row = t - (LKV - LQ)
        if row < 0:
            continue
        posd = torch.full((B,), t, dtype=torch.long)
        qa, qb = q1[:, :, row:row + 1], q2[:, :, row:row + 1]
        with bounds_checked():
            got = superlinear_decode(qa, qb, kc, vc, posd, params, key_mask=mc, backend="triton")
        want = reference_decode(qa, qb, kc, vc, posd, params, mc)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", range(len(MOE_CASES)))
def test_fused_moe_decode_stays_in_bounds(case):
    E, H, inner, shared_inner, K, latent = MOE_CASES[case]
    inputs = moe_inputs(E, H, inner, shared_inner, torch.float32, latent, seed=case)
    kw = dict(top_k=K, norm_topk=True, scaling=2.5, act="relu2")
    with bounds_checked():
        got = fused_moe_decode(**inputs, **kw, block_e=8, block_i=16, block_h=32, block_o=16)
    torch.testing.assert_close(got, moe_decode_reference(**inputs, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows_per_x", [1, 3])
def test_expert_rows_stays_in_bounds(rows_per_x):
    from superlinear.kernels.moe_decode.triton_rows import expert_rows

    g = torch.Generator().manual_seed(rows_per_x)
    weight = torch.randn(5, 37, 300, generator=g)  # 37 rows, 300 inputs: off BLOCK_N and BLOCK_K
    x = torch.randn(2, 300, generator=g)
    experts = torch.randint(0, 5, (2 * rows_per_x,), generator=g)
    with bounds_checked():
        got = expert_rows(x, weight, experts, rows_per_x)
    torch.testing.assert_close(got, expert_rows_reference(x, weight, experts, rows_per_x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(len(PROLOGUE_CASES)))
def test_mamba_step_prologue_stays_in_bounds(case):
    from superlinear.kernels.mamba2_step import step_prologue, step_prologue_reference

    *shape, bias = PROLOGUE_CASES[case]
    dims, inputs = prologue_inputs(*shape, dtype=torch.float32, bias=bias, seed=case)
    ref_state = inputs["conv_state"].clone()
    expected = step_prologue_reference(**{**inputs, "conv_state": ref_state}, dims=dims)
    with bounds_checked():
        got = step_prologue(**inputs, dims=dims)
    assert torch.equal(inputs["conv_state"], ref_state)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
