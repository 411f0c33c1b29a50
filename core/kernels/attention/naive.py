"""A literal per-row loop of docs/attention-spec.md in float64 (slow, obviously right): the
definition the reference and Triton kernels are tested against on fresh random inputs."""

from __future__ import annotations

import math

import numpy as np


def naive_F(i: int, n: int | None, p: float | None) -> int:
    if n is not None:
        return i ** n
    return math.floor(i ** (1.0 / p))


def naive_attention(q1, q2, k, v, positions, *, sw_index, num_spans, backward_factor, forward_factor,
                    span_power, search_power=None, inv_search_power=None, key_mask=None):
    """All inputs numpy float64 / int64 / bool. Returns (out [B,HQ,LQ,D], anchors [B,HQ,LQ,k])."""
    n, p = inv_search_power, search_power
    B, HQ, LQ, D = q2.shape
    HKV, LKV = k.shape[1], k.shape[2]
    G = HQ // HKV
    s, kk, bf, ff, sp = sw_index, num_spans, backward_factor, forward_factor, span_power
    W = naive_F(s + 1, n, p) - 1
    out = np.zeros((B, HQ, LQ, D))
    anchors = np.full((B, HQ, LQ, kk), -1, dtype=np.int64)
    for b in range(B):
        mask = np.ones(LKV, bool) if key_mask is None else key_mask[b]
        st = int(np.argmax(mask)) if mask.any() else LKV
        for h in range(HQ):
            hk = h // G
            for r in range(LQ):
                t = int(positions[r])
                tp = max(0, t + 1 - st)
                cands = []
                i = s + 1
                while naive_F(i, n, p) <= t + 1:
                    a = t + 1 - naive_F(i, n, p)
                    if a < LKV and mask[a]:
                        cands.append((float(q1[b, h, r] @ k[b, hk, a]), i, a))
                    i += 1
                # highest score first; a tie keeps the larger i
                cands.sort(key=lambda c: (-c[0], -c[1]))
                sel = cands[:kk]
                sw = set(range(max(0, t - W + 1), min(t, LKV - 1) + 1)) if W > 0 else set()
                back = math.ceil(bf * tp ** sp)
                fwd = math.ceil(ff * tp ** sp)
                outs, scores = [], []
                for j in range(kk):
                    if j < len(sel):
                        score, _, a = sel[j]
                        anchors[b, h, r, j] = a
                        lo = max(a - back, 0, st)
                        hi = a if ff == 0 else min(a + fwd, t, LKV - 1)
                        if W > 0:
                            hi = min(hi, max(0, t - W + 1) - 1)
                        keys = set(range(lo, hi + 1)) | sw
                    else:
                        score = -1e9
                        keys = set(sw)
                    keys = sorted(x for x in keys if mask[x])
                    scores.append(score)
                    if not keys:
                        outs.append(np.zeros(D))
                        continue
                    logits = k[b, hk, keys] @ q2[b, h, r] / math.sqrt(D)
                    w = np.exp(logits - logits.max())
                    w /= w.sum()
                    outs.append(w @ v[b, hk, keys])
                sc = np.array(scores)
                g = np.exp(sc - sc.max())
                g /= g.sum()
                if np.isnan(g).any():
                    g = np.full(kk, 1.0 / kk)
                out[b, h, r] = sum(g[j] * outs[j] for j in range(kk))
    return out, anchors
