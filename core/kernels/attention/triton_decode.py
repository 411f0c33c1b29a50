"""Triton decode of superlinear attention: one query per sequence, four launches, no host sync.

Every shape is derived from the static cache length LKV (never from the positions, which stay on
the device), so the call can be captured in a CUDA graph and replayed at new positions; programs
past the live length exit early.

1. ``_dec_score_kernel`` (batch x kv head x candidate block): routing scores q1 . k[anchor] of all
   candidate stripes for every query head of the GQA group (fp32), -inf where invalid.
2. ``dec_topk_kernel`` (batch x query head): top-k (tie: larger i), gate logits, span bounds.
3. ``_dec_partial_kernel`` (batch x query head x (k slots + window) x split): one chunk of its
   slot's span (or of the window) -> partial softmax (max, sum, acc), split-K / flash-decoding.
4. ``dec_combine_kernel`` (batch x query head): merges the splits, O_j = merge(window, span_j),
   gate softmax, output.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .params import SpanParams
from .triton_common import (
    device_tables,
    first_key,
    mask_u8,
    next_pow2,
    query_shapes,
    sequence_and_kv_head,
    span_bounds,
    unit_stride,
)


@triton.jit
def dec_candidates(offs_ptr, t, S1, NS, NC, BLOCK_C: tl.constexpr):
    """The block of candidate stripes of this program (grid axis 1) for a query at position ``t``:
    their indices ``c`` (from the first searched stripe ``S1``), their anchors ``t + 1 - F(stripe)``
    and which are live (the stripe exists and its first key is reached)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    stripe = S1 + c
    live = (c < NC) & (stripe < NS)
    first = tl.load(offs_ptr + stripe, mask=live, other=2147483647).to(tl.int32)
    return c, t + 1 - first, live & (first <= t + 1)


