"""Triton prefill of superlinear attention: search, bucketing, span tiles, window + combine.

1. ``_search_kernel`` (rows block x kv head): for each stripe i the anchors of a block of rows
   are t + 1 - F(i); every query head of the GQA group scores them against its q1 (fp32), and the
   top-k (tie: larger i) is kept in registers. Output: selected stripe and score per slot.
2. Bucketing (torch, static shapes, no host sync): the (row, slot) pairs are grouped by
   (batch, head, stripe) with one stable sort of small integer keys; rows stay in order inside a
   bucket, so the spans of a bucket slide by one key per row. Buckets are cut into tiles of
   ``BLOCK_M`` pairs; the grid is the static upper bound on the tile count.
3. ``_span_kernel`` (one tile): loads each K/V block of the union of the tile's spans once,
   multiplies it for all the tile's queries on tensor cores (fp32 accumulate), masks each row to
   its span, and writes the span's partial softmax (max, sum, unnormalised acc).
4. ``_window_combine_kernel`` (rows block x query head): the sliding window by flash attention,
   then for each slot O_j = merge(window, span_j) by log-sum-exp (they never overlap), then the
   gate softmax over the slots' scores.
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
    span_bounds,
    topk_insert,
    unit_stride,
)

NEG = -1e9


@triton.jit
def _search_kernel(q1_ptr, k_ptr, pos_ptr, mask_ptr, st_ptr, offs_ptr, back_ptr, sel_i_ptr, sel_s_ptr,
                   key_ptr, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sm_b,
                   LQ, LKV, NS, S1, POWER, CAP, R, NR, NB,
                   HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                   NUM_SPANS: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One program: BLOCK_M query rows x one kv head. For each row, the G query heads of the
    group score chunks of BLOCK_C candidates with one tensor-core product [GP, D] x [D, BLOCK_C]
    (the gathered anchor keys are shared by the heads); each chunk's top-k is merged into the
    running top-k in registers, ordered by (score, i) so that a tie keeps the larger i."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    HKV: tl.constexpr = HQ // G
    b = pid_bh // HKV
    hk = pid_bh % HKV
    gh = tl.arange(0, GP)
    gvalid = gh < G
    h = hk * G + gh
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    cc = tl.arange(0, BLOCK_C)
    ninf = float("-inf")
    # int64 offsets: a 16M-token cache of 128-wide heads is 2**31 elements per head
    kbase = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    for rr in range(0, BLOCK_M):
        row = pid_m * BLOCK_M + rr
        if row < LQ:
            t = tl.load(pos_ptr + row).to(tl.int32)
            q = tl.load(q1_ptr + b * sq_b + h[:, None] * sq_h + row * sq_l + d[None, :],
                        mask=gvalid[:, None] & dmask[None, :], other=0.0)
            # stripes with F(i) <= t + 1: i <= (t+1)**p (+2 covers the fp32 estimate; the exact
            # test reads the table)
            iend = tl.minimum((tl.exp(POWER * tl.log((t + 1).to(tl.float32))) + 2.0).to(tl.int32), NS - 1)
            b0 = tl.full([GP], ninf, tl.float32)
            b1 = b0
            b2 = b0
            b3 = b0
            i0 = tl.full([GP], -1, tl.int32)
            i1 = i0
            i2 = i0
            i3 = i0
            for c0 in range(S1, iend + 1, BLOCK_C):
                i = c0 + cc
                inb = i <= iend
                fi = tl.load(offs_ptr + i, mask=inb, other=2147483647).to(tl.int32)
                a = t + 1 - fi
                ok = inb & (fi <= t + 1) & (a < LKV)
                if MASKED:
                    ok = ok & (tl.load(mask_ptr + b * sm_b + a, mask=ok, other=0) != 0)
                kt = tl.load(kbase + a.to(tl.int64)[None, :] * sk_l + d[:, None], mask=ok[None, :] & dmask[:, None],
                             other=0.0)
                if IEEE:
                    sc = tl.dot(q, kt, input_precision="ieee")
                else:
                    sc = tl.dot(q, kt)
                sc = tl.where(ok[None, :], sc, ninf)
                for _j in tl.static_range(NUM_SPANS):
                    m = tl.max(sc, 1)
                    mi = tl.max(tl.where(sc == m[:, None], i[None, :], -1), 1)
                    sc = tl.where(i[None, :] == mi[:, None], ninf, sc)
                    b0, b1, b2, b3, i0, i1, i2, i3 = topk_insert(m, mi, b0, b1, b2, b3, i0, i1, i2, i3)
            base = ((b * HQ + h) * LQ + row) * NUM_SPANS
            st = tl.load(st_ptr + b)
            tp = tl.minimum(tl.maximum(t + 1 - st, 0), CAP)
            bk = tl.load(back_ptr + tp)
            kb = (b * HKV + hk) * NR
            for j in tl.static_range(NUM_SPANS):
                if j == 0:
                    bj = b0
                    ij = i0
                elif j == 1:
                    bj = b1
                    ij = i1
                elif j == 2:
                    bj = b2
                    ij = i2
                else:
                    bj = b3
                    ij = i3
                ok = bj > ninf
                # an empty slot (score -inf) carries a padded candidate index, past the stripe
                # table: not read
                fj = tl.load(offs_ptr + tl.maximum(ij, 0), mask=gvalid & ok, other=0).to(tl.int32)
                lo = tl.maximum(tl.maximum(t + 1 - fj - bk, 0), st)
                lo = tl.minimum(lo, LKV - 1)
                tl.store(sel_i_ptr + base + j, tl.where(ok, ij, -1), mask=gvalid)
                tl.store(sel_s_ptr + base + j, bj, mask=gvalid)
                tl.store(key_ptr + base + j, tl.where(ok, kb + lo // R, NB), mask=gvalid)


@triton.jit
def _attend_key_range(q, kbase, vbase, mask_row, lo, hi, kmin, kmax, m_i, l_i, acc,
                      sk_l, sv_l, d, dmask, SCALE,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of each query row over its own keys [lo, hi] (and the key mask), walking
    the key blocks of [kmin, kmax] once for all rows on tensor cores: the inner loop of both
    the span tiles and the sliding window. Returns the updated (max, sum, acc)."""
    ninf = float("-inf")
    start = (kmin // BLOCK_N) * BLOCK_N
    for k0 in range(start, kmax + 1, BLOCK_N):
        kn = k0 + tl.arange(0, BLOCK_N)
        kvalid = kn <= kmax
        kn64 = kn.to(tl.int64)
        kt = tl.load(kbase + kn64[None, :] * sk_l + d[:, None], mask=kvalid[None, :] & dmask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * SCALE
        inside = (kn[None, :] >= lo[:, None]) & (kn[None, :] <= hi[:, None])
        if MASKED:
            km = tl.load(mask_row + kn, mask=kvalid, other=0) != 0
            inside = inside & km[None, :]
        s = tl.where(inside, s, ninf)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == ninf, 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(vbase + kn64[:, None] * sv_l + d[None, :], mask=kvalid[:, None] & dmask[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _span_kernel(q2_ptr, k_ptr, v_ptr, pos_ptr, mask_ptr, st_ptr, offs_ptr, back_ptr, fwd_ptr, sel_i_ptr,
                 order_ptr, tile_bucket_ptr, tile_first_ptr, tile_n_ptr,
                 span_m_ptr, span_l_ptr, span_acc_ptr,
                 sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b,
                 LQ, LKV, NR, CAP, W, SCALE,
                 HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPANS: tl.constexpr,
                 MASKED: tl.constexpr, HAS_FWD: tl.constexpr, IEEE: tl.constexpr):
    tid = tl.program_id(0)
    n = tl.load(tile_n_ptr + tid)
    if n <= 0:
        return
    bucket = tl.load(tile_bucket_ptr + tid)  # (b, kv head, span start // R)
    first = tl.load(tile_first_ptr + tid)
    HKV: tl.constexpr = HQ // G
    bk = bucket // NR
    b = bk // HKV
    hk = bk % HKV
    e_off = tl.arange(0, BLOCK_M)
    evalid = e_off < n
    e = tl.load(order_ptr + first + e_off, mask=evalid, other=0)  # flat (b, h, row, slot)
    row = (e // NUM_SPANS) % LQ
    h = (e // (NUM_SPANS * LQ)) % HQ
    i = tl.load(sel_i_ptr + e, mask=evalid, other=0)
    t = tl.load(pos_ptr + row, mask=evalid, other=0).to(tl.int32)
    st = tl.load(st_ptr + b)
    fi = tl.load(offs_ptr + i, mask=evalid, other=0).to(tl.int32)
    a = t + 1 - fi
    lo, hi = span_bounds(a, t, st, back_ptr, fwd_ptr, CAP, LKV, W, HAS_FWD)
    hi = tl.where(evalid, hi, -1)
    lo = tl.where(evalid, lo, 2147483647)
    kmin = tl.min(lo, 0)
    kmax = tl.max(hi, 0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q2_ptr + b * sq_b + h[:, None] * sq_h + row[:, None] * sq_l + d[None, :],
                mask=evalid[:, None] & dmask[None, :], other=0.0)
    ninf = float("-inf")
    m_i = tl.full([BLOCK_M], ninf, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kbase = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    vbase = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    m_i, l_i, acc = _attend_key_range(q, kbase, vbase, mask_ptr + b * sm_b, lo, hi, kmin, kmax,
                                      m_i, l_i, acc, sk_l, sv_l, d, dmask, SCALE,
                                      BLOCK_N, MASKED, IEEE)
    tl.store(span_m_ptr + e, m_i, mask=evalid)
    tl.store(span_l_ptr + e, l_i, mask=evalid)
    tl.store(span_acc_ptr + e.to(tl.int64)[:, None] * BLOCK_D + d[None, :], acc, mask=evalid[:, None])


@triton.jit
def _window_combine_kernel(q2_ptr, k_ptr, v_ptr, pos_ptr, mask_ptr,
                           sel_i_ptr, sel_s_ptr, span_m_ptr, span_l_ptr, span_acc_ptr, out_ptr,
                           sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b,
                           so_b, so_h, so_l,
                           LQ, LKV, W, SCALE,
                           HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPANS: tl.constexpr,
                           MASKED: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // G
    row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rvalid = row < LQ
    t = tl.load(pos_ptr + row, mask=rvalid, other=0).to(tl.int32)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    ninf = float("-inf")
    m_w = tl.full([BLOCK_M], ninf, tl.float32)
    l_w = tl.zeros([BLOCK_M], tl.float32)
    acc_w = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if W > 0:
        q = tl.load(q2_ptr + b * sq_b + h * sq_h + row[:, None] * sq_l + d[None, :],
                    mask=rvalid[:, None] & dmask[None, :], other=0.0)
        w_lo = tl.maximum(t - W + 1, 0)
        w_hi = tl.minimum(t, LKV - 1)
        w_lo = tl.where(rvalid, w_lo, 2147483647)
        w_hi = tl.where(rvalid, w_hi, -1)
        kmin = tl.min(w_lo, 0)
        kmax = tl.max(w_hi, 0)
        kbase = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
        vbase = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
        m_w, l_w, acc_w = _attend_key_range(q, kbase, vbase, mask_ptr + b * sm_b, w_lo, w_hi, kmin, kmax,
                                            m_w, l_w, acc_w, sk_l, sv_l, d, dmask, SCALE,
                                            BLOCK_N, MASKED, IEEE)
    # gate: softmax over the slots' scores (-1e9 for unselected slots)
    base = ((b * HQ + h) * LQ + row) * NUM_SPANS
    gmax = tl.full([BLOCK_M], ninf, tl.float32)
    for j in tl.static_range(NUM_SPANS):
        sj = tl.load(sel_s_ptr + base + j, mask=rvalid, other=0.0)
        sj = tl.where(sj == ninf, -1e9, sj)
        gmax = tl.maximum(gmax, sj)
    gsum = tl.zeros([BLOCK_M], tl.float32)
    for j in tl.static_range(NUM_SPANS):
        sj = tl.load(sel_s_ptr + base + j, mask=rvalid, other=0.0)
        sj = tl.where(sj == ninf, -1e9, sj)
        gsum += tl.exp(sj - gmax)
    res = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in tl.static_range(NUM_SPANS):
        ij = tl.load(sel_i_ptr + base + j, mask=rvalid, other=-1)
        sj = tl.load(sel_s_ptr + base + j, mask=rvalid, other=0.0)
        sj = tl.where(sj == ninf, -1e9, sj)
        gj = tl.exp(sj - gmax) / gsum
        gj = tl.where(gj == gj, gj, 1.0 / NUM_SPANS)  # NaN -> uniform
        sel = (ij >= 0) & rvalid
        ms = tl.load(span_m_ptr + base + j, mask=sel, other=ninf)
        ls = tl.load(span_l_ptr + base + j, mask=sel, other=0.0)
        accs = tl.load(span_acc_ptr + (base + j).to(tl.int64)[:, None] * BLOCK_D + d[None, :], mask=sel[:, None],
                       other=0.0)
        mm = tl.maximum(ms, m_w)
        mm = tl.where(mm == ninf, 0.0, mm)
        aw = tl.exp(m_w - mm)
        asp = tl.exp(ms - mm)
        den = l_w * aw + ls * asp
        num = acc_w * aw[:, None] + accs * asp[:, None]
        o = tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], 0.0)
        res += gj[:, None] * o
    tl.store(out_ptr + b * so_b + h * so_h + row[:, None] * so_l + d[None, :],
             res.to(out_ptr.dtype.element_ty), mask=rvalid[:, None] & dmask[None, :])


def _blocks(device_is_cuda: bool, G: int, BLOCK_D: int):
    if device_is_cuda:
        return dict(search_m=16, search_c=64, search_warps=4, span_m=128, span_n=64, span_warps=4,
                    span_stages=2, win_m=64, win_n=64)
    return dict(search_m=8, search_c=16, search_warps=4, span_m=16, span_n=16, span_warps=4,
                span_stages=1, win_m=16, win_n=16)


def triton_prefill(q1, q2, k, v, positions, params: SpanParams, key_mask=None, blocks: dict | None = None,
                   timings: list | None = None):
    """``blocks`` overrides tile sizes; ``timings`` (a list, CUDA only) receives CUDA events
    around the stages: search, bucketing, span tiles, window+combine."""
    HKV, LKV = k.shape[1], k.shape[2]
    B, HQ, LQ, D, G = query_shapes(q2, HKV, params)
    dev = q2.device
    K = params.num_spans
    out = torch.empty(B, HQ, LQ, D, device=dev, dtype=q2.dtype)
    if LQ == 0:
        return out
    BLOCK_D = next_pow2(D)
    cfg = _blocks(dev.type == "cuda", G, BLOCK_D)
    if blocks:
        cfg.update(blocks)
    q1, q2, k, v = unit_stride(q1, q2, k, v)
    if q1.dtype != k.dtype:
        q1 = q1.to(k.dtype)
    if q2.dtype != k.dtype:
        q2 = q2.to(k.dtype)
    pos = positions.to(device=dev, dtype=torch.int64).contiguous()
    tab = device_tables(params, LKV, dev)
    st = first_key(key_mask, B, LKV, dev)
    mk = mask_u8(key_mask, dev)
    masked = key_mask is not None
    sm_b = mk.stride(0) if masked else 0
    ieee = k.dtype == torch.float32
    W = params.window_len
    NS = tab.num_stripes
    scale = 1.0 / math.sqrt(D)
    def mark():
        if timings is not None and dev.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            timings.append(ev)

    mark()
    # 1. search (also writes each selected pair's bucket key, see 2.)
    # 2. bucketing: the selected (row, slot) pairs of all query heads of a kv group are grouped by
    # where their span starts (windows of R keys), so a tile's spans nearly coincide and each
    # K/V block it loads serves all its rows. One stable sort of small integer keys, static
    # shapes, no host sync.
    R = cfg.get("span_r") or next_pow2(max(16, tab.max_span // 16), 16)
    NR = triton.cdiv(LKV, R)
    N = B * HQ * LQ * K
    NB = B * HKV * NR
    sel_i = torch.empty(B, HQ, LQ, K, device=dev, dtype=torch.int32)
    sel_s = torch.empty(B, HQ, LQ, K, device=dev, dtype=torch.float32)
    key = torch.empty(N, device=dev, dtype=torch.int32 if NB < 2**31 - 1 else torch.int64)
    bm = cfg["search_m"]
    _search_kernel[(triton.cdiv(LQ, bm), B * HKV)](
        q1, k, pos, mk, st, tab.offsets, tab.back, sel_i, sel_s, key,
        q1.stride(0), q1.stride(1), q1.stride(2), k.stride(0), k.stride(1), k.stride(2), sm_b,
        LQ, LKV, NS, params.sw_index + 1, float(params.power), tab.capacity, R, NR, NB,
        HQ=HQ, G=G, GP=next_pow2(G), D=D, BLOCK_D=BLOCK_D, BLOCK_M=bm, BLOCK_C=cfg["search_c"],
        NUM_SPANS=K, MASKED=masked, IEEE=ieee, num_warps=cfg["search_warps"])
    mark()
    skey, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=NB + 1)[:NB]  # int64
    bstart = torch.cumsum(counts, 0) - counts
    BM = cfg["span_m"]
    ntile = (counts + BM - 1) // BM
    tcum = torch.cumsum(ntile, 0)
    T_MAX = max(1, triton.cdiv(N, BM) + min(NB, N))
    tids = torch.arange(T_MAX, device=dev, dtype=torch.int64)
    tb = torch.searchsorted(tcum, tids, right=True)
    tb_c = tb.clamp(max=NB - 1)
    texcl = tcum[tb_c] - ntile[tb_c]
    tfirst = bstart[tb_c] + (tids - texcl) * BM
    tn = torch.where(tb < NB, torch.minimum(bstart[tb_c] + counts[tb_c] - tfirst, torch.full_like(tfirst, BM)),
                     torch.zeros_like(tfirst)).to(torch.int32)
    order = order.to(torch.int32) if N < 2**31 else order
    span_m = torch.empty(N, device=dev, dtype=torch.float32)
    span_l = torch.empty(N, device=dev, dtype=torch.float32)
    span_acc = torch.empty(N, BLOCK_D, device=dev, dtype=torch.float32)
    mark()
    # 3. span tiles
    _span_kernel[(T_MAX,)](
        q2, k, v, pos, mk, st, tab.offsets, tab.back, tab.fwd, sel_i,
        order, tb_c, tfirst, tn,
        span_m, span_l, span_acc,
        q2.stride(0), q2.stride(1), q2.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sm_b,
        LQ, LKV, NR, tab.capacity, W, scale,
        HQ=HQ, G=G, D=D, BLOCK_D=BLOCK_D, BLOCK_M=BM, BLOCK_N=cfg["span_n"], NUM_SPANS=K,
        MASKED=masked, HAS_FWD=params.forward_factor > 0, IEEE=ieee, num_warps=cfg["span_warps"],
        num_stages=cfg["span_stages"])
    mark()
    # 4. window + merge + gate
    wm = cfg["win_m"]
    _window_combine_kernel[(triton.cdiv(LQ, wm), B * HQ)](
        q2, k, v, pos, mk, sel_i, sel_s, span_m, span_l, span_acc, out,
        q2.stride(0), q2.stride(1), q2.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sm_b, out.stride(0), out.stride(1), out.stride(2),
        LQ, LKV, W, scale,
        HQ=HQ, G=G, D=D, BLOCK_D=BLOCK_D, BLOCK_M=wm, BLOCK_N=cfg["win_n"], NUM_SPANS=K,
        MASKED=masked, IEEE=ieee, num_warps=4)
    mark()
    return out
