"""PyTorch reference of superlinear attention (docs/attention-spec.md), memory-safe at long L.

Works in blocks of query rows; never builds an ``[LQ, LKV]`` matrix beyond the window's width
and never touches keys after the largest position (a static cache's tail is garbage). Rows with
``t + 1 <= W`` have no anchor and are plain causal attention: they take a fast path through
``scaled_dot_product_attention``. All math is fp32; the output has q2's dtype.

For the other rows, with ``O_j = softmax over keys_j`` and keys_j = span_j ∪ window (disjoint),
the window's partial (max, sum, acc) is computed once per row and merged with each span's
partial by log-sum-exp, which is exactly the softmax over the union. The span partials come from
one score matmul over the union of a block's span keys when that union is narrow (short contexts,
the common case), else from keys gathered per (row, span, key); both compute the same partials.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .params import SpanParams, get_tables

# elements of the largest temporary (fp32): bounds memory at any L
_BUDGET = 1 << 22


def _first_true(key_mask: torch.Tensor | None, B: int, LKV: int, device) -> list[int]:
    if key_mask is None:
        return [0] * B
    any_ = key_mask.any(dim=1)
    first = key_mask.to(torch.int8).argmax(dim=1)
    return [int(f) if a else LKV for f, a in zip(first.tolist(), any_.tolist(), strict=True)]


def _causal_rows(q2, k, v, pos, key_mask, W, out, rows, scale):
    """Rows with t + 1 <= W: softmax over keys [max(0, t-W+1), t] ∩ mask (= [0, t] ∩ mask)."""
    B, HQ, _, D = q2.shape
    HKV = k.shape[1]
    rows_t = pos[rows]
    i = 0
    n = len(rows)
    while i < n:
        tmax = int(rows_t[min(n, i + 1) - 1])
        # block size from the widest key range of this block (rows may be in any order)
        nq = max(1, min(n - i, _BUDGET // max(1, B * HQ * (tmax + 1 + 64))))
        blk = rows[i:i + nq]
        t = pos[blk]
        hi = int(t.max())
        nk = hi + 1
        while nq > 1 and B * HQ * nq * nk > 4 * _BUDGET:
            nq //= 2
            blk = rows[i:i + nq]
            t = pos[blk]
            hi = int(t.max())
            nk = hi + 1
        kk = torch.arange(nk, device=k.device)
        lo = torch.clamp(t - W + 1, min=0)
        allowed = (kk[None, :] <= t[:, None]) & (kk[None, :] >= lo[:, None])  # [nq, nk]
        allowed = allowed[None].expand(B, -1, -1)
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, :nk]
        q = q2[:, :, blk].float()
        kf = k[:, :, :nk].float()
        vf = v[:, :, :nk].float()
        o = F.scaled_dot_product_attention(q, kf, vf, attn_mask=allowed[:, None], scale=scale,
                                           enable_gqa=HQ != HKV)
        empty = ~allowed.any(dim=-1)  # [B, nq]
        if bool(empty.any()):
            o = o.masked_fill(empty[:, None, :, None], 0.0)
        out[:, :, blk] = o.nan_to_num(0.0) if bool(empty.any()) else o
        i += len(blk)


# Step 4 ("span partials") has two interchangeable implementations; "auto" picks the cheaper one
# per block of rows. Tests force each one to check that they agree.
_SPAN_PATH = "auto"  # "auto" | "union" | "gather"
# "auto" takes the union path while the union's width is at most this many times the longest span
# (measured on CPU: the union path wins up to a ratio of about 10-15, the gather path beyond)
_UNION_MAX_RATIO = 8


def _span_partials(q2, k, v, lo, hi, key_mask, scale, key_start=0):
    """Softmax partials (max, sum, acc) of every span over its keys ``[lo, hi] ∩ key_mask``.

    q2 ``[B,HQ,nq,D]``; lo, hi ``[B,HQ,nq,k]`` (an empty span has hi < lo). Returns m ``[B,HQ,nq,k]``
    (-inf for an empty span), l ``[B,HQ,nq,k]`` and acc ``[B,HQ,nq,k,D]`` (0 for an empty span).
    Never reads a key outside the spans' union, so never past ``max(hi)``. ``k[:, :, 0]`` is the key
    at position ``key_start`` (a slice of the sequence); lo and hi are positions inside it.
    """
    B, HQ, nq, kspans = lo.shape
    D = q2.shape[-1]
    nonempty = hi >= lo
    if not bool(nonempty.any()):
        return (torch.full((B, HQ, nq, kspans), float("-inf"), device=q2.device),
                torch.zeros(B, HQ, nq, kspans, device=q2.device),
                torch.zeros(B, HQ, nq, kspans, D, device=q2.device))
    if _SPAN_PATH == "gather":
        return _span_partials_gather(q2, k, v, lo, hi, key_mask, scale, key_start)
    r0 = int(lo[nonempty].min())
    r1 = int(hi[nonempty].max())
    width = r1 - r0 + 1
    if _SPAN_PATH == "auto":
        lmax = int((hi - lo + 1).max())
        if width > _UNION_MAX_RATIO * lmax:
            return _span_partials_gather(q2, k, v, lo, hi, key_mask, scale, key_start)
    if B * HQ * nq * kspans * width <= _BUDGET:
        return _span_partials_union(q2, k, v, lo, hi, key_mask, scale, r0, r1, key_start)
    if nq == 1:  # even one row's union is too wide for the budget
        return _span_partials_gather(q2, k, v, lo, hi, key_mask, scale, key_start)
    # split the rows: a smaller block has a narrower union
    h = nq // 2
    a = _span_partials(q2[:, :, :h], k, v, lo[:, :, :h], hi[:, :, :h], key_mask, scale, key_start)
    b = _span_partials(q2[:, :, h:], k, v, lo[:, :, h:], hi[:, :, h:], key_mask, scale, key_start)
    return tuple(torch.cat([x, y], dim=2) for x, y in zip(a, b, strict=True))


def _span_partials_union(q2, k, v, lo, hi, key_mask, scale, r0, r1, key_start=0):
    """Span partials from one score matmul per kv head over the union of keys ``[r0, r1]``."""
    B, HQ, nq, kspans = lo.shape
    D = q2.shape[-1]
    HKV = k.shape[1]
    G = HQ // HKV
    R = r1 - r0 + 1
    kr = torch.arange(r0, r1 + 1, device=q2.device)
    q2g = q2.float().reshape(B, HKV, G * nq, D)
    k0, k1 = r0 - key_start, r1 - key_start + 1
    sc = torch.matmul(q2g, k[:, :, k0:k1].float().transpose(-1, -2)).mul_(scale)  # [B,HKV,G*nq,R]
    sc = sc.reshape(B, HQ, nq, 1, R)
    inside = (kr >= lo[..., None]) & (kr <= hi[..., None])  # [B,HQ,nq,k,R]
    if key_mask is not None:
        inside = inside & key_mask[:, None, None, None, r0:r1 + 1]
    sc = torch.where(inside, sc, float("-inf"))
    m_s = sc.amax(-1)  # [B,HQ,nq,k]
    m_safe = torch.where(torch.isfinite(m_s), m_s, torch.zeros_like(m_s))
    p = sc.sub_(m_safe[..., None]).exp_()
    l_s = p.sum(-1)
    acc_s = torch.matmul(p.reshape(B, HKV, G * nq * kspans, R), v[:, :, k0:k1].float())
    return m_s, l_s, acc_s.reshape(B, HQ, nq, kspans, D)


def _span_partials_gather(q2, k, v, lo, hi, key_mask, scale, key_start=0):
    """Span partials from the keys gathered per (row, span, key), in chunks of the span length."""
    B, HQ, nq, kspans = lo.shape
    D = q2.shape[-1]
    Lmax = int((hi - lo + 1).clamp(min=0).max())
    # rows per call such that a whole span length of keys fits the budget (fewer, larger chunks)
    nsub = max(1, _BUDGET // max(1, B * HQ * kspans * Lmax * D))
    if nsub < nq:
        parts = [_span_partials_gather(q2[:, :, r:r + nsub], k, v, lo[:, :, r:r + nsub], hi[:, :, r:r + nsub],
                                       key_mask, scale, key_start) for r in range(0, nq, nsub)]
        return tuple(torch.cat(x, dim=2) for x in zip(*parts, strict=True))
    HKV, LKV = k.shape[1], k.shape[2]
    G = HQ // HKV
    dev = q2.device
    q2f = q2.float()
    # chunk over the span length to bound the gathered keys
    LC = max(1, min(max(Lmax, 1), _BUDGET // max(1, B * HQ * nq * kspans * D)))
    m_s = torch.full((B, HQ, nq, kspans), float("-inf"), device=dev)
    l_s = torch.zeros(B, HQ, nq, kspans, device=dev)
    acc_s = torch.zeros(B, HQ, nq, kspans, D, device=dev)
    hkv_of = torch.arange(HQ, device=dev) // G
    bidx = torch.arange(B, device=dev)[:, None, None, None, None]
    for c0 in range(0, Lmax, LC):
        idx = lo[..., None] + c0 + torch.arange(min(LC, Lmax - c0), device=dev)  # [B,HQ,nq,k,L]
        ok = idx <= hi[..., None]
        idx_c = (idx - key_start).clamp(0, LKV - 1)
        if key_mask is not None:
            ok = ok & key_mask[bidx, idx_c]
        kg = k[bidx, hkv_of[None, :, None, None, None], idx_c].float()  # [B,HQ,nq,k,L,D]
        vg = v[bidx, hkv_of[None, :, None, None, None], idx_c].float()
        sc = torch.einsum("bhrd,bhrjld->bhrjl", q2f, kg) * scale
        sc = sc.masked_fill(~ok, float("-inf"))
        m_new = torch.maximum(m_s, sc.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        alpha = torch.exp(m_s - m_safe)
        p = torch.exp(sc - m_safe[..., None])
        l_s = l_s * alpha + p.sum(-1)
        acc_s = acc_s * alpha[..., None] + torch.einsum("bhrjl,bhrjld->bhrjd", p, vg)
        m_s = m_new
    return m_s, l_s, acc_s


def _general_rows(q1, q2, k, v, pos, key_mask, params, tables, st, out, rows, scale, plan=None, key_start=0,
                  exchange=None):
    B, HQ, _, D = q2.shape
    HKV, LKV = k.shape[1], k.shape[2]
    key_end = key_start + LKV  # this call holds the keys at positions [key_start, key_end)
    G = HQ // HKV
    W = params.window_len
    s = params.sw_index
    kspans = params.num_spans
    offs = tables.offsets.to(pos.device)
    back = tables.back.to(pos.device).long()
    fwd = tables.fwd.to(pos.device).long()
    st_t = torch.tensor(st, device=pos.device, dtype=torch.long)  # [B]
    n = len(rows)
    i = 0
    while i < n:
        t_first = int(pos[rows[i]])
        ncand_est = max(1, int((t_first + 2) ** params.power) + 2)
        # bounds steps 1 and 3; step 4 splits the block further to stay within _BUDGET
        per_row = B * HQ * max(ncand_est * (D // max(G, 1) + 1), W + 64)
        nq = max(1, min(n - i, 256, _BUDGET // max(1, per_row)))
        blk = rows[i:i + nq]
        i += len(blk)
        t = pos[blk]  # [nq]
        nq = len(blk)
        tmax = int(t.max())
        # ---- 1. search ---------------------------------------------------------------------
        # candidate stripes s+1 .. I with F(I) <= tmax + 1, ordered by DESCENDING i so that a
        # stable sort keeps the larger i first among equal scores (the tie rule)
        last = int(torch.searchsorted(offs, torch.tensor(tmax + 1, device=offs.device), right=True))
        istripe = torch.arange(max(last - 1, s), s, -1, device=pos.device)  # descending; none before the window
        C = len(istripe)
        Fi = offs[istripe]  # [C]
        a = t[:, None] + 1 - Fi[None, :]  # [nq, C]
        cvalid = (Fi[None, :] <= t[:, None] + 1) & (a < key_end) & (a >= key_start)
        a_cl = a.clamp(key_start, max(key_start, key_end - 1))
        if key_mask is not None:
            cvalid_b = cvalid[None] & key_mask[:, a_cl]  # [B, nq, C]
        else:
            cvalid_b = cvalid[None].expand(B, -1, -1)
        q1f = q1[:, :, blk].float().reshape(B, HKV, G, nq, D)
        if C > 0 and LKV > 0:
            ka = k[:, :, (a_cl - key_start).reshape(-1)].float().reshape(B, HKV, nq, C, D)
            scores = torch.einsum("bhgrd,bhrcd->bhgrc", q1f, ka).reshape(B, HQ, nq, C)
            scores = scores.masked_fill(~cvalid_b[:, None], float("-inf"))
            srt, order = torch.sort(scores, dim=-1, descending=True, stable=True)
            kk = min(kspans, C)
            sel_score = srt[..., :kk]
            sel_a = torch.gather(a_cl[None, None].expand(B, HQ, -1, -1), -1, order[..., :kk])
        else:
            kk = 0
            sel_score = torch.empty(B, HQ, nq, 0, device=pos.device)
            sel_a = torch.empty(B, HQ, nq, 0, device=pos.device, dtype=torch.long)
        if kk < kspans:
            pad = kspans - kk
            sel_score = torch.cat([sel_score, sel_score.new_full((B, HQ, nq, pad), float("-inf"))], -1)
            sel_a = torch.cat([sel_a, sel_a.new_zeros((B, HQ, nq, pad))], -1)
        if exchange is not None:  # the global top-k from every slice's own
            sel_score, sel_a = exchange.topk(sel_score, sel_a)
        svalid = torch.isfinite(sel_score)  # [B, HQ, nq, k]
        gate_logit = torch.where(svalid, sel_score, torch.full_like(sel_score, -1e9))
        # ---- 2. span bounds ----------------------------------------------------------------
        tp = (t[None, :] + 1 - st_t[:, None]).clamp(min=0)  # [B, nq]
        tp_c = tp.clamp(max=tables.capacity)
        bk = back[tp_c][:, None, :, None]
        fw = fwd[tp_c][:, None, :, None]
        tt = t[None, None, :, None]
        lo = torch.maximum((sel_a - bk).clamp(min=0), st_t[:, None, None, None])
        if params.forward_factor == 0:
            hi = sel_a.clone()
        else:
            # a slice's caller has every key up to the row's own position (elsewhere if not here)
            last_key = tmax if exchange is not None else LKV - 1
            hi = torch.minimum(torch.minimum(sel_a + fw, tt), torch.tensor(last_key, device=pos.device))
        if W > 0:
            hi = torch.minimum(hi, (tt - W + 1).clamp(min=0) - 1)
        hi = torch.where(svalid, hi, lo - 1)  # empty span for unselected slots
        if plan is not None:
            plan["anchor"][:, :, blk] = torch.where(svalid, sel_a, -1)
            plan["lo"][:, :, blk] = torch.where(svalid, lo, -1)
            plan["hi"][:, :, blk] = torch.where(svalid, hi, -1)
            plan["score"][:, :, blk] = gate_logit
        # ---- 3. window partial per (b, h, row), over the keys held here ---------------------
        w_lo = (t - W + 1).clamp(min=max(0, key_start))
        w_hi = t.clamp(max=key_end - 1)
        r0, r1 = int(w_lo.min()), int(w_hi.max())
        if W > 0 and r1 >= r0:
            kr = torch.arange(r0, r1 + 1, device=pos.device)
            wmask = (kr[None, :] >= w_lo[:, None]) & (kr[None, :] <= w_hi[:, None])  # [nq, R]
            wmask = wmask[None].expand(B, -1, -1)
            if key_mask is not None:
                wmask = wmask & key_mask[:, None, r0:r1 + 1]
            q2g = q2[:, :, blk].float().reshape(B, HKV, G * nq, D)
            kw = slice(r0 - key_start, r1 + 1 - key_start)
            # in place on the [B, HQ, nq, W + nq] scores: the largest temporaries of a block
            sc = torch.matmul(q2g, k[:, :, kw].float().transpose(-1, -2)).mul_(scale)
            sc = sc.reshape(B, HQ, nq, -1).masked_fill_(~wmask[:, None], float("-inf"))
            m_w = sc.amax(-1)  # [B, HQ, nq]
            m_ws = torch.where(torch.isfinite(m_w), m_w, torch.zeros_like(m_w))
            p = sc.sub_(m_ws[..., None]).exp_()
            l_w = p.sum(-1)
            acc_w = torch.matmul(p.reshape(B, HKV, G * nq, -1), v[:, :, kw].float())
            acc_w = acc_w.reshape(B, HQ, nq, D)
        else:
            m_w = torch.full((B, HQ, nq), float("-inf"), device=pos.device)
            l_w = torch.zeros(B, HQ, nq, device=pos.device)
            acc_w = torch.zeros(B, HQ, nq, D, device=pos.device)
        # ---- 4. span partials, merged with the window, gated ------------------------------
        gates = torch.softmax(gate_logit, dim=-1)
        gates = torch.where(torch.isnan(gates), torch.full_like(gates, 1.0 / kspans), gates)
        # the parts of the spans held here (all of them without a slice)
        m_s, l_s, acc_s = _span_partials(q2[:, :, blk], k, v, lo.clamp(min=key_start), hi.clamp(max=key_end - 1),
                                         key_mask, scale, key_start)
        m = torch.maximum(m_s, m_w[..., None])
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        aw = torch.exp(m_w[..., None] - m_safe)  # [B,HQ,nq,k]
        asp = torch.exp(m_s - m_safe)
        num = acc_w[:, :, :, None, :] * aw[..., None] + acc_s * asp[..., None]
        den = l_w[..., None] * aw + l_s * asp
        o_j = torch.where(den[..., None] > 0, num / den.clamp(min=1e-30)[..., None], torch.zeros_like(num))
        if exchange is not None:  # each span's softmax over the keys of every slice
            lse = torch.where(den > 0, m_safe + torch.log(den.clamp(min=1e-30)), float("-inf"))
            o_j = exchange.combine(o_j, lse)
        res = (gates[..., None] * o_j).sum(-2)
        out[:, :, blk] = res


def reference_prefill(q1, q2, k, v, positions, params: SpanParams, key_mask=None, plan=None, key_start=0,
                      exchange=None):
    """Superlinear attention for query rows at absolute ``positions`` ([LQ] int64).

    ``plan`` (optional dict) receives the routing diagnostics: ``anchor``, ``lo``, ``hi``
    ([B,HQ,LQ,k] int64, -1 where a slot is unselected) and ``score`` (gate logits, -1e9 there).

    A slice of the sequence (context parallelism, ``superlinear.distributed``): ``k``/``v`` hold
    the keys at positions ``key_start ..``, the other keys up to ``max(positions)`` are held by
    other calls of the same rows, and ``exchange`` joins them: ``exchange.topk(score, anchor)``
    turns this slice's top-k candidates ``[B,HQ,LQ,k]`` (sorted, -inf where none) into the
    global top-k, and ``exchange.combine(out, lse)`` each span's partial softmax ``[B,HQ,LQ,k,D]``
    and log-sum-exp ``[B,HQ,LQ,k]`` over this slice's keys into the one over all keys.
    """
    B, HQ, LQ, D = q2.shape
    LKV = k.shape[2]
    out = torch.empty(B, HQ, LQ, D, device=q2.device, dtype=torch.float32)
    if LQ == 0:
        return out.to(q2.dtype)
    pos = positions.to(device=q2.device, dtype=torch.long)
    tmax = int(pos.max())
    if exchange is not None and key_mask is not None:
        raise ValueError("a slice of the keys (exchange) takes no key_mask")
    # never read keys after the largest position (static-cache tail)
    nk = max(1, min(LKV, tmax + 1)) if exchange is None else max(0, min(LKV, tmax + 1 - key_start))
    k = k[:, :, :nk]
    v = v[:, :, :nk]
    if key_mask is not None:
        key_mask = key_mask[:, :nk].to(device=q2.device, dtype=torch.bool)
    scale = 1.0 / math.sqrt(D)
    W = params.window_len
    if plan is not None:
        kspans = params.num_spans
        for name in ("anchor", "lo", "hi"):
            plan[name] = torch.full((B, HQ, LQ, kspans), -1, dtype=torch.long, device=q2.device)
        plan["score"] = torch.full((B, HQ, LQ, kspans), -1e9, dtype=torch.float32, device=q2.device)
    # rows without anchors take plain causal attention; a slice sends every row through the
    # general path, whose collectives every slice must run alike
    causal = (pos + 1 <= W).nonzero().flatten() if exchange is None else pos[:0]
    general = (pos + 1 > W).nonzero().flatten() if exchange is None else torch.arange(LQ, device=q2.device)
    if len(causal):
        _causal_rows(q2, k, v, pos, key_mask, W, out, causal, scale)
    if len(general):
        tables = get_tables(params, tmax + 1, "cpu" if q2.device.type == "cpu" else q2.device)
        st = _first_true(key_mask, B, nk, q2.device)
        # reads limited to [0, nk): positions >= LKV would index out of the cache
        _general_rows(q1, q2, k, v, pos, key_mask, params, tables, st, out, general, scale, plan, key_start,
                      exchange)
    return out.to(q2.dtype)


def reference_decode(q1, q2, k, v, positions, params: SpanParams, key_mask=None):
    """One query per sequence: q [B,HQ,1,D], positions [B] int64."""
    B, HQ, LQ, D = q2.shape
    if LQ != 1:
        raise ValueError(f"superlinear_decode: expected one query per sequence, got LQ={LQ}")
    pos = positions.reshape(-1).to(torch.long)
    if pos.numel() != B:
        raise ValueError(f"superlinear_decode: positions must have B={B} entries, got {pos.numel()}")
    W = params.window_len
    if B == 1:
        t = int(pos[0])
        if t + 1 <= W and key_mask is None:
            # fast path (the default model, short contexts): plain attention over the prefix
            n = min(t + 1, k.shape[2])
            o = F.scaled_dot_product_attention(q2.float(), k[:, :, :n].float(), v[:, :, :n].float(),
                                               enable_gqa=HQ != k.shape[1])
            return o.to(q2.dtype)
        return reference_prefill(q1, q2, k, v, pos, params, key_mask)
    outs = []
    for b in range(B):
        outs.append(reference_prefill(q1[b:b + 1], q2[b:b + 1], k[b:b + 1], v[b:b + 1], pos[b:b + 1], params,
                                      None if key_mask is None else key_mask[b:b + 1]))
    return torch.cat(outs, 0)
