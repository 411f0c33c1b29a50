"""Shared pieces of the Triton backend: the top-k insertion, span bounds, device-side inputs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .params import SpanParams, get_tables

MAX_TRITON_SPANS = 4


def next_pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def first_key(key_mask: torch.Tensor | None, B: int, LKV: int, device) -> torch.Tensor:
    """st per batch row (int32, on device, no host sync): first True key, LKV if none."""
    if key_mask is None:
        return torch.zeros(B, dtype=torch.int32, device=device)
    m = key_mask.to(torch.bool)
    first = m.to(torch.int8).argmax(dim=1).to(torch.int32)
    return torch.where(m.any(dim=1), first, torch.full_like(first, LKV))


def mask_u8(key_mask: torch.Tensor | None, device) -> torch.Tensor:
    if key_mask is None:
        return torch.ones(1, dtype=torch.uint8, device=device)
    return key_mask.to(torch.bool).to(torch.uint8).contiguous()


def device_tables(params: SpanParams, LKV: int, device):
    """Tables sized from the (static) cache length, so shapes never depend on positions."""
    tab = get_tables(params, max(LKV, 1) + 1, device)
    return tab


def unit_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with a last dimension of stride 1 (copied only where it is not): the kernels
    step through a head's dimension one element at a time."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def query_shapes(q: torch.Tensor, num_kv_heads: int, params: SpanParams) -> tuple[int, int, int, int, int]:
    """``q [B, HQ, LQ, D]``'s sizes and its GQA group size ``G = HQ // HKV``, once ``params`` are
    known to be ones the Triton kernels run."""
    if params.num_spans > MAX_TRITON_SPANS:
        raise ValueError(f"the Triton backend supports num_spans <= {MAX_TRITON_SPANS}, "
                         f"got {params.num_spans}; use backend='reference'")
    B, HQ, LQ, D = q.shape
    return B, HQ, LQ, D, HQ // num_kv_heads


@triton.jit
def sequence_and_kv_head(pos_ptr, HQ: tl.constexpr, G: tl.constexpr):
    """For a program of a (sequence x kv head) grid (axis 0): its sequence ``b``, kv head ``hk``
    and the sequence's position ``t`` (int32)."""
    HKV: tl.constexpr = HQ // G
    pid = tl.program_id(0)
    b = pid // HKV
    return b, pid % HKV, tl.load(pos_ptr + b).to(tl.int32)


@triton.jit
def topk_insert(s, i, b0, b1, b2, b3, i0, i1, i2, i3):
    """Insert candidate (score s, stripe i) into the top-4 lists, sorted descending by
    (score, i): a tie keeps the larger i (the farther anchor), whatever the insertion order."""
    ge0 = (s > b0) | ((s == b0) & (i > i0))
    ge1 = (s > b1) | ((s == b1) & (i > i1))
    ge2 = (s > b2) | ((s == b2) & (i > i2))
    ge3 = (s > b3) | ((s == b3) & (i > i3))
    nb3 = tl.where(ge2, b2, tl.where(ge3, s, b3))
    ni3 = tl.where(ge2, i2, tl.where(ge3, i, i3))
    nb2 = tl.where(ge1, b1, tl.where(ge2, s, b2))
    ni2 = tl.where(ge1, i1, tl.where(ge2, i, i2))
    nb1 = tl.where(ge0, b0, tl.where(ge1, s, b1))
    ni1 = tl.where(ge0, i0, tl.where(ge1, i, i1))
    nb0 = tl.where(ge0, s, b0)
    ni0 = tl.where(ge0, i, i0)
    return nb0, nb1, nb2, nb3, ni0, ni1, ni2, ni3


@triton.jit
def span_bounds(a, t, st, back_ptr, fwd_ptr, CAP, LKV, W, HAS_FWD: tl.constexpr):
    """Inclusive key bounds [lo, hi] of the span of anchor a for a query at position t."""
    tp = tl.minimum(tl.maximum(t + 1 - st, 0), CAP)
    bk = tl.load(back_ptr + tp)
    # at most LKV: the split programs add multiples of their chunk to lo without overflowing
    lo = tl.minimum(tl.maximum(tl.maximum(a - bk, 0), st), LKV)
    if HAS_FWD:
        fw = tl.load(fwd_ptr + tp)
        hi = tl.minimum(tl.minimum(a + fw, t), LKV - 1)
    else:
        hi = a
    hi = tl.where(W > 0, tl.minimum(hi, tl.maximum(t - W + 1, 0) - 1), hi)
    return lo, hi
