"""Nemotron-H's mixture of experts without host synchronisation.

transformers loops over the experts a batch hits, reading the hit list back to the host (one
sync per layer and a different launch sequence per token), which keeps the decode step out of
a CUDA graph. Here every shape is fixed by the number of tokens:

- a prefill chunk: the T*K (token, expert) rows are sorted by expert, both projections run as one
  grouped matmul each over the experts' stacked weights (``torch._grouped_mm``, with per-expert
  row offsets computed on the device), and the rows are put back in token order and weighted.
  The router is transformers' own module (pure tensor ops).
- a decode step on CUDA: ``superlinear.kernels.moe_decode`` does the layer (router, top-k, the
  picked experts and the shared expert) in three Triton kernels: measured on the H100 it beat
  both torch's grouped matmul and a Triton expert-rows GEMV (issue 26).

torch's grouped matmul has a host-sync-free kernel only in bf16 on sm90/sm100 (torch 2.11: the
CUTLASS path); in fp16, fp32 or on other GPUs it reads the offsets on the host and loops over the
experts, which is fine in a prefill chunk but cannot be captured, so there the fused kernels also
take the few tokens of a batched decode step. ``experts_path`` decides, by device and dtype.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# tokens of one MoE call up to which the fused decode kernels run where the grouped matmul syncs
# with the host: a decode step has one per sequence of its batch (at most 64, the largest bucket
# of superlinear.model.batch); each token reads its own experts, so a prefill chunk takes the
# grouped matmul
FUSED_MAX_TOKENS = 64


@dataclass(frozen=True)
class ExpertsPath:
    """How the routed experts run: ``grouped`` (``torch._grouped_mm``, no host sync; a one-token
    step on the fused decode kernels when ``fused_decode``), ``fused`` (grouped matmul with host
    syncs in prefill, the fused decode kernels for up to ``FUSED_MAX_TOKENS`` tokens) or ``loop``
    (transformers' experts loop: the slow fallback, ``reason`` says why)."""

    kind: str
    reason: str = ""
    fused_decode: bool = False
    blocked: str = ""  # why the fused decode kernels, which would run here, cannot run this model

    @property
    def fast(self) -> bool:
        """No host sync in a decode step: the step can be one CUDA graph."""
        return self.kind != "loop"

    def fused_for(self, tokens: int) -> bool:
        """Whether a call with ``tokens`` tokens runs on the fused decode kernels."""
        if self.kind == "fused":
            return tokens <= FUSED_MAX_TOKENS
        return self.fused_decode and tokens == 1

    def describe(self) -> str:
        if self.kind == "loop":
            return "transformers experts loop (host syncs, no CUDA graph)"
        if self.kind == "fused":
            return f"grouped matmul in prefill, fused Triton MoE decode (no host sync) [{self.reason}]"
        return "grouped matmul (no host sync)" + (", fused Triton MoE decode" if self.fused_decode else "")


def choose_experts_path(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None,
                        has_grouped_mm: bool, has_triton: bool, fused_blocker: str | None = None) -> ExpertsPath:
    """The experts path for a device (``capability``: CUDA compute capability, else None), a
    dtype and what is installed; ``fused_blocker``: why the fused decode kernels cannot run this
    model's MoE (None: they can, ``fused_decode_unsupported``)."""
    if not has_grouped_mm:
        return ExpertsPath("loop", f"torch {torch.__version__} has no grouped matmul (torch >= 2.9 has): "
                                   "MoE runs transformers' experts loop, decode without CUDA graph")
    if device_type != "cuda":
        return ExpertsPath("grouped")
    major, minor = capability
    if major < 8:
        return ExpertsPath("loop", f"compute capability {major}.{minor}: torch's grouped matmul needs 8.0+; "
                                   "MoE runs transformers' experts loop, decode without CUDA graph")
    fused = has_triton and fused_blocker is None
    blocked = fused_blocker if has_triton and fused_blocker else ""
    if dtype == torch.bfloat16 and major in (9, 10):
        return ExpertsPath("grouped", fused_decode=fused, blocked=blocked)
    name = str(dtype).replace("torch.", "")
    if fused:
        return ExpertsPath("fused", f"{name} on sm{major}{minor}: torch's grouped matmul syncs with the host "
                                    "(its CUTLASS kernel is bf16 on sm90/sm100 only)", fused_decode=True)
    why = "Triton is not installed" if not has_triton else f"the fused MoE decode cannot run it ({fused_blocker})"
    return ExpertsPath("loop", f"{name} on sm{major}{minor}: torch's grouped matmul syncs with the host and {why}: "
                               "MoE runs transformers' experts loop, decode without CUDA graph", blocked=blocked)


def experts_path(device: torch.device, dtype: torch.dtype, fused_blocker: str | None = None) -> ExpertsPath:
    cuda = device.type == "cuda"
    return choose_experts_path(device.type, dtype, torch.cuda.get_device_capability(device) if cuda else None,
                               hasattr(torch, "_grouped_mm"), importlib.util.find_spec("triton") is not None,
                               fused_blocker)


def moe_forward(moe, config, x: torch.Tensor, path: ExpertsPath) -> torch.Tensor:
    """``x [1, T, hidden]`` through router, routed experts (as ``path`` says) and the shared expert."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if path.fused_for(flat.shape[0]):
        return moe_decode_fused(moe, config, x)
    weights, experts = route(moe.gate, config, flat)  # weights [T, K] fp32, experts [T, K]
    routed = moe.fc1_latent_proj(flat)
    if path.kind == "loop":
        routed = moe.experts(routed, experts, weights)
    else:
        routed = grouped_experts(routed, experts, weights, moe.experts.up_proj, moe.experts.down_proj,
                                 moe.experts.act_fn)
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


def fused_decode_unsupported(moe, config) -> str | None:
    """Why the fused kernels cannot run this MoE module (None: they can)."""
    from superlinear.kernels.moe_decode import ACTIVATIONS

    if config.topk_group != config.n_group:
        return "group-limited routing (topk_group != n_group)"
    if config.mlp_hidden_act not in ACTIVATIONS:
        return f"activation {config.mlp_hidden_act!r}"
    if moe.shared_experts.up_proj.bias is not None or moe.shared_experts.down_proj.bias is not None:
        return "biases in the shared expert"
    return None


def moe_decode_fused(moe, config, x: torch.Tensor) -> torch.Tensor:
    """``x [1, T, hidden]`` through a ``NemotronHMoE`` module on the fused decode kernels. With a
    latent projection the shared expert and the projections run as they are (their sum
    cannot be fused past ``fc2_latent_proj``)."""
    from superlinear.kernels.moe_decode import fused_moe_decode

    flat = x.reshape(-1, x.shape[-1])
    latent = not isinstance(moe.fc1_latent_proj, torch.nn.Identity)
    shared = moe.shared_experts
    out = fused_moe_decode(flat, moe.gate.weight, moe.gate.e_score_correction_bias, moe.experts.up_proj,
                           moe.experts.down_proj, None if latent else shared.up_proj.weight,
                           None if latent else shared.down_proj.weight, top_k=config.num_experts_per_tok,
                           norm_topk=config.norm_topk_prob, scaling=config.routed_scaling_factor,
                           act=config.mlp_hidden_act, x_routed=moe.fc1_latent_proj(flat) if latent else None)
    if latent:
        out = moe.fc2_latent_proj(out) + shared(flat)
    return out.reshape(x.shape)
