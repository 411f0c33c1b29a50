"""The Triton kernels of ``fused.fused_moe_decode``: router, up (routed + shared), down (sum).

The grid's second axis is the token: each of the T tokens of a (batched) decode step has its own
programs and reads its own experts' rows. All accumulation is fp32; weights are read in their own
dtype. The top-k is recomputed by every program of the up kernel from the E router scores (E is
small: 128 for the 30B), which saves a launch; the programs of slot j's first row block write
expert j's id and weight for the down kernel. Ties pick the lower expert index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ACT = {"relu2": 0, "silu": 1}


@triton.jit
def _router(x_ptr, w_ptr, scores_ptr, E, H, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    token = tl.program_id(1).to(tl.int64)
    x_ptr += token * H
    scores_ptr += token * E
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        xv = tl.load(x_ptr + h, mask=h < H, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e[:, None].to(tl.int64) * H + h[None, :], mask=(e[:, None] < E) & (h[None, :] < H),
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.store(scores_ptr + e, tl.sigmoid(acc), mask=e < E)


@triton.jit
def _slot(scores_ptr, bias_ptr, slot, E, scaling, K: tl.constexpr, BLOCK_E: tl.constexpr, NORM: tl.constexpr):
    """Expert id and routing weight of top-k slot ``slot`` (0-based, by descending score)."""
    e = tl.arange(0, BLOCK_E)
    score = tl.load(scores_ptr + e, mask=e < E, other=0.0)
    pick = tl.where(e < E, score + tl.load(bias_ptr + e, mask=e < E, other=0.0).to(tl.float32), float("-inf"))
    chosen_id = 0
    chosen_w = 0.0
    total = 0.0
    for j in tl.static_range(K):
        best = tl.max(pick, axis=0)
        # a NaN score matches nothing: stay inside the expert table all the same
        idx = tl.minimum(tl.min(tl.where(pick == best, e, BLOCK_E), axis=0), E - 1)
        w = tl.sum(tl.where(e == idx, score, 0.0), axis=0)
        total += w
        chosen_id = tl.where(j == slot, idx, chosen_id)
        chosen_w = tl.where(j == slot, w, chosen_w)
        pick = tl.where(e == idx, float("-inf"), pick)
    if NORM:
        chosen_w = chosen_w / (total + 1e-20)
    return chosen_id, chosen_w * scaling


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 0:
        r = tl.maximum(x, 0.0)
        return r * r
    return x * tl.sigmoid(x)


@triton.jit
def _gemv_rows(w_ptr, x_ptr, rows, n_rows, n_cols, BLOCK_H: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """``W[rows] @ x`` for a block of rows of a row-major ``[n_rows, n_cols]`` matrix, fp32."""
    acc = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for h0 in range(0, n_cols, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        xv = tl.load(x_ptr + h, mask=h < n_cols, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * n_cols + h[None, :],
                    mask=(rows[:, None] < n_rows) & (h[None, :] < n_cols), other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    return acc


@triton.jit
def _up(x_ptr, xr_ptr, scores_ptr, bias_ptr, up_ptr, sup_ptr, hidden_ptr, shidden_ptr, ids_ptr, wts_ptr,
        E, H, HR, INNER, SHARED_INNER, ROUTED_BLOCKS, scaling, K: tl.constexpr, BLOCK_E: tl.constexpr,
        NORM: tl.constexpr, ACT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
    # programs 0 .. K * ROUTED_BLOCKS - 1: a row block of a selected expert; the rest: of the shared one
    pid = tl.program_id(0)
    token = tl.program_id(1).to(tl.int64)
    x_ptr += token * H
    xr_ptr += token * HR
    scores_ptr += token * E
    hidden_ptr += token * K * INNER
    shidden_ptr += token * SHARED_INNER
    ids_ptr += token * K
    wts_ptr += token * K
    if pid < K * ROUTED_BLOCKS:
        slot = pid // ROUTED_BLOCKS
        block = pid % ROUTED_BLOCKS
        rows = block * BLOCK_I + tl.arange(0, BLOCK_I)
        expert, weight = _slot(scores_ptr, bias_ptr, slot, E, scaling, K, BLOCK_E, NORM)
        if block == 0:
            tl.store(ids_ptr + slot, expert)
            tl.store(wts_ptr + slot, weight)
        acc = _gemv_rows(up_ptr + expert.to(tl.int64) * INNER * HR, xr_ptr, rows, INNER, HR, BLOCK_H, BLOCK_I)
        tl.store(hidden_ptr + slot * INNER + rows, _activate(acc, ACT) * weight, mask=rows < INNER)
    else:
        rows = (pid - K * ROUTED_BLOCKS) * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = _gemv_rows(sup_ptr, x_ptr, rows, SHARED_INNER, H, BLOCK_H, BLOCK_I)
        tl.store(shidden_ptr + rows, _activate(acc, ACT), mask=rows < SHARED_INNER)


@triton.jit
def _down(hidden_ptr, shidden_ptr, ids_ptr, down_ptr, sdown_ptr, out_ptr, OUT, INNER, SHARED_INNER, K: tl.constexpr,
          SHARED: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    token = tl.program_id(1).to(tl.int64)
    hidden_ptr += token * K * INNER
    shidden_ptr += token * SHARED_INNER
    ids_ptr += token * K
    out_ptr += token * OUT
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for slot in tl.static_range(K):
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        acc += _gemv_rows(down_ptr + expert * OUT * INNER, hidden_ptr + slot * INNER, rows, OUT, INNER, BLOCK_I,
                          BLOCK_O)
    if SHARED:
        acc += _gemv_rows(sdown_ptr, shidden_ptr, rows, OUT, SHARED_INNER, BLOCK_I, BLOCK_O)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < OUT)


def moe_decode_kernels(x, xr, router_weight, correction_bias, up, down, shared_up, shared_down, *, top_k,
                       norm_topk, scaling, act, block_e, block_i, block_h, block_o) -> torch.Tensor:
    """Launch the three kernels (arguments checked by ``fused.fused_moe_decode``)."""
    num_experts, inner, routed_in = up.shape
    tokens, hidden_size, out_dim = x.shape[0], x.shape[1], down.shape[1]
    shared = shared_up is not None
    shared_inner = shared_up.shape[0] if shared else 0
    device = x.device
    scores = torch.empty((tokens, num_experts), dtype=torch.float32, device=device)
    hidden = torch.empty((tokens, top_k, inner), dtype=torch.float32, device=device)
    shidden = torch.empty((tokens, max(shared_inner, 1)), dtype=torch.float32, device=device)
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=device)
    wts = torch.empty((tokens, top_k), dtype=torch.float32, device=device)
    out = torch.empty((tokens, out_dim), dtype=x.dtype, device=device)
    _router[(triton.cdiv(num_experts, block_e), tokens)](x, router_weight, scores, num_experts, hidden_size,
                                                   BLOCK_E=block_e, BLOCK_H=block_h)
    sup = shared_up if shared else up  # a placeholder pointer when there is no shared expert
    sdown = shared_down if shared else down
    routed_blocks = triton.cdiv(inner, block_i)
    _up[(top_k * routed_blocks + triton.cdiv(shared_inner, block_i), tokens)](
        x, xr, scores, correction_bias, up, sup, hidden, shidden, ids, wts, num_experts, hidden_size, routed_in,
        inner, shared_inner, routed_blocks, scaling, K=top_k, BLOCK_E=triton.next_power_of_2(num_experts),
        NORM=bool(norm_topk), ACT=_ACT[act], BLOCK_I=block_i, BLOCK_H=block_h)
    _down[(triton.cdiv(out_dim, block_o), tokens)](hidden, shidden, ids, down, sdown, out, out_dim, inner, shared_inner,
                                            K=top_k, SHARED=shared, BLOCK_O=block_o, BLOCK_I=block_h)
    return out
