"""The Triton kernel of ``fused.step_prologue``: one program per group of heads.

A group's program owns its conv channels (its heads' x, its B and its C), so no two programs
touch one channel; inside a program a barrier orders the in-place shift (see ``_conv``). The conv accumulates in
fp32 and its output is rounded to the model's dtype before use, as the default path does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    # log1p(exp(x)) exact in fp32 for small exp(x) too (dt below 1e-3 must not round to a step)
    y = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + y
    log1p = tl.where(u == 1.0, y, tl.log(u) * y / (u - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _conv(proj_ptr, state_ptr, w_ptr, b_ptr, ch, n_ch, xbc_offset, KW: tl.constexpr, HAS_BIAS: tl.constexpr):
    """silu(conv) of channels ``ch`` after shifting the new input into their state; fp32."""
    mask = ch < n_ch
    u = tl.load(proj_ptr + xbc_offset + ch, mask=mask, other=0.0)
    acc = tl.zeros(ch.shape, dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    for j in tl.static_range(KW - 1):
        s = tl.load(state_ptr + ch * KW + j + 1, mask=mask, other=0.0)
        acc += s.to(tl.float32) * tl.load(w_ptr + ch * KW + j, mask=mask, other=0.0).to(tl.float32)
        # a block smaller than the program's threads is held by several warps: every copy must
        # read slot j + 1 before any copy shifts slot j + 1 down (the next step's store)
        tl.debug_barrier()
        tl.store(state_ptr + ch * KW + j, s, mask=mask)
    s = u.to(state_ptr.dtype.element_ty)
    acc += s.to(tl.float32) * tl.load(w_ptr + ch * KW + KW - 1, mask=mask, other=0.0).to(tl.float32)
    tl.store(state_ptr + ch * KW + KW - 1, s, mask=mask)
    out = acc * tl.sigmoid(acc)
    return out.to(proj_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _prologue(proj_ptr, state_ptr, w_ptr, b_ptr, dt_bias_ptr, a_log_ptr, q_ptr, k_ptr, v_ptr, g_ptr,
              INNER, CONV_DIM, H, N, dt_min, dt_max, P: tl.constexpr, PER_GROUP: tl.constexpr,
              KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_HG: tl.constexpr):
    group = tl.program_id(0)
    groups = H // PER_GROUP
    # x channels of this group's heads -> v [H, P] (same order)
    xc = group * PER_GROUP * P + tl.arange(0, BLOCK_X)
    x_end = (group + 1) * PER_GROUP * P
    xv = _conv(proj_ptr, state_ptr, w_ptr, b_ptr, xc, x_end, INNER, KW, HAS_BIAS)
    tl.store(v_ptr + xc, xv, mask=xc < x_end)
    # this group's B and C channels
    n = tl.arange(0, BLOCK_N)
    bv = _conv(proj_ptr, state_ptr, w_ptr, b_ptr, INNER + group * N + n, INNER + (group + 1) * N, INNER, KW,
               HAS_BIAS)
    cv = _conv(proj_ptr, state_ptr, w_ptr, b_ptr, INNER + (groups + group) * N + n,
               INNER + (groups + group + 1) * N, INNER, KW, HAS_BIAS)
    # dt and the decay of this group's heads
    heads = group * PER_GROUP + tl.arange(0, BLOCK_HG)
    hmask = heads < (group + 1) * PER_GROUP
    raw = tl.load(proj_ptr + INNER + CONV_DIM + heads, mask=hmask, other=0.0).to(tl.float32)
    dt = _softplus(raw + tl.load(dt_bias_ptr + heads, mask=hmask, other=0.0).to(tl.float32))
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    a = -tl.exp(tl.load(a_log_ptr + heads, mask=hmask, other=0.0).to(tl.float32))
    tl.store(g_ptr + heads, dt * a, mask=hmask)
    both = hmask[:, None] & (n[None, :] < N)
    offsets = heads[:, None] * N + n[None, :]
    tl.store(q_ptr + offsets, tl.broadcast_to(cv[None, :], (BLOCK_HG, BLOCK_N)), mask=both)
    tl.store(k_ptr + offsets, dt[:, None] * bv[None, :], mask=both)


def prologue_kernel(projected, conv_state, conv_weight, conv_bias, dt_bias, a_log, dims):
    """Launch ``_prologue`` (arguments checked by ``fused.step_prologue``)."""
    device = projected.device
    heads, state, head_dim = dims.heads, dims.state, dims.head_dim
    q = torch.empty((1, 1, heads, state), dtype=torch.float32, device=device)
    k = torch.empty_like(q)
    v = torch.empty((1, 1, heads, head_dim), dtype=torch.float32, device=device)
    g = torch.empty((1, 1, heads), dtype=torch.float32, device=device)
    per_group = heads // dims.groups
    _prologue[(dims.groups,)](
        projected, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, dt_bias, a_log,
        q, k, v, g, dims.inner, dims.conv_dim, heads, state, *map(float, dims.dt_limit), P=head_dim,
        PER_GROUP=per_group, KW=dims.kernel, HAS_BIAS=conv_bias is not None,
        BLOCK_X=triton.next_power_of_2(per_group * head_dim), BLOCK_N=triton.next_power_of_2(state),
        BLOCK_HG=triton.next_power_of_2(per_group))
    return q, k, v, g
