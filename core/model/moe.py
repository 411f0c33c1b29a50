"""Nemotron-H's mixture of experts without host synchronisation.

transformers loops over the experts a batch hits, reading the hit list back to the host (one
sync per layer and a different launch sequence per token), which keeps the decode step out of
a CUDA graph. Here every shape is fixed by the number of tokens: the T*K (token, expert) rows
are sorted by expert, both projections run as one grouped matmul each over the experts'
stacked weights (``torch._grouped_mm``, with per-expert row offsets computed on the device),
and the rows are put back in token order and weighted. The router is transformers' own module
(pure tensor ops). The same code serves prefill (T = chunk) and decode (T = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm`` runs on CPU (torch >= 2.9) and on Hopper-class GPUs in bf16."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


def moe_forward(moe, config, x: torch.Tensor, grouped: bool) -> torch.Tensor:
    """``x [1, T, hidden]`` through router, routed experts and the shared expert. Without
    ``grouped`` (no grouped matmul for this device/dtype) transformers' experts loop runs."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, experts = route(moe.gate, config, flat)  # weights [T, K] fp32, experts [T, K]
    routed = moe.fc1_latent_proj(flat)
    if grouped:
        routed = grouped_experts(routed, experts, weights, moe.experts.up_proj, moe.experts.down_proj,
                                 moe.experts.act_fn)
    else:
        routed = moe.experts(routed, experts, weights)
    routed = moe.fc2_latent_proj(routed)
    return routed.reshape(shape) + moe.shared_experts(x)


def route(gate, config, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nemotron-H's router: sigmoid scores, top-k on scores + correction bias, weights
    renormalised and scaled. With ``topk_group == n_group`` every group is kept, so the
    group-limited selection is the identity and is skipped (fewer kernels in a decode step);
    otherwise transformers' router module runs."""
    if config.topk_group != config.n_group:
        _, weights, experts = gate(x)
        return weights, experts
    scores = F.linear(x.float(), gate.weight.float()).sigmoid()
    experts = torch.topk(scores + gate.e_score_correction_bias, k=config.num_experts_per_tok, dim=-1,
                         sorted=False)[1]
    weights = scores.gather(1, experts)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * config.routed_scaling_factor, experts


def grouped_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor, act) -> torch.Tensor:
    """``x [T, H]``, ``experts``/``weights [T, K]``, ``up [E, I, H]``, ``down [E, H, I]`` ->
    ``sum_k weights[t, k] * down_e(act(up_e(x_t)))`` for ``e = experts[t, k]``, ``[T, H]``."""
    tokens, k = experts.shape
    num_experts = up.shape[0]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) rows grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # end row of each expert's group
    rows = x[order // k]
    hidden = act(torch._grouped_mm(rows, up.transpose(1, 2), offs=offsets))
    # the routing weight scales the (narrower) hidden rows: down is linear, so this is the same
    # as weighting its output, and the combine below is a plain sum
    hidden = hidden * weights.reshape(-1)[order, None].to(hidden.dtype)
    out = torch._grouped_mm(hidden, down.transpose(1, 2), offs=offsets)
    # back to (token, slot) order by a gather with the inverse permutation (no scatter, no
    # atomics: a replayed graph gives the eager step's bits), then the sum over the slots
    inverse = torch.argsort(order)
    return out.index_select(0, inverse).view(tokens, k, -1).sum(1)