@triton.jit
def dec_group_queries(q1_ptr, b, hk, sq_b, sq_h, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """The routing queries of the G query heads of kv head ``hk``'s group, ``[GP, BLOCK_D]``
    (zero rows past G): they score the gathered anchor keys in one product (``dec_store_scores``)."""
    d = tl.arange(0, BLOCK_D)
    gh = tl.arange(0, GP)
    h = hk * G + gh
    return tl.load(q1_ptr + b * sq_b + h[:, None] * sq_h + d[None, :], mask=(gh < G)[:, None] & (d < D)[None, :],
                   other=0.0)


@triton.jit
def dec_store_scores(score_ptr, q, kt, live, b, hk, c, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                     NC_PAD: tl.constexpr, IEEE: tl.constexpr):
    """The group's scores of the candidates ``c``: ``q [GP, D]`` times the anchor keys
    ``kt [D, BLOCK_C]`` (fp32), -inf where a candidate is not live."""
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = tl.where(live[None, :], s, float("-inf"))
    gh = tl.arange(0, GP)
    h = hk * G + gh
    tl.store(score_ptr + (b * HQ + h[:, None]) * NC_PAD + c[None, :], s, mask=(gh < G)[:, None] & (c[None, :] < NC_PAD))


@triton.jit
def _dec_score_kernel(q1_ptr, k_ptr, pos_ptr, mask_ptr, offs_ptr, score_ptr,
                      sq_b, sq_h, sk_b, sk_h, sk_l, sm_b,
                      LKV, KS, NS, S1, NC,
                      HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, NC_PAD: tl.constexpr,
                      MASKED: tl.constexpr, IEEE: tl.constexpr):
    b, hk, t = sequence_and_kv_head(pos_ptr, HQ, G)
    c, a, ok = dec_candidates(offs_ptr, t, S1, NS, NC, BLOCK_C)
    ok = ok & (a - KS < LKV) & (a >= KS)  # the keys held here: positions KS .. KS + LKV - 1
    if MASKED:
        ok = ok & (tl.load(mask_ptr + b * sm_b + (a - KS), mask=ok, other=0) != 0)
    q = dec_group_queries(q1_ptr, b, hk, sq_b, sq_h, G, GP, D, BLOCK_D)
    d = tl.arange(0, BLOCK_D)
    # int64 offsets: a 16M-token cache of 128-wide heads is 2**31 elements per head
    kt = tl.load(k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h + (a - KS).to(tl.int64)[None, :] * sk_l
                 + d[:, None],
                 mask=ok[None, :] & (d[:, None] < D), other=0.0)
    dec_store_scores(score_ptr, q, kt, ok, b, hk, c, HQ, G, GP, NC_PAD, IEEE)


@triton.jit
def dec_topk_kernel(pos_ptr, st_ptr, offs_ptr, back_ptr, fwd_ptr, score_ptr, gate_ptr, lo_ptr, hi_ptr,
                     LKV, S1, CAP, W,
                     HQ: tl.constexpr, NC_PAD: tl.constexpr, NUM_SPANS: tl.constexpr, HAS_FWD: tl.constexpr):
    """Per (batch, query head): top-k of the candidate scores (a tie keeps the larger index,
    i.e. the larger stripe), the gate logits and each selected span's bounds."""
    pid_bh = tl.program_id(0)
    b = pid_bh // HQ
    t = tl.load(pos_ptr + b).to(tl.int32)
    st = tl.load(st_ptr + b)
    ninf = float("-inf")
    c = tl.arange(0, NC_PAD)
    sc = tl.load(score_ptr + pid_bh * NC_PAD + c)
    for j in tl.static_range(NUM_SPANS):
        mj = tl.max(sc, 0)
        cj = tl.max(tl.where(sc == mj, c, -1), 0)
        sc = tl.where(c == cj, ninf, sc)
        valid = mj > ninf
        # an empty slot's cj is any padded candidate, past the stripe table: not read
        fi = tl.load(offs_ptr + S1 + tl.maximum(cj, 0), mask=valid, other=0).to(tl.int32)
        a = t + 1 - fi
        lo, hi = span_bounds(a, t, st, back_ptr, fwd_ptr, CAP, LKV, W, HAS_FWD)
        tl.store(gate_ptr + pid_bh * NUM_SPANS + j, tl.where(valid, mj, -1e9))
        tl.store(lo_ptr + pid_bh * NUM_SPANS + j, lo)
        tl.store(hi_ptr + pid_bh * NUM_SPANS + j, tl.where(valid, hi, lo - 1))


@triton.jit
def _dec_partial_kernel(q2_ptr, k_ptr, v_ptr, pos_ptr, mask_ptr, lo_ptr, hi_ptr,
                        part_m_ptr, part_l_ptr, part_acc_ptr,
                        sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b,
                        LKV, W, SCALE, NSPLIT,
                        HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        NUM_SPANS: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    pid_bh = tl.program_id(0)
    slot = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // G
    t = tl.load(pos_ptr + b).to(tl.int32)
    ninf = float("-inf")
    if slot < NUM_SPANS:
        lo = tl.load(lo_ptr + pid_bh * NUM_SPANS + slot)
        hi = tl.load(hi_ptr + pid_bh * NUM_SPANS + slot)
    else:
        lo = tl.maximum(t - W + 1, 0)
        hi = tl.minimum(t, LKV - 1)
        hi = tl.where(W > 0, hi, lo - 1)
    c_lo = lo + split * CHUNK
    c_hi = tl.minimum(hi, c_lo + CHUNK - 1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q2_ptr + b * sq_b + h * sq_h + d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    m_i = tl.max(acc, 0) + ninf  # fp32 scalars (loop-carried)
    l_i = tl.sum(acc, 0)
    kbase = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    vbase = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    for k0 in range(c_lo, c_hi + 1, BLOCK_N):
        kn = k0 + tl.arange(0, BLOCK_N)
        kv = kn <= c_hi
        if MASKED:
            kv = kv & (tl.load(mask_ptr + b * sm_b + kn, mask=kv, other=0) != 0)
        kn64 = kn.to(tl.int64)
        kk = tl.load(kbase + kn64[:, None] * sk_l + d[None, :], mask=kv[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        s = tl.sum(kk * q[None, :], 1) * SCALE
        s = tl.where(kv, s, ninf)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == ninf, 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        vv = tl.load(vbase + kn64[:, None] * sv_l + d[None, :], mask=kv[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vv, 0)
        m_i = m_new
    pidx = (pid_bh * (NUM_SPANS + 1) + slot) * NSPLIT + split
    tl.store(part_m_ptr + pidx, m_i)
    tl.store(part_l_ptr + pidx, l_i)
    tl.store(part_acc_ptr + pidx * BLOCK_D + d, acc)


@triton.jit
def dec_combine_kernel(gate_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, so_b, so_h, NSPLIT,
                        HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        NUM_SPANS: tl.constexpr, SPLIT_PAD: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = pid_bh // HQ
    h = pid_bh % HQ
    d = tl.arange(0, BLOCK_D)
    sp = tl.arange(0, SPLIT_PAD)
    spv = sp < NSPLIT
    ninf = float("-inf")
    # window (slot NUM_SPANS), merged over its splits
    wbase = (pid_bh * (NUM_SPANS + 1) + NUM_SPANS) * NSPLIT
    pm = tl.load(part_m_ptr + wbase + sp, mask=spv, other=ninf)
    pl = tl.load(part_l_ptr + wbase + sp, mask=spv, other=0.0)
    pa = tl.load(part_acc_ptr + (wbase + sp)[:, None] * BLOCK_D + d[None, :], mask=spv[:, None], other=0.0)
    m_w = tl.max(pm, 0)
    mws = tl.where(m_w == ninf, 0.0, m_w)
    f = tl.exp(pm - mws)
    l_w = tl.sum(pl * f, 0)
    acc_w = tl.sum(pa * f[:, None], 0)
    gmax = ninf
    for j in tl.static_range(NUM_SPANS):
        gmax = tl.maximum(gmax, tl.load(gate_ptr + pid_bh * NUM_SPANS + j))
    gsum = 0.0
    for j in tl.static_range(NUM_SPANS):
        gsum += tl.exp(tl.load(gate_ptr + pid_bh * NUM_SPANS + j) - gmax)
    res = tl.zeros([BLOCK_D], tl.float32)
    for j in tl.static_range(NUM_SPANS):
        gj = tl.exp(tl.load(gate_ptr + pid_bh * NUM_SPANS + j) - gmax) / gsum
        gj = tl.where(gj == gj, gj, 1.0 / NUM_SPANS)
        base = (pid_bh * (NUM_SPANS + 1) + j) * NSPLIT
        pm = tl.load(part_m_ptr + base + sp, mask=spv, other=ninf)
        pl = tl.load(part_l_ptr + base + sp, mask=spv, other=0.0)
        pa = tl.load(part_acc_ptr + (base + sp)[:, None] * BLOCK_D + d[None, :], mask=spv[:, None], other=0.0)
        mm = tl.maximum(tl.max(pm, 0), m_w)
        mm = tl.where(mm == ninf, 0.0, mm)
        f = tl.exp(pm - mm)
        den = tl.sum(pl * f, 0) + l_w * tl.exp(m_w - mm)
        num = tl.sum(pa * f[:, None], 0) + acc_w * tl.exp(m_w - mm)
        o = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
        res += gj * o
    tl.store(out_ptr + b * so_b + h * so_h + d, res.to(out_ptr.dtype.element_ty), mask=d < D)


class DecodePlan:
    """Static sizes for one (params, cache length, shapes): reused across steps and graph replays."""

    def __init__(self, params: SpanParams, LKV: int, device, chunk: int | None = None,
                 block_n: int | None = None, warps: int | None = None):
        tab = device_tables(params, LKV, device)
        self.tab = tab
        # sizes from the cache length itself (the tables' capacity is rounded up)
        offs = tab.offsets.cpu()
        n_ok = int(torch.searchsorted(offs, torch.tensor(LKV, dtype=offs.dtype), right=True))
        self.nc = max(1, n_ok - (params.sw_index + 1))
        self.nc_pad = next_pow2(self.nc)
        cuda = torch.device(device).type == "cuda"
        self.chunk = chunk or (128 if cuda else 64)
        self.block_n = block_n or (64 if cuda else 16)
        self.chunk = max(self.chunk, self.block_n)
        self.warps = warps or 4
        tp = min(LKV, tab.capacity)
        longest = max(int(tab.back[tp]) + int(tab.fwd[tp]) + 1, params.window_len, 1)
        self.nsplit = triton.cdiv(longest, self.chunk)
        self.split_pad = next_pow2(self.nsplit, lo=2)
        self.block_c = 32 if cuda else 16


_PLANS: dict = {}


def triton_decode(q1, q2, k, v, positions, params: SpanParams, key_mask=None, chunk: int | None = None,
                  block_n: int | None = None, warps: int | None = None, key_start: int = 0, exchange=None,
                  length_bound: int | None = None):
    """``chunk`` (keys per split program), ``block_n``, ``warps``: tuning knobs (defaults tuned on H100).

    A slice of the sequence (``reference_prefill``'s ``key_start`` and ``exchange``): k/v hold the
    keys from position ``key_start``; ``length_bound`` (the sequence's longest, e.g. the
    session's max_seq_len) sizes the candidates and tables, so every shape stays static."""
    HKV, LKV = k.shape[1], k.shape[2]
    B, HQ, _, D, G = query_shapes(q2, HKV, params)
    dev = q2.device
    K = params.num_spans
    bound = max(LKV, key_start + LKV, length_bound or 0)
    key = (params, bound, str(dev), chunk, block_n, warps)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = DecodePlan(params, bound, dev, chunk, block_n, warps)
    tab = plan.tab
    BLOCK_D = next_pow2(D)
    out = torch.empty(B, HQ, 1, D, device=dev, dtype=q2.dtype)
    pos = positions.to(device=dev, dtype=torch.int64)
    st = first_key(key_mask, B, LKV, dev)
    mk = mask_u8(key_mask, dev)
    masked = key_mask is not None
    sm_b = mk.stride(0) if masked else 0
    k, v, q1, q2 = unit_stride(k, v, q1, q2)
    scores = torch.empty(B * HQ, plan.nc_pad, device=dev, dtype=torch.float32)
    gate = torch.empty(B * HQ, K, device=dev, dtype=torch.float32)
    npart = B * HQ * (K + 1) * plan.nsplit
    part_m = torch.empty(npart, device=dev, dtype=torch.float32)
    part_l = torch.empty(npart, device=dev, dtype=torch.float32)
    part_acc = torch.empty(npart, BLOCK_D, device=dev, dtype=torch.float32)
    S1 = params.sw_index + 1
    _dec_score_kernel[(B * HKV, triton.cdiv(plan.nc_pad, plan.block_c))](
        q1, k, pos, mk, tab.offsets, scores,
        q1.stride(0), q1.stride(1), k.stride(0), k.stride(1), k.stride(2), sm_b,
        LKV, key_start, tab.num_stripes, S1, plan.nc,
        HQ=HQ, G=G, GP=next_pow2(G), D=D, BLOCK_D=BLOCK_D, BLOCK_C=plan.block_c, NC_PAD=plan.nc_pad,
        MASKED=masked, IEEE=k.dtype == torch.float32, num_warps=4)
    if exchange is not None:
        return _sliced_tail(q2, k, v, pos, params, plan, scores, key_start, exchange)
    sel_lo = torch.empty(B * HQ, K, device=dev, dtype=torch.int32)
    sel_hi = torch.empty(B * HQ, K, device=dev, dtype=torch.int32)
    dec_topk_kernel[(B * HQ,)](
        pos, st, tab.offsets, tab.back, tab.fwd, scores, gate, sel_lo, sel_hi,
        LKV, S1, tab.capacity, params.window_len,
        HQ=HQ, NC_PAD=plan.nc_pad, NUM_SPANS=K, HAS_FWD=params.forward_factor > 0, num_warps=4)
    _dec_partial_kernel[(B * HQ, K + 1, plan.nsplit)](
        q2, k, v, pos, mk, sel_lo, sel_hi, part_m, part_l, part_acc,
        q2.stride(0), q2.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sm_b,
        LKV, params.window_len, 1.0 / math.sqrt(D), plan.nsplit,
        HQ=HQ, G=G, D=D, BLOCK_D=BLOCK_D, NUM_SPANS=K, CHUNK=plan.chunk,
        BLOCK_N=plan.block_n, MASKED=masked, num_warps=plan.warps)
    dec_combine_kernel[(B * HQ,)](
        gate, part_m, part_l, part_acc, out, out.stride(0), out.stride(1), plan.nsplit,
        HQ=HQ, D=D, BLOCK_D=BLOCK_D, NUM_SPANS=K, SPLIT_PAD=plan.split_pad, num_warps=4)
    return out


def _sliced_tail(q2, k, v, pos, params: SpanParams, plan: DecodePlan, scores, key_start: int, exchange):
    """Decode over a slice of the keys, from the candidate scores on: the slice's top-k, the
    global one (``exchange.topk``), the span bounds, the partials of the keys held here (the
    partial kernel in the slice's coordinates), each span's (out, lse) joined over the slices
    (``exchange.combine``) and the gates. Torch ops with static shapes: no host sync."""
    B, HQ, _, D = q2.shape
    LKV = k.shape[2]
    K, W, S1 = params.num_spans, params.window_len, params.sw_index + 1
    tab, dev = plan.tab, q2.device
    ninf = float("-inf")
    # this slice's top-k, best first; among equal scores the farther anchor (the larger stripe)
    best, order = torch.sort(scores.view(B, HQ, plan.nc_pad).flip(-1), dim=-1, descending=True, stable=True)
    kk = min(K, plan.nc_pad)
    stripe = (S1 + plan.nc_pad - 1 - order[..., :kk]).clamp(max=tab.offsets.numel() - 1)
    t = pos.view(B, 1, 1)
    anchor = t + 1 - tab.offsets[stripe].long()
    best = best[..., :kk]
    if kk < K:
        best = torch.cat([best, best.new_full((B, HQ, K - kk), ninf)], -1)
        anchor = torch.cat([anchor, anchor.new_zeros((B, HQ, K - kk))], -1)
    score, anchor = exchange.topk(best, anchor)
    valid = torch.isfinite(score)
    # span bounds (triton_common.span_bounds without a key mask: st = 0)
    tp = (t + 1).clamp(max=tab.capacity)
    lo = (anchor - tab.back[tp].long()).clamp(min=0)
    hi = torch.minimum(anchor + tab.fwd[tp].long(), t) if params.forward_factor > 0 else anchor
    if W > 0:
        hi = torch.minimum(hi, (t - W + 1).clamp(min=0) - 1)
    hi = torch.where(valid, hi, lo - 1)
    # the part held here, in the slice's coordinates (an empty part has hi < lo)
    lo_here = (lo - key_start).clamp(min=0).to(torch.int32).reshape(B * HQ, K).contiguous()
    hi_here = (hi - key_start).clamp(max=LKV - 1).to(torch.int32).reshape(B * HQ, K).contiguous()
    BLOCK_D = next_pow2(D)
    npart = B * HQ * (K + 1) * plan.nsplit
    part_m = torch.empty(npart, device=dev, dtype=torch.float32)
    part_l = torch.empty(npart, device=dev, dtype=torch.float32)
    part_acc = torch.empty(npart, BLOCK_D, device=dev, dtype=torch.float32)
    G = HQ // k.shape[1]
    mk = mask_u8(None, dev)
    _dec_partial_kernel[(B * HQ, K + 1, plan.nsplit)](
        q2, k, v, pos - key_start, mk, lo_here, hi_here, part_m, part_l, part_acc,
        q2.stride(0), q2.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), 0,
        LKV, W, 1.0 / math.sqrt(D), plan.nsplit,
        HQ=HQ, G=G, D=D, BLOCK_D=BLOCK_D, NUM_SPANS=K, CHUNK=plan.chunk,
        BLOCK_N=plan.block_n, MASKED=False, num_warps=plan.warps)
    # the splits of each slot (K spans, then the window) merged
    pm = part_m.view(B, HQ, K + 1, plan.nsplit)
    top = pm.amax(-1)
    top_safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(pm - top_safe[..., None])
    l_slot = (w * part_l.view(B, HQ, K + 1, plan.nsplit)).sum(-1)
    acc_slot = (w[..., None] * part_acc.view(B, HQ, K + 1, plan.nsplit, BLOCK_D)[..., :D]).sum(-2)
    # each span with the window, as a normalised output and its log-sum-exp
    m = torch.maximum(top[..., :K], top[..., K:])
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    f_s, f_w = torch.exp(top[..., :K] - m_safe), torch.exp(top[..., K:] - m_safe)
    den = l_slot[..., :K] * f_s + l_slot[..., K:] * f_w
    num = acc_slot[..., :K, :] * f_s[..., None] + acc_slot[..., K:, :] * f_w[..., None]
    o = torch.where(den[..., None] > 0, num / den.clamp(min=1e-30)[..., None], torch.zeros_like(num))
    lse = torch.where(den > 0, m_safe + torch.log(den.clamp(min=1e-30)), ninf)
    o = exchange.combine(o, lse)
    gates = torch.softmax(torch.where(valid, score, torch.full_like(score, -1e9)), dim=-1)
    gates = torch.where(torch.isnan(gates), torch.full_like(gates, 1.0 / K), gates)
    return (gates[..., None] * o).sum(-2)[:, :, None].to(q2.dtype)
