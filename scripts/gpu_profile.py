"""Stage profile of the Triton prefill and decode at one depth (device machine)."""

import statistics
import sys

import torch

from superlinear.kernels import SpanParams
from superlinear.kernels.attention.triton_prefill import triton_prefill
from superlinear.plugins.bench.attention import CONFIGS, parse_length

cfg = sys.argv[1] if len(sys.argv) > 1 else "1"
L = parse_length(sys.argv[2] if len(sys.argv) > 2 else "1M")
blocks = eval(sys.argv[3]) if len(sys.argv) > 3 else None  # e.g. "dict(span_m=16)"
p = SpanParams(**CONFIGS[cfg])
HQ, HKV, D, C = 32, 2, 128, min(16384, L)
g = torch.Generator(device="cuda").manual_seed(0)
k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
v = torch.randn_like(k)
q1 = torch.randn(1, HQ, C, D, device="cuda", dtype=torch.bfloat16, generator=g)
q2 = torch.randn_like(q1)
pos = torch.arange(L - C, L, device="cuda")
for _ in range(2):
    triton_prefill(q1, q2, k, v, pos, p, blocks=blocks)
runs = []
for _ in range(5):
    ev: list = []
    triton_prefill(q1, q2, k, v, pos, p, blocks=blocks, timings=ev)
    torch.cuda.synchronize()
    runs.append([ev[i].elapsed_time(ev[i + 1]) for i in range(len(ev) - 1)])
names = ["search", "bucketing", "span tiles", "window+combine"]
med = [statistics.median(r[i] for r in runs) for i in range(len(names))]
print(f"profile config {cfg} L={sys.argv[2] if len(sys.argv) > 2 else '1M'} blocks={blocks}: "
      + ", ".join(f"{n} {m:.2f} ms" for n, m in zip(names, med, strict=True)) + f"; total {sum(med):.2f} ms")
