"""Tile-size sweep of the Triton prefill span kernel and the decode split size (device machine)."""

import statistics
import sys
from functools import partial

import torch

from superlinear.kernels import SpanParams
from superlinear.kernels.attention.triton_decode import triton_decode
from superlinear.kernels.attention.triton_prefill import triton_prefill
from superlinear.plugins.bench.attention import CONFIGS, graph_ms

HQ, HKV, D = 32, 2, 128
g = torch.Generator(device="cuda").manual_seed(0)
LMAX = 4 << 20
K_ = torch.randn(1, HKV, LMAX, D, device="cuda", dtype=torch.bfloat16, generator=g)
V_ = torch.randn_like(K_)


def prefill_ms(p, L, blocks):
    C = 16384
    q1 = torch.randn(1, HQ, C, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q2 = torch.randn_like(q1)
    pos = torch.arange(L - C, L, device="cuda")
    k, v = K_[:, :, :L], V_[:, :, :L]
    runs = []
    for it in range(5):
        ev: list = []
        triton_prefill(q1, q2, k, v, pos, p, blocks=blocks, timings=ev)
        torch.cuda.synchronize()
        if it >= 1:
            runs.append([ev[i].elapsed_time(ev[i + 1]) for i in range(len(ev) - 1)])
    return [statistics.median(r[i] for r in runs) for i in range(4)]


what = sys.argv[1] if len(sys.argv) > 1 else "all"
p = SpanParams(**CONFIGS["1"])
if what in ("prefill", "all"):
    for L in (65536, 1 << 20):
        R = 64 if L == 65536 else 256
        for blocks in [dict(), dict(span_m=128), dict(span_m=32), dict(span_n=128), dict(span_n=32),
                       dict(span_warps=8), dict(span_m=128, span_warps=8), dict(span_stages=3),
                       dict(span_r=R // 2), dict(span_r=R * 2), dict(span_r=R * 4)]:
            try:
                st = prefill_ms(p, L, blocks)
                print(f"prefill L={L >> 10}K {blocks}: search {st[0]:.2f} bucket {st[1]:.2f} span {st[2]:.2f} "
                      f"win {st[3]:.2f} total {sum(st):.2f} ms", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"prefill L={L >> 10}K {blocks}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
if what in ("decode", "all"):
    for L in (65536, 1 << 20, 4 << 20):
        q1 = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
        q2 = torch.randn_like(q1)
        pos = torch.tensor([L - 1], device="cuda")
        k, v = K_[:, :, :L], V_[:, :, :L]
        for chunk, bn, w in [(512, 64, 4), (256, 64, 4), (128, 64, 4), (128, 128, 8), (256, 128, 8),
                             (1024, 64, 4), (512, 128, 8)]:
            ms = graph_ms(partial(triton_decode, q1, q2, k, v, pos, p, chunk=chunk, block_n=bn, warps=w))
            print(f"decode L={L >> 10}K chunk={chunk} block_n={bn} warps={w}: {ms * 1e3:.1f} us", flush=True)
