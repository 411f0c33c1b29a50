"""Triton decode of superlinear attention over B sequences of different lengths, one launch per stage.

Each sequence keeps its own K/V tensors (``[1, HKV, capacity_b, D]``, contiguous): a row's keys
are found through a table of base addresses (``KVRows``: int64 ``data_ptr``s on the device, cast
to pointers in the kernel), its capacity and its position. Every table is a device tensor, so a
captured CUDA graph is replayed for other sequences (other tensors, after a growth too) by
rewriting the tables; the grid comes from the static ``bound`` (no row's capacity exceeds it).

1. ``_score_rows_kernel`` (row x kv head x candidate block): routing scores of the candidate
   stripes for the G query heads of a group: ``triton_decode``'s score kernel (its candidates,
   group queries and score product are the same functions) but for where a row's keys are.
2. ``triton_decode.dec_topk_kernel``: top-k, gate logits, span bounds (per query head).
3. ``_partial_rows_kernel`` (row x kv head x (G * k spans + the window) x split): a span slot
   attends one query head to its span; the window slot attends all G query heads of the group to
   the window's keys in one product, so the window's K/V are read once per group, not G times.
   Scores are exact products accumulated in fp32; the softmax weights stay fp32 in the product
   with V (tf32x3 on the tensor cores).
4. ``triton_decode.dec_combine_kernel``: merges splits, window and spans, gates.

``_append_rows_kernel`` writes a decode step's new key and value of every row at its position.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .params import SpanParams
from .rows import KVRows
from .triton_common import first_key, next_pow2, query_shapes, sequence_and_kv_head, unit_stride
from .triton_decode import (
    DecodePlan,
    dec_candidates,
    dec_combine_kernel,
    dec_group_queries,
    dec_store_scores,
    dec_topk_kernel,
)


@triton.jit
def _row_base(table_ptr, like_ptr, b):
    """Row ``b``'s base address from an int64 table, as a pointer to ``like_ptr``'s type. torch
    allocates at 512-byte boundaries: saying so (16) lets the compiler vectorise the row loads,
    which it does for pointer arguments but cannot know of a loaded address."""
    return tl.multiple_of(tl.load(table_ptr + b).to(tl.pointer_type(like_ptr.dtype.element_ty)), 16)


@triton.jit
def _append_rows_kernel(k_new_ptr, v_new_ptr, kp_ptr, vp_ptr, cap_ptr, pos_ptr, sn_b, sn_h, sv_b, sv_h,
                        HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    t = tl.load(pos_ptr + b).to(tl.int64)
    cap = tl.load(cap_ptr + b).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    at = (hk * cap + t) * D + d
    kv = tl.load(k_new_ptr + b * sn_b + hk * sn_h + d, mask=dmask)
    tl.store(_row_base(kp_ptr, k_new_ptr, b) + at, kv, mask=dmask & (t < cap))
    vv = tl.load(v_new_ptr + b * sv_b + hk * sv_h + d, mask=dmask)
    tl.store(_row_base(vp_ptr, v_new_ptr, b) + at, vv, mask=dmask & (t < cap))


@triton.jit
def _score_rows_kernel(q1_ptr, kp_ptr, cap_ptr, pos_ptr, offs_ptr, score_ptr, sq_b, sq_h, NS, S1, NC,
                       HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, NC_PAD: tl.constexpr, IEEE: tl.constexpr):
    b, hk, t = sequence_and_kv_head(pos_ptr, HQ, G)
    cap = tl.load(cap_ptr + b).to(tl.int64)
    c, anchor, live = dec_candidates(offs_ptr, t, S1, NS, NC, BLOCK_C)
    live = live & (anchor < cap)
    q = dec_group_queries(q1_ptr, b, hk, sq_b, sq_h, G, GP, D, BLOCK_D)
    d = tl.arange(0, BLOCK_D)
    keys = _row_base(kp_ptr, q1_ptr, b) + hk * cap * D
    kt = tl.load(keys + anchor[None, :].to(tl.int64) * D + d[:, None], mask=live[None, :] & (d[:, None] < D),
                 other=0.0)
    dec_store_scores(score_ptr, q, kt.to(q.dtype), live, b, hk, c, HQ, G, GP, NC_PAD, IEEE)


@triton.jit
def _partial_rows_kernel(q2_ptr, kp_ptr, vp_ptr, cap_ptr, pos_ptr, lo_ptr, hi_ptr, part_m_ptr, part_l_ptr,
                         part_acc_ptr, sq_b, sq_h, W, SCALE, NSPLIT,
                         HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                         BLOCK_D: tl.constexpr, NUM_SPANS: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    b, hk, t = sequence_and_kv_head(pos_ptr, HQ, G)
    cap = tl.load(cap_ptr + b).to(tl.int64)
    slot = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GP)
    heads = hk * G + g
    if slot < G * NUM_SPANS:  # one query head's span
        span = (b * HQ + hk * G + slot // NUM_SPANS) * NUM_SPANS + slot % NUM_SPANS
        lo = tl.load(lo_ptr + span)
        hi = tl.load(hi_ptr + span)
        active = g == slot // NUM_SPANS
        kind = slot % NUM_SPANS
    else:  # the window, shared by the group's query heads
        lo = tl.maximum(t - W + 1, 0)
        hi = tl.where(W > 0, t, lo - 1)
        active = g < G
        kind = NUM_SPANS
    c_lo = lo + split * CHUNK
    c_hi = tl.minimum(hi, c_lo + CHUNK - 1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q2_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=active[:, None] & dmask[None, :],
                other=0.0)
    keys = _row_base(kp_ptr, q2_ptr, b) + hk * cap * D
    values = _row_base(vp_ptr, q2_ptr, b) + hk * cap * D
    acc = tl.zeros([GP, BLOCK_D], tl.float32)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    for k0 in range(c_lo, c_hi + 1, BLOCK_N):
        kn = k0 + tl.arange(0, BLOCK_N)
        kv = kn <= c_hi
        at = kn[:, None].to(tl.int64) * D + d[None, :]
        kk = tl.load(keys + at, mask=kv[:, None] & dmask[None, :], other=0.0).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(kk), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kk))
        s = tl.where(kv[None, :], s * SCALE, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # the weights stay fp32 (rounded to bf16 they would cost the output ~3 bits):
        # tf32x3 keeps fp32 accuracy on the tensor cores
        vv = tl.load(values + at, mask=kv[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision="tf32x3")
        m_i = m_new
    where = ((b * HQ + heads) * (NUM_SPANS + 1) + kind) * NSPLIT + split
    tl.store(part_m_ptr + where, m_i, mask=active)
    tl.store(part_l_ptr + where, l_i, mask=active)
    tl.store(part_acc_ptr + where[:, None] * BLOCK_D + d[None, :], acc, mask=active[:, None])


def append_rows(k_new: torch.Tensor, v_new: torch.Tensor, rows: KVRows, positions: torch.Tensor) -> None:
    """Write ``k_new``/``v_new [B, HKV, 1, D]`` into each row's K/V at its position (a row whose
    position is past its capacity is skipped: the caller reserves first)."""
    B, HKV, _, D = k_new.shape
    k_new, v_new = unit_stride(k_new.to(rows.dtype), v_new.to(rows.dtype))
    _append_rows_kernel[(B, HKV)](k_new, v_new, rows.k_ptrs, rows.v_ptrs,
                                  rows.capacity, positions, k_new.stride(0), k_new.stride(1), v_new.stride(0),
                                  v_new.stride(1), HKV=HKV, D=D, BLOCK_D=next_pow2(D, lo=1))


_PLANS: dict = {}


def triton_decode_rows(q1, q2, rows: KVRows, positions, params: SpanParams, chunk: int | None = None,
                       block_n: int | None = None, warps: int | None = None) -> torch.Tensor:
    """``q1, q2 [B, HQ, 1, D]``, one row per sequence of ``rows``; ``positions`` int64 ``[B]`` on
    the device (each row's keys ``0 .. position`` are filled) -> ``[B, HQ, 1, D]``."""
    HKV = rows.num_kv_heads
    B, HQ, _, D, G = query_shapes(q2, HKV, params)
    dev = q2.device
    K = params.num_spans
    key = (params, rows.bound, str(dev), chunk, block_n, warps)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = DecodePlan(params, rows.bound, dev, chunk, block_n, warps)
    tab = plan.tab
    BLOCK_D = next_pow2(D)
    GP = next_pow2(G)
    ieee = q2.dtype == torch.float32
    out_dtype = q2.dtype
    q1, q2 = unit_stride(q1.to(rows.dtype), q2.to(rows.dtype))
    pos = positions.to(device=dev, dtype=torch.int64)
    S1 = params.sw_index + 1
    scores = torch.empty(B * HQ, plan.nc_pad, device=dev, dtype=torch.float32)
    _score_rows_kernel[(B * HKV, triton.cdiv(plan.nc_pad, plan.block_c))](
        q1, rows.k_ptrs, rows.capacity, pos, tab.offsets, scores, q1.stride(0), q1.stride(1),
        tab.num_stripes, S1, plan.nc, HQ=HQ, G=G, GP=GP, D=D, BLOCK_D=BLOCK_D, BLOCK_C=plan.block_c,
        NC_PAD=plan.nc_pad, IEEE=ieee, num_warps=4)
    gate = torch.empty(B * HQ, K, device=dev, dtype=torch.float32)
    sel_lo = torch.empty(B * HQ, K, device=dev, dtype=torch.int32)
    sel_hi = torch.empty(B * HQ, K, device=dev, dtype=torch.int32)
    dec_topk_kernel[(B * HQ,)](
        pos, first_key(None, B, rows.bound, dev), tab.offsets, tab.back, tab.fwd, scores, gate, sel_lo, sel_hi,
        rows.bound, S1, tab.capacity, params.window_len,
        HQ=HQ, NC_PAD=plan.nc_pad, NUM_SPANS=K, HAS_FWD=params.forward_factor > 0, num_warps=4)
    npart = B * HQ * (K + 1) * plan.nsplit
    part_m = torch.empty(npart, device=dev, dtype=torch.float32)
    part_l = torch.empty(npart, device=dev, dtype=torch.float32)
    part_acc = torch.empty(npart, BLOCK_D, device=dev, dtype=torch.float32)
    _partial_rows_kernel[(B * HKV, G * K + 1, plan.nsplit)](
        q2, rows.k_ptrs, rows.v_ptrs, rows.capacity, pos, sel_lo, sel_hi, part_m, part_l, part_acc,
        q2.stride(0), q2.stride(1), params.window_len, 1.0 / math.sqrt(D), plan.nsplit,
        HQ=HQ, G=G, GP=GP, D=D, BLOCK_D=BLOCK_D, NUM_SPANS=K, CHUNK=plan.chunk, BLOCK_N=max(plan.block_n, 16),
        IEEE=ieee, num_warps=plan.warps)
    out = torch.empty(B, HQ, 1, D, device=dev, dtype=out_dtype)
    dec_combine_kernel[(B * HQ,)](
        gate, part_m, part_l, part_acc, out, out.stride(0), out.stride(1), plan.nsplit,
        HQ=HQ, D=D, BLOCK_D=BLOCK_D, NUM_SPANS=K, SPLIT_PAD=plan.split_pad, num_warps=4)
    return out
