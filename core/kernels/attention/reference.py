"""PyTorch reference of superlinear attention (docs/attention-spec.md): the CPU backend.

Exact, memory-safe at any L (no temporary beyond ``_BUDGET`` fp32 elements, no ``[LQ, LKV]``
matrix, no key after the largest position is read: a static cache's tail is garbage), and
cheaper than dense attention on a CPU once the context is a few times the window:

* rows with ``t + 1 <= W`` have no anchor and are plain causal attention: SDPA;
* the other rows: routing scores on the gathered anchor keys and ``topk`` (a stable sort only
  for a block where a tie straddles the k-th place); the window's softmax partial (max, sum,
  acc) per row from one matmul per block over the block's window keys; then each span's partial.
  Spans are bucketed by their first key: the spans of one kv head that start within ``na`` keys
  of each other read one contiguous key slice, so a bucket is two matmuls on slices of the
  cache (no per-head copy of K/V), masked to each span's ``[lo, hi]``. The window and span
  partials merge by log-sum-exp, which is exactly the softmax over their (disjoint) union.
* decode (one row per sequence) skips the buckets: its few spans are gathered directly.
All math is fp32; the output has q2's dtype.
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F

from .params import SpanParams, get_tables

# elements of the largest temporary (fp32): bounds memory at any L
_BUDGET = 1 << 22
# step 3's fused CPU kernel (tests switch it off to check the matmul path against it)
_FUSED = True
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# rows per routing/window block: the window matmul reads W + rows keys per row, so a small block
# wastes little; larger blocks only save per-call overhead
_MAX_BLOCK_ROWS = 128


def _first_true(key_mask: torch.Tensor | None, B: int, LKV: int) -> list[int]:
    if key_mask is None:
        return [0] * B
    any_ = key_mask.any(dim=1)
    first = key_mask.to(torch.int8).argmax(dim=1)
    return [int(f) if a else LKV for f, a in zip(first.tolist(), any_.tolist(), strict=True)]


def _run(rows):
    """``rows`` (ascending indices) as a slice when they are one run: a view, not a copy."""
    first, last = int(rows[0]), int(rows[-1])
    return slice(first, last + 1) if last - first + 1 == len(rows) else rows


def _causal_rows(q2, k, v, pos, key_mask, W, out, rows, scale):
    """Rows with t + 1 <= W: softmax over keys [max(0, t-W+1), t] ∩ mask (= [0, t] ∩ mask)."""
    B, HQ, _, D = q2.shape
    gqa = HQ != k.shape[1]
    n = len(rows)
    if key_mask is None and torch.equal(pos[rows], torch.arange(n, device=pos.device)):
        # a prefill from position 0: SDPA's causal kernel, no mask to build
        o = F.scaled_dot_product_attention(q2[:, :, _run(rows)].float(), k[:, :, :n].float(),
                                           v[:, :, :n].float(), is_causal=True, scale=scale, enable_gqa=gqa)
        out[:, :, _run(rows)] = o
        return
    i = 0
    while i < n:
        nk = int(pos[rows[i]]) + 1
        nq = max(1, min(n - i, _BUDGET // max(1, B * HQ * (nk + 64))))
        blk = rows[i:i + nq]
        t = pos[blk]
        nk = int(t.max()) + 1
        kk = torch.arange(nk, device=k.device)
        allowed = (kk[None, :] <= t[:, None]) & (kk[None, :] >= (t - W + 1).clamp(min=0)[:, None])
        allowed = allowed[None].expand(B, -1, -1)
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, :nk]
        o = F.scaled_dot_product_attention(q2[:, :, _run(blk)].float(), k[:, :, :nk].float(), v[:, :, :nk].float(),
                                           attn_mask=allowed[:, None], scale=scale, enable_gqa=gqa)
        empty = ~allowed.any(dim=-1)  # [B, nq]: no key at all (left padding) -> 0, not NaN
        if bool(empty.any()):
            o = o.masked_fill(empty[:, None, :, None], 0.0).nan_to_num(0.0)
        out[:, :, _run(blk)] = o
        i += len(blk)


def _route(q1f, k, t, key_mask, params, tables, st_t, key_start=0, exchange=None):
    """Search and span bounds of rows at positions ``t`` ([n]) for q1f ``[B,HQ,n,D]`` (fp32).

    Returns gate logits, lo and hi, each ``[B,HQ,n,k]``: unselected slots have logit -1e9 and an
    empty span (hi = lo - 1). ``anchor`` (-1 where unselected) is returned for diagnostics.
    ``k`` holds the keys at positions ``key_start ..``; with ``exchange`` (reference_prefill)
    the candidates are those held here and ``exchange.topk`` picks the global top-k.
    """
    B, HQ, n, D = q1f.shape
    HKV, LKV = k.shape[1], k.shape[2]
    key_end = key_start + LKV
    G = HQ // HKV
    kspans, s, W = params.num_spans, params.sw_index, params.window_len
    dev = q1f.device
    offs = tables.offsets
    tmax = int(t.max())
    last = int(torch.searchsorted(offs, torch.tensor(tmax + 1, device=offs.device), right=True))
    # candidate stripes by DESCENDING i: among equal scores the first (larger i) wins the tie
    Fi = offs[torch.arange(max(last - 1, s), s, -1, device=offs.device)].to(dev)  # [C]; none before the window
    C = len(Fi)
    a = t[:, None] + 1 - Fi[None, :]  # [n, C]
    cvalid = (Fi[None, :] <= t[:, None] + 1) & (a < key_end) & (a >= key_start)
    a_cl = a.clamp(key_start, max(key_start, key_end - 1))
    cvalid_b = cvalid[None] & key_mask[:, a_cl] if key_mask is not None else cvalid[None].expand(B, -1, -1)
    kk = min(kspans, C)
    if kk > 0:
        if LKV > 0:
            ka = k.index_select(2, (a_cl - key_start).reshape(-1)).float().reshape(B, HKV, n, C, D)
            scores = torch.einsum("bhgrd,bhrcd->bhgrc", q1f.reshape(B, HKV, G, n, D), ka).reshape(B, HQ, n, C)
            scores = scores.masked_fill_(~cvalid_b[:, None], float("-inf"))
        else:  # a slice that holds no key yet
            scores = torch.full((B, HQ, n, C), float("-inf"), device=dev)
        if exchange is not None:  # exchange.topk merges lists sorted by the tie rule
            top, order = torch.sort(scores, dim=-1, descending=True, stable=True)
            sel_score, order = top[..., :kk], order[..., :kk]
        elif C > kk:
            top, order = torch.topk(scores, kk + 1, dim=-1)
            # the k-th place is decided by the tie rule only if it ties with the (k+1)-th
            if bool(((top[..., kk - 1] == top[..., kk]) & torch.isfinite(top[..., kk])).any()):
                top, order = torch.sort(scores, dim=-1, descending=True, stable=True)
            sel_score, order = top[..., :kk], order[..., :kk]
        else:
            sel_score, order = scores, torch.arange(C, device=dev).expand(B, HQ, n, C)
        sel_a = torch.gather(a_cl[None, None].expand(B, HQ, -1, -1), -1, order)
    else:
        sel_score = torch.empty(B, HQ, n, 0, device=dev)
        sel_a = torch.empty(B, HQ, n, 0, device=dev, dtype=torch.long)
    if kk < kspans:
        pad = kspans - kk
        sel_score = torch.cat([sel_score, sel_score.new_full((B, HQ, n, pad), float("-inf"))], -1)
        sel_a = torch.cat([sel_a, sel_a.new_zeros((B, HQ, n, pad))], -1)
    if exchange is not None:  # the global top-k from every slice's own
        sel_score, sel_a = exchange.topk(sel_score, sel_a)
    svalid = torch.isfinite(sel_score)
    gate_logit = torch.where(svalid, sel_score, torch.full_like(sel_score, -1e9))
    tp = (t[None, :] + 1 - st_t[:, None]).clamp(min=0, max=tables.capacity)  # [B, n]
    back = tables.back.to(dev)[tp].long()[:, None, :, None]
    tt = t[None, None, :, None]
    lo = torch.maximum((sel_a - back).clamp(min=0), st_t[:, None, None, None])
    if params.forward_factor == 0:
        hi = sel_a.clone()
    else:
        fwd = tables.fwd.to(dev)[tp].long()[:, None, :, None]
        # a slice's caller has every key up to the row's own position (elsewhere if not here)
        last_key = int(t.max()) if exchange is not None else key_end - 1
        hi = torch.minimum(torch.minimum(sel_a + fwd, tt), torch.tensor(last_key, device=dev))
    if W > 0:
        hi = torch.minimum(hi, (tt - W + 1).clamp(min=0) - 1)
    hi = torch.where(svalid, hi, lo - 1)
    return gate_logit, lo, hi, torch.where(svalid, sel_a, -1)


def _softmax_partial(sc):
    """(lse, p) of the scores ``sc`` ``[..., R]`` (-inf: no key): p is the softmax (0 in a row
    without keys), lse its log-sum-exp (-inf there)."""
    m = sc.amax(-1)
    p = torch.softmax(sc, dim=-1)
    # the softmax is 1/sum at the row's maximum (exp(0) / sum): lse = max + log(sum)
    lse = m - torch.log(p.amax(-1))
    empty = torch.isneginf(m)
    if bool(empty.any()):
        p = p.masked_fill_(empty[..., None], 0.0)
        lse = lse.masked_fill_(empty, float("-inf"))
    return lse, p


def _bias(inside):
    """Additive attention bias: 0 where ``inside``, -inf elsewhere."""
    return torch.where(inside, 0.0, float("-inf"))


def _attend(q, k, v, bias, may_be_empty: bool):
    """(lse, o) of softmax attention of q ``[B,H,n,D]`` (pre-scaled) over k, v ``[B,H,R,D]`` with
    the additive ``bias`` (0 or -inf, broadcastable to ``[B,H,n,R]``): o normalized, 0 and lse
    -inf in a row without keys (which only a call that says ``may_be_empty`` has).

    On CPU this is torch's fused flash-attention kernel, the one SDPA runs, called for its
    log-sum-exp (SDPA returns only o): about 3x the speed of the matmul/softmax/matmul path."""
    if _FUSED and q.device.type == "cpu" and _FLASH_CPU is not None:
        o, lse = _FLASH_CPU(q, k.float(), v.float(), attn_mask=bias, scale=1.0)
        if may_be_empty:  # the kernel reports lse 0 (and o 0) for a row without keys
            lse = lse.masked_fill_(torch.isneginf(bias.amax(-1)).expand(lse.shape), float("-inf"))
        return lse, o
    lse, p = _softmax_partial(torch.matmul(q, k.float().transpose(-1, -2)) + bias)
    return lse, torch.matmul(p, v.float())


def _window_partials(q2s, k, v, t, W, key_mask, key_start=0):
    """(lse, o) of each row's softmax over its window ``[t-W+1, t] ∩ key_mask`` (∩ the keys
    held: ``k`` starts at position ``key_start``), o normalized: one call per block over the
    block's window keys, the G query heads of a kv head stacked as rows. q2s ``[B,HQ,n,D]``
    fp32, pre-scaled."""
    B, HQ, n, D = q2s.shape
    HKV = k.shape[1]
    G = HQ // HKV
    w_lo = (t - W + 1).clamp(min=max(0, key_start))
    w_hi = t.clamp(max=key_start + k.shape[2] - 1)
    r0, r1 = int(w_lo.min()), int(w_hi.max())
    if W <= 0 or r1 < r0:
        return torch.full((B, HQ, n), float("-inf"), device=q2s.device), torch.zeros(B, HQ, n, D, device=q2s.device)
    kr = torch.arange(r0, r1 + 1, device=q2s.device)
    inside = (kr[None, :] >= w_lo[:, None]) & (kr[None, :] <= w_hi[:, None])  # [n, R]
    if key_mask is not None:
        inside = inside[None, None] & key_mask[:, None, None, r0:r1 + 1]
    bias = _bias(inside)
    bias = bias.repeat(*([1] * (bias.dim() - 2)), G, 1)  # the G query heads of a kv head as rows
    held = slice(r0 - key_start, r1 + 1 - key_start)
    lse, o = _attend(q2s.reshape(B, HKV, G * n, D), k[:, :, held], v[:, :, held], bias,
                     key_mask is not None or bool((w_hi < w_lo).any()))
    return lse.reshape(B, HQ, n), o.reshape(B, HQ, n, D)


def _span_weight(lse_w, lse_s):
    """Weight of a span's softmax in the softmax over (window ∪ span): sigmoid(lse_s - lse_w),
    0 when the span has no key (and when neither has: the row's output is then 0)."""
    return torch.sigmoid(lse_s - lse_w).nan_to_num_(0.0)


def _spans_of_head(lo, hi, b, h, G):
    """The non-empty spans of kv head ``h`` in batch row ``b``: (ids into the flattened
    ``[G, n, k]`` slots, lo, hi)."""
    lo_f, hi_f = lo[b, h * G:(h + 1) * G].reshape(-1), hi[b, h * G:(h + 1) * G].reshape(-1)
    ids = (hi_f >= lo_f).nonzero().flatten()
    return ids, lo_f[ids], hi_f[ids]


def _bucket_width(lmax: int) -> int:
    """Spans whose first keys lie within this many keys share a bucket: a bucket reads its
    spans' length plus this width, so a quarter of the span length wastes at most a quarter
    while keeping the buckets (one pair of matmuls each) few."""
    return max(16, lmax // 4)


def _add_spans(res, q2s, k, v, lo, hi, gates, lse_w, o_w, key_mask, key_start=0, slots=None):
    """Add ``Σ_j gates_j · w_j · (s_j - o_w)`` over the non-empty spans to ``res`` ``[B,HQ,n,D]``
    (which holds o_w: Σ_j gates_j = 1), s_j the softmax over span j alone, w_j its weight against
    the window's. Spans are bucketed by first key (module doc); ``k`` starts at position
    ``key_start``. q2s pre-scaled. With ``slots`` = (o ``[B,HQ,n,k,D]``, lse ``[B,HQ,n,k]``),
    holding the window's, each span's softmax over window ∪ span and its log-sum-exp are
    written there instead (ungated: a slice's partials, for its exchange)."""
    B, HQ, n, kspans = lo.shape
    D = q2s.shape[-1]
    HKV = k.shape[1]
    G = HQ // HKV
    for b in range(B):
        for h in range(HKV):
            ids, lo_h, hi_h = _spans_of_head(lo, hi, b, h, G)
            if not len(ids):
                continue
            lo_h, order = torch.sort(lo_h)
            ids, hi_h = ids[order], hi_h[order]
            firsts = lo_h.tolist()
            na = _bucket_width(int((hi_h - lo_h).max()) + 1)
            hs = slice(h * G, (h + 1) * G)
            q_rows = q2s[b, hs].reshape(G * n, D)
            lse_rows, o_rows, g_f = lse_w[b, hs].reshape(G * n), o_w[b, hs].reshape(G * n, D), gates[b, hs].reshape(-1)
            i = 0
            while i < len(firsts):
                r0 = firsts[i]
                j = bisect.bisect_left(firsts, r0 + na, lo=i)
                r1 = int(hi_h[i:j].max())
                j = min(j, i + max(1, _BUDGET // (r1 - r0 + 1)))  # bound the [spans, keys] scores
                sel, lo_b, hi_b = ids[i:j], lo_h[i:j], hi_h[i:j]
                r1 = int(hi_b.max())
                i = j
                kr = torch.arange(r0, r1 + 1, device=q2s.device)
                inside = (kr[None, :] >= lo_b[:, None]) & (kr[None, :] <= hi_b[:, None])
                if key_mask is not None:
                    inside = inside & key_mask[b, None, r0:r1 + 1]
                row = sel // kspans
                held = slice(r0 - key_start, r1 + 1 - key_start)
                lse_s, o_s = _attend(q_rows[row][None, None], k[b:b + 1, h:h + 1, held], v[b:b + 1, h:h + 1, held],
                                     _bias(inside), key_mask is not None)
                lse_s, o_s = lse_s[0, 0], o_s[0, 0]
                o_w_rows, w = o_rows[row], _span_weight(lse_rows[row], lse_s)
                if slots is None:
                    res[b, hs].view(G * n, D).index_add_(0, row, o_s.sub_(o_w_rows).mul_((w * g_f[sel])[:, None]))
                else:
                    slots[0][b, hs].view(G * n * kspans, D).index_copy_(
                        0, sel, o_w_rows + o_s.sub_(o_w_rows).mul_(w[:, None]))
                    slots[1][b, hs].view(G * n * kspans).index_copy_(0, sel, torch.logaddexp(lse_rows[row], lse_s))


def _gates(gate_logit, kspans):
    gates = torch.softmax(gate_logit, dim=-1)
    return torch.where(torch.isnan(gates), torch.full_like(gates, 1.0 / kspans), gates)


def _general_rows(q1, q2, k, v, pos, key_mask, params, tables, st, out, rows, scale, plan=None, key_start=0,
                  exchange=None):
    B, HQ, _, D = q2.shape
    HKV = k.shape[1]
    key_end = key_start + k.shape[2]  # this call holds the keys at positions [key_start, key_end)
    W = params.window_len
    kspans = params.num_spans
    st_t = torch.tensor(st, device=pos.device, dtype=torch.long)
    # a group of rows shares the span buckets (the more rows, the fuller a bucket); it holds the
    # window partials of its rows, about as much as the output
    group = max(1, _BUDGET // (B * HQ * ((2 + (kspans if exchange is not None else 0)) * D + 4 * kspans + 1)))
    for g0 in range(0, len(rows), group):
        grows = rows[g0:g0 + group]
        n = len(grows)
        q2s = q2[:, :, _run(grows)].float() * scale
        gate_logit = torch.empty(B, HQ, n, kspans, device=pos.device)
        lo = torch.empty(B, HQ, n, kspans, dtype=torch.long, device=pos.device)
        hi = torch.empty_like(lo)
        lse_w, o_w = torch.empty(B, HQ, n, device=pos.device), torch.empty(B, HQ, n, D, device=pos.device)
        i = 0
        while i < n:
            t_first = int(pos[grows[i]])
            ncand = max(1, int((t_first + 2) ** params.power) + 2)
            per_row = B * HQ * max(ncand * (D // max(HQ // HKV, 1) + 1), W + _MAX_BLOCK_ROWS)
            nq = max(1, min(n - i, _MAX_BLOCK_ROWS, _BUDGET // max(1, per_row)))
            blk = slice(i, i + nq)
            t = pos[grows[blk]]
            gate_logit[:, :, blk], lo[:, :, blk], hi[:, :, blk], anchor = _route(
                q1[:, :, _run(grows[blk])].float(), k, t, key_mask, params, tables, st_t, key_start, exchange)
            lse_w[:, :, blk], o_w[:, :, blk] = _window_partials(q2s[:, :, blk], k, v, t, W, key_mask, key_start)
            if plan is not None:
                plan["anchor"][:, :, grows[blk]] = anchor
                plan["lo"][:, :, grows[blk]] = torch.where(anchor >= 0, lo[:, :, blk], -1)
                plan["hi"][:, :, grows[blk]] = torch.where(anchor >= 0, hi[:, :, blk], -1)
                plan["score"][:, :, grows[blk]] = gate_logit[:, :, blk]
            i += nq
        gates = _gates(gate_logit, kspans)
        # the parts of the spans held here (all of them without a slice)
        lo, hi = lo.clamp(min=key_start), hi.clamp(max=key_end - 1)
        if exchange is None:
            res = o_w.clone()
            _add_spans(res, q2s, k, v, lo, hi, gates, lse_w, o_w, key_mask, key_start)
        else:  # each span's softmax over the keys of every slice
            slots = (o_w[:, :, :, None].repeat(1, 1, 1, kspans, 1), lse_w[..., None].repeat(1, 1, 1, kspans))
            _add_spans(None, q2s, k, v, lo, hi, gates, lse_w, o_w, key_mask, key_start, slots)
            res = (gates[..., None] * exchange.combine(*slots)).sum(-2)
        out[:, :, _run(grows)] = res


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
        tables = get_tables(params, tmax + 1, q2.device)
        st = _first_true(key_mask, B, nk)
        _general_rows(q1, q2, k, v, pos, key_mask, params, tables, st, out, general, scale, plan, key_start,
                      exchange)
    return out.to(q2.dtype)


def _decode_one(q1, q2, k, v, t: int, params: SpanParams, key_mask, scale):
    """One sequence (B = 1) at position ``t``: search, window, and its few spans gathered in one
    go (no buckets: one row's spans rarely share one)."""
    _, HQ, _, D = q2.shape
    HKV, LKV = k.shape[1], k.shape[2]
    kspans = params.num_spans
    nk = max(1, min(LKV, t + 1))
    if key_mask is not None:
        key_mask = key_mask[:, :nk].to(dtype=torch.bool)
    W = params.window_len
    if t + 1 <= W:  # no anchor yet: plain attention over the prefix
        if key_mask is not None and not bool(key_mask.any()):
            return torch.zeros(1, HQ, 1, D, device=q2.device)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q2.float(), k[:, :, :nk].float(), v[:, :, :nk].float(),
                                              attn_mask=mask, scale=scale, enable_gqa=HQ != HKV)
    if not k.is_contiguous() or not v.is_contiguous():
        k, v, LKV = k[:, :, :nk].contiguous(), v[:, :, :nk].contiguous(), nk
    t_ = torch.tensor([t], device=q2.device)
    tables = get_tables(params, t + 1, q2.device)
    st_t = torch.tensor(_first_true(key_mask, 1, nk), device=q2.device)
    gate_logit, lo, hi, _ = _route(q1.float(), k[:, :, :nk], t_, key_mask, params, tables, st_t)
    q2s = q2.float() * scale
    lse_w, o_w = _window_partials(q2s, k[:, :, :nk], v[:, :, :nk], t_, W, key_mask)
    # every (head, slot) span at once, keys gathered from the flattened cache; an empty span
    # (hi < lo) has every key outside, so its weight is 0
    lo, hi = lo.reshape(HQ * kspans), hi.reshape(HQ * kspans)
    head = torch.arange(HQ * kspans, device=q2.device) // kspans
    L = max(1, int((hi - lo).max()) + 1)
    idx = lo[:, None] + torch.arange(L, device=q2.device)  # [spans, L]
    inside = idx <= hi[:, None]
    idx = idx.clamp(max=nk - 1)
    if key_mask is not None:
        inside = inside & key_mask[0, idx]
    flat = (idx + (head // (HQ // HKV) * LKV)[:, None]).reshape(-1)
    kg = k.reshape(HKV * LKV, D).index_select(0, flat).reshape(1, -1, L, D)
    vg = v.reshape(HKV * LKV, D).index_select(0, flat).reshape(1, -1, L, D)
    lse_s, o_s = _attend(q2s[:, head], kg, vg, _bias(inside)[None, :, None], True)
    lse_s, o_s = lse_s.reshape(-1), o_s.reshape(-1, D)
    o_w_s = o_w[0, head, 0]
    w = _span_weight(lse_w[0, head, 0], lse_s) * _gates(gate_logit, kspans).reshape(-1)
    return o_w + ((o_s - o_w_s) * w[:, None]).reshape(1, HQ, kspans, D).sum(2, keepdim=True)


def reference_decode(q1, q2, k, v, positions, params: SpanParams, key_mask=None):
    """One query per sequence: q [B,HQ,1,D], positions [B] int64."""
    B, HQ, LQ, D = q2.shape
    if LQ != 1:
        raise ValueError(f"superlinear_decode: expected one query per sequence, got LQ={LQ}")
    pos = positions.reshape(-1).to(torch.long)
    if pos.numel() != B:
        raise ValueError(f"superlinear_decode: positions must have B={B} entries, got {pos.numel()}")
    scale = 1.0 / math.sqrt(D)
    outs = [_decode_one(q1[b:b + 1], q2[b:b + 1], k[b:b + 1], v[b:b + 1], t, params,
                        None if key_mask is None else key_mask[b:b + 1], scale)
            for b, t in enumerate(pos.tolist())]
    return torch.cat(outs, 0).to(q2.dtype)
