"""One MoE decode step at the 30B shape (128 experts of 1856 x 2688, top 6, a 3712-wide shared
expert), timed as CUDA-graph replays: the fused MoE decode kernels (router, top-k, routed and
shared experts in 3 kernels: the decode path) against the grouped-matmul path (the router's
tensor ops, torch's grouped matmul: in bf16 on Hopper its CUTLASS kernel, the shared expert's
matmuls), in bf16 and fp16 (fp16's grouped matmul syncs with the host: not captured), at 1 and 4
tokens. Each captured call routes another input, so the weights come from HBM, not L2.
``python3 scripts/gpu_moe_decode.py`` (scripts/gpu_flagship.sh moe)."""

import itertools

import torch

from superlinear.kernels.moe_decode import fused_moe_decode
from superlinear.model.moe import grouped_experts
from superlinear.plugins.bench.attention import graph_ms

EXPERTS, INTER, HIDDEN, SHARED, TOP_K = 128, 1856, 2688, 3712, 6


def relu2(t):
    return torch.relu(t).square()


def time_dtype(dtype: torch.dtype, tokens: int, g: torch.Generator) -> None:
    def rand(*shape, scale):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    up, down = rand(EXPERTS, INTER, HIDDEN, scale=0.02), rand(EXPERTS, HIDDEN, INTER, scale=0.02)
    shared_up, shared_down = rand(SHARED, HIDDEN, scale=0.02), rand(HIDDEN, SHARED, scale=0.02)
    router = rand(EXPERTS, HIDDEN, scale=0.05)
    bias = torch.zeros(EXPERTS, device="cuda")
    inputs = itertools.cycle([rand(tokens, HIDDEN, scale=1.0) for _ in range(40)])
    kw = dict(top_k=TOP_K, norm_topk=True, scaling=2.5, act="relu2")
    # per token: up and down of the picked experts and of the shared expert, the router
    weight_bytes = tokens * (2 * TOP_K * INTER + 2 * SHARED) * HIDDEN * up.element_size()

    def fused(x=None):
        return fused_moe_decode(next(inputs) if x is None else x, router, bias, up, down, shared_up, shared_down, **kw)

    def grouped(x=None):
        x = next(inputs) if x is None else x
        scores = torch.sigmoid(x.float() @ router.float().T)
        experts = torch.topk(scores + bias, TOP_K, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * 2.5
        return grouped_experts(x, experts, weights, up, down, relu2) + relu2(x @ shared_up.T) @ shared_down.T

    x = next(inputs)
    a, b = fused(x).double(), grouped(x).double()
    print(f"{dtype} x{tokens}: fused vs grouped relative difference {float((a - b).norm() / b.norm()):.2e}")
    cases = {"fused (3 Triton kernels)": fused}
    if dtype == torch.bfloat16:  # fp16 grouped syncs with the host: it cannot be captured
        cases["grouped (router ops + torch._grouped_mm + shared matmuls)"] = grouped
    for name, fn in cases.items():
        ms = graph_ms(fn)
        print(f"{dtype} x{tokens} {name}: {ms * 1e3:.1f} us per MoE layer, {weight_bytes / ms / 1e9:.2f} TB/s of "
              f"weights read per token set ({weight_bytes / 2**20:.0f} MiB)")


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for tokens in (1, 4):
            time_dtype(dtype, tokens, g)


if __name__ == "__main__":
    main()
