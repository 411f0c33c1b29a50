"""One MoE decode step's routed experts at the 30B shape (128 experts of 1856 x 2688, top 6),
timed as CUDA-graph replays: torch's grouped matmul (in bf16 on Hopper its CUTLASS kernel)
against the Triton expert-rows kernel (the fp16 decode path), in bf16 and fp16. Each captured
call picks other experts, so the weights come from HBM, not L2. ``python3 scripts/gpu_moe_decode.py``
(scripts/gpu_flagship.sh moe)."""

import itertools

import torch

from superlinear.model.moe import grouped_experts, rows_experts
from superlinear.kernels.moe_decode.triton_rows import expert_rows
from superlinear.plugins.bench.attention import graph_ms

EXPERTS, INTER, HIDDEN, TOP_K = 128, 1856, 2688, 6


def relu2(t):
    return torch.relu(t).square()


def time_dtype(dtype: torch.dtype, g: torch.Generator) -> None:
    weight_bytes = 2 * TOP_K * INTER * HIDDEN * 2  # up and down of the picked experts, 2 bytes each
    up = (torch.randn(EXPERTS, INTER, HIDDEN, device="cuda", generator=g) * 0.02).to(dtype)
    down = (torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", generator=g) * 0.02).to(dtype)
    x = torch.randn(1, HIDDEN, device="cuda", generator=g).to(dtype)
    weights = torch.rand(1, TOP_K, device="cuda", generator=g)
    picks = itertools.cycle([torch.randperm(EXPERTS, device="cuda", generator=g)[:TOP_K][None] for _ in range(40)])

    def rows():
        return rows_experts(x, next(picks), weights, up, down, relu2, expert_rows)

    def grouped():
        return grouped_experts(x, next(picks), weights, up, down, relu2)

    experts = next(picks)
    a = rows_experts(x, experts, weights, up, down, relu2, expert_rows).double()
    b = grouped_experts(x, experts, weights, up, down, relu2).double()
    print(f"{dtype}: rows vs grouped relative difference {float((a - b).norm() / b.norm()):.2e}")
    cases = {"rows (Triton)": rows}
    if dtype == torch.bfloat16:  # fp16 grouped syncs with the host: it cannot be captured
        cases["grouped (torch._grouped_mm)"] = grouped
    for name, fn in cases.items():
        ms = graph_ms(fn)
        print(f"{dtype} {name}: {ms * 1e3:.1f} us per MoE layer, {weight_bytes / ms / 1e9:.2f} TB/s of "
              f"expert weights ({weight_bytes / 2**20:.0f} MiB)")


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        time_dtype(dtype, g)


if __name__ == "__main__":
    main()
