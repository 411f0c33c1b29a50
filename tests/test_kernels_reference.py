"""The PyTorch reference of superlinear attention: golden vectors, a naive loop, equalities."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from superlinear.kernels import SpanParams, superlinear_decode, superlinear_prefill
from superlinear.kernels.attention.naive import naive_attention
from superlinear.kernels.attention.params import get_tables, span_lengths_np, stripe_offsets_np
from superlinear.kernels.attention.reference import reference_prefill

# In the repository (tests/golden/attention, see its README); SPL_GOLDEN_DIR overrides.
GOLDEN = Path(os.environ.get("SPL_GOLDEN_DIR") or Path(__file__).resolve().parent / "golden" / "attention")


def test_golden_vectors_are_present_and_intact():
    # Without this, a missing folder would silently turn every golden test into an empty set.
    assert (GOLDEN / "cases.json").exists(), f"golden vectors not found at {GOLDEN} (set SPL_GOLDEN_DIR)"
    cases = _cases()
    assert len(cases) == 11
    for case in cases:
        digest = hashlib.sha256((GOLDEN / case["file"]).read_bytes()).hexdigest()
        assert digest == case["sha256"], f"{case['file']} does not match its sha256 in cases.json"


def _cases():
    if not (GOLDEN / "cases.json").exists():
        return []
    return json.loads((GOLDEN / "cases.json").read_text())["cases"]


# ---------------------------------------------------------------------------------------------
# parameters and exact tables
# ---------------------------------------------------------------------------------------------

def test_params_validation_and_config():
    p = SpanParams(3, 3, 3.0, 1.0, 0.5, inv_search_power=2)
    assert p.window_len == 15
    assert SpanParams(0, 2, 3, 0, 0.5, inv_search_power=2).window_len == 0
    assert SpanParams(65, 3, 3, 1, 0.55, search_power=0.55).window_len == math.floor(66 ** (1 / 0.55)) - 1
    with pytest.raises(ValueError, match="exactly one"):
        SpanParams(3, 3, 3.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        SpanParams(3, 3, 3.0, 1.0, 0.5, search_power=0.5, inv_search_power=2)
    with pytest.raises(ValueError, match="num_spans"):
        SpanParams(3, 0, 3.0, 1.0, 0.5, inv_search_power=2)
    with pytest.raises(ValueError, match="backward_factor"):
        SpanParams(3, 2, -1.0, 1.0, 0.5, inv_search_power=2)
    with pytest.raises(ValueError, match="search_power"):
        SpanParams(3, 2, 3.0, 1.0, 0.5, search_power=1.5)
    cfg = {"span_attention_sw_index": 3, "span_attention_num_spans": 3, "span_attention_backward_factor": 3,
           "span_attention_forward_factor": 1, "span_attention_span_power": 0.5,
           "span_attention_inv_search_power": 2, "span_attention_search_power": None, "hidden_size": 5}
    assert SpanParams.from_config(cfg) == p
    assert SpanParams.from_config({"sw_index": 3, "num_spans": 3, "backward_factor": 3.0,
                                   "forward_factor": 1.0, "span_power": 0.5, "inv_search_power": 2}) == p
    with pytest.raises(ValueError, match="missing"):
        SpanParams.from_config({"sw_index": 3})


def test_exact_tables():
    p = SpanParams(3, 3, 3.0, 1.0, 0.5, inv_search_power=2)
    assert stripe_offsets_np(p, 10).tolist() == [i * i for i in range(11)]
    # float mode with 1/p integral agrees with integer mode
    pf = SpanParams(3, 3, 3.0, 1.0, 0.5, search_power=0.5)
    assert stripe_offsets_np(pf, 3000).tolist() == stripe_offsets_np(p, 3000).tolist()
    back, fwd = span_lengths_np(p, 300000)
    tp = np.arange(300001)
    # ceil(3 sqrt(tp)) = smallest c with c^2 >= 9 tp
    import math as m
    exp_back = np.array([m.isqrt(9 * t - 1) + 1 if t else 0 for t in tp.tolist()])
    exp_fwd = np.array([m.isqrt(t - 1) + 1 if t else 0 for t in tp.tolist()])
    assert (back == exp_back).all() and (fwd == exp_fwd).all()
    assert back[121] == 33 and fwd[121] == 11
    # float power: F(i) = floor(i ** (20/11)), exact integer check
    p55 = SpanParams(3, 3, 3.0, 1.0, 0.55, search_power=0.55)
    offs = stripe_offsets_np(p55, 2000)
    for i in (1, 2, 7, 100, 1999, 2000):
        f = int(offs[i])
        assert f ** 11 <= i ** 20 < (f + 1) ** 11
    # ceil(3 * tp ** 0.55) at an exact 20th power: tp = 2**20 -> 3 * 2**11
    b55, _ = span_lengths_np(p55, 2**20)
    assert b55[2**20] == 3 * 2**11
    t = get_tables(p, 5000, "cpu")
    assert t.capacity >= 5000 and int(t.offsets[-1]) > t.capacity


# ---------------------------------------------------------------------------------------------
# golden vectors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_golden(case):
    from safetensors.torch import load_file

    t = load_file(str(GOLDEN / case["file"]))
    p = SpanParams(**case["params"])
    assert p.window_len == case["window_len"]
    plan: dict = {}
    out = reference_prefill(t["q1"], t["q2"], t["k"], t["v"], t["pos"], p, t.get("mask"), plan=plan)
    assert (out.double() - t["out"]).abs().max().item() <= 1e-4
    # anchor sets equal to plan_anchor (order of equal scores is not part of the contract)
    mine = plan["anchor"].sort(-1).values
    gold = t["plan_anchor"].long().sort(-1).values
    assert torch.equal(mine, gold)
    lb = t["len_boundary"]
    if lb.any():
        rows = (out.double() - t["out"]).abs().amax(dim=(1, 3))[lb]
        assert rows.max() <= 1e-4
    if case["name"].startswith("decode"):
        B = t["q1"].shape[0]
        pos = t["pos"].expand(B).contiguous()
        o = superlinear_decode(t["q1"], t["q2"], t["k"], t["v"], pos, p, t.get("mask"), backend="reference")
        assert (o.double() - t["out"]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# fresh random inputs against the naive loop
# ---------------------------------------------------------------------------------------------

def make_inputs(B, HQ, HKV, LQ, LKV, D, seed, left_pad=None, dtype=torch.float32):
    """Routing inputs (q1, k) are multiples of 1/4, so routing scores are exact in fp32 in any
    summation order (and ties happen and exercise the tie rule)."""
    g = torch.Generator().manual_seed(seed)
    q1 = (torch.randn(B, HQ, LQ, D, generator=g) * 2).round() / 4
    k = (torch.randn(B, HKV, LKV, D, generator=g) * 2).round() / 4
    q2 = torch.randn(B, HQ, LQ, D, generator=g)
    v = torch.randn(B, HKV, LKV, D, generator=g)
    q1[:, :, ::7] = 0  # exact all-zero routing rows: every score ties
    mask = None
    if left_pad is not None:
        mask = torch.ones(B, LKV, dtype=torch.bool)
        for b, n in enumerate(left_pad):
            mask[b, :n] = False
    pos = torch.arange(LKV - LQ, LKV)
    return [x.to(dtype) for x in (q1, q2, k, v)] + [pos, mask]


COMBOS = [
    # (params, B, HQ, HKV, LQ, LKV, D, left_pad)
    (dict(sw_index=3, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.5, inv_search_power=2),
     1, 3, 1, 64, 200, 16, None),
    (dict(sw_index=2, num_spans=2, backward_factor=2.0, forward_factor=0.0, span_power=0.55, search_power=0.55),
     2, 2, 2, 40, 170, 16, [0, 37]),
    (dict(sw_index=0, num_spans=3, backward_factor=3.0, forward_factor=0.5, span_power=0.5, inv_search_power=2),
     1, 16, 1, 24, 150, 8, None),
    (dict(sw_index=1, num_spans=2, backward_factor=4.0, forward_factor=2.0, span_power=0.6, inv_search_power=3),
     2, 3, 1, 50, 260, 8, [5, 0]),
    (dict(sw_index=5, num_spans=3, backward_factor=1.5, forward_factor=1.0, span_power=0.6, search_power=0.6),
     1, 6, 2, 60, 140, 8, None),
    (dict(sw_index=0, num_spans=1, backward_factor=2.0, forward_factor=0.0, span_power=0.45, search_power=0.45),
     1, 2, 1, 30, 90, 8, [20]),
]


@pytest.mark.parametrize("combo", COMBOS, ids=[f"c{i}" for i in range(len(COMBOS))])
def test_reference_matches_naive(combo):
    cfg, B, HQ, HKV, LQ, LKV, D, pad = combo
    q1, q2, k, v, pos, mask = make_inputs(B, HQ, HKV, LQ, LKV, D, seed=hash(str(combo)) % 1000, left_pad=pad)
    p = SpanParams(**cfg)
    plan: dict = {}
    out = reference_prefill(q1, q2, k, v, pos, p, mask, plan=plan)
    exp, anchors = naive_attention(*(x.double().numpy() for x in (q1, q2, k, v)), pos.numpy(), **cfg,
                                   key_mask=None if mask is None else mask.numpy())
    assert np.abs(out.double().numpy() - exp).max() < 1e-4
    assert torch.equal(plan["anchor"].sort(-1).values, torch.from_numpy(anchors).sort(-1).values)


@pytest.mark.parametrize("combo", COMBOS, ids=[f"c{i}" for i in range(len(COMBOS))])
def test_fused_matmul_and_split_paths_match_naive(combo, monkeypatch):
    """Step 3 on torch's fused CPU kernel and on the matmul path, with the default sizes and with
    a tiny budget (one-row blocks, span buckets split to a few spans, several row groups), all
    compute the naive loop's output."""
    import superlinear.kernels.attention.reference as ref

    cfg, B, HQ, HKV, LQ, LKV, D, pad = combo
    q1, q2, k, v, pos, mask = make_inputs(B, HQ, HKV, LQ, LKV, D, seed=7, left_pad=pad)
    p = SpanParams(**cfg)
    exp, _ = naive_attention(*(x.double().numpy() for x in (q1, q2, k, v)), pos.numpy(), **cfg,
                             key_mask=None if mask is None else mask.numpy())
    inputs = [x.clone() for x in (q1, q2, k, v)]
    for fused in (True, False):
        for budget in (ref._BUDGET, 300):
            monkeypatch.setattr(ref, "_FUSED", fused)
            monkeypatch.setattr(ref, "_BUDGET", budget)
            plan: dict = {}
            out = reference_prefill(q1, q2, k, v, pos, p, mask, plan=plan)
            assert (plan["hi"] >= plan["lo"]).any()  # the spans are not all empty: they do work
            assert np.abs(out.double().numpy() - exp).max() < 1e-4, (fused, budget)
            o = superlinear_decode(q1[:, :, -1:], q2[:, :, -1:], k, v, pos[-1:].expand(B).contiguous(), p, mask,
                                   backend="reference")
            assert np.abs(o.double().numpy() - exp[:, :, -1:]).max() < 1e-4, (fused, budget)
            assert all(torch.equal(x, y) for x, y in zip(inputs, (q1, q2, k, v), strict=True))  # read only


def test_decode_equals_last_row_and_garbage_tail():
    cfg = COMBOS[0][0]
    p = SpanParams(**cfg)
    B, HQ, HKV, L, D = 3, 6, 2, 300, 16
    q1, q2, k, v, _, mask = make_inputs(B, HQ, HKV, L, L, D, seed=5, left_pad=[0, 17, 100])
    full = reference_prefill(q1, q2, k, v, torch.arange(L), p, mask)
    cap = 512  # static cache longer than the positions; tail is garbage
    for t in (5, 14, 15, 16, 120, 299):
        kc = torch.full((B, HKV, cap, D), float("nan"))
        vc = torch.full((B, HKV, cap, D), float("nan"))
        kc[:, :, : t + 1] = k[:, :, : t + 1]
        vc[:, :, : t + 1] = v[:, :, : t + 1]
        mc = torch.zeros(B, cap, dtype=torch.bool)
        mc[:, :L] = mask
        pos = torch.full((B,), t, dtype=torch.long)
        o = superlinear_decode(q1[:, :, t:t + 1], q2[:, :, t:t + 1], kc, vc, pos, p, mc, backend="reference")
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, full[:, :, t:t + 1], atol=2e-5, rtol=1e-5)
    # different positions per sequence, no mask, each sequence's own tail is garbage
    full_nm = reference_prefill(q1, q2, k, v, torch.arange(L), p)
    ts = [7, 150, 299]
    kc = torch.full((B, HKV, cap, D), float("nan"))
    vc = torch.full((B, HKV, cap, D), float("nan"))
    for b, t in enumerate(ts):
        kc[b, :, : t + 1] = k[b, :, : t + 1]
        vc[b, :, : t + 1] = v[b, :, : t + 1]
    idx = torch.tensor(ts)
    qa = q1[torch.arange(B), :, idx][:, :, None]
    qb = q2[torch.arange(B), :, idx][:, :, None]
    o = superlinear_decode(qa, qb, kc, vc, idx, p, backend="reference")
    exp = full_nm[torch.arange(B), :, idx][:, :, None]
    torch.testing.assert_close(o, exp, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("ci", [0, 1, 4])
def test_chunked_prefill_equals_full(ci):
    cfg, B, HQ, HKV, _, L, D, pad = COMBOS[ci]
    p = SpanParams(**cfg)
    q1, q2, k, v, _, mask = make_inputs(B, HQ, HKV, L, L, D, seed=11 + ci, left_pad=pad)
    full = reference_prefill(q1, q2, k, v, torch.arange(L), p, mask)
    start = 0
    for size in (1, 17, 40, 64, 1000):
        end = min(L, start + size)
        if start >= end:
            break
        kc = torch.full_like(k, float("nan"))
        vc = torch.full_like(v, float("nan"))
        kc[:, :, :end] = k[:, :, :end]
        vc[:, :, :end] = v[:, :, :end]
        o = reference_prefill(q1[:, :, start:end], q2[:, :, start:end], kc, vc, torch.arange(start, end), p, mask)
        torch.testing.assert_close(o, full[:, :, start:end], atol=2e-5, rtol=1e-5)
        start = end


def test_low_precision_inputs_and_backend_choice(monkeypatch):
    p = SpanParams(**COMBOS[0][0])
    q1, q2, k, v, pos, _ = make_inputs(1, 3, 1, 32, 100, 16, seed=3)
    ref = reference_prefill(*(x.to(torch.bfloat16).float() for x in (q1, q2, k, v)), pos, p)
    for dt in (torch.float16, torch.bfloat16):
        o = superlinear_prefill(q1.to(dt), q2.to(dt), k.to(dt), v.to(dt), pos, p)
        assert o.dtype == dt
    o = superlinear_prefill(*(x.to(torch.bfloat16) for x in (q1, q2, k, v)), pos, p)
    assert (o.float() - ref).abs().max() < 2e-2
    from superlinear.kernels import resolve_backend

    assert resolve_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("SPL_ATTENTION_BACKEND", "triton")
    assert resolve_backend(None, torch.device("cpu")) == "triton"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError):
        resolve_backend("bogus", torch.device("cpu"))
