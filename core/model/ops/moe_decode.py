"""One token through Nemotron-H's mixture of experts in three kernels instead of ~25.

The grouped-matmul path (``superlinear.model.moe``) spends a decode step's MoE layer on the
router's matmul, sigmoid, top-k, gathers, a sort, counts, offsets, two grouped matmuls padded
to full tiles for one row, the activation, an inverse sort, the weighted sum and the shared
expert's three kernels. For one token the work is a handful of GEMVs; here:

1. the router: sigmoid(W_g x) for every expert (fp32);
2. the up projections of the K selected experts and of the shared expert, activation and
   routing weight included (each program also does the top-k over the E scores: E values);
3. the down projections and the sum: every output row reads its slice of each selected
   expert's weight once, adds the shared expert's, and is written in the model's dtype.

``moe_decode_reference`` is the same computation in plain PyTorch (fp32), what the kernels are
tested against; ``fused_moe_decode`` runs the Triton kernels (``triton_moe_decode``);
``moe_decode`` takes the module (``NemotronHMoE``) and its config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu2", "silu")


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu2":
        return F.relu(x).square()
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"activation {name!r} is not one of {ACTIVATIONS}")


def moe_decode_reference(x, router_weight, correction_bias, up, down, shared_up=None, shared_down=None, *,
                         top_k: int, norm_topk: bool, scaling: float, act: str, x_routed=None) -> torch.Tensor:
    """``x [1, H]`` -> ``[1, O]`` in ``x``'s dtype: ``sum_k w_k down_e(act(up_e(xr)))`` over the
    top-k experts ``e`` of ``sigmoid(router_weight @ x) + correction_bias``, plus the shared
    expert ``shared_down(act(shared_up(x)))`` if given. ``up [E, I, HR]``, ``down [E, O, I]``;
    ``xr`` is ``x_routed`` (a latent projection of x) or x. All in fp32."""
    xf = x.float().reshape(-1)
    scores = torch.sigmoid(router_weight.float() @ xf)
    experts = torch.topk(scores + correction_bias.float(), top_k).indices
    weights = scores[experts]
    if norm_topk:
        weights = weights / (weights.sum() + 1e-20)
    weights = weights * scaling
    xr = (x if x_routed is None else x_routed).float().reshape(-1)
    out = torch.zeros(down.shape[1], dtype=torch.float32, device=x.device)
    for e, w in zip(experts.tolist(), weights, strict=True):
        out += down[e].float() @ (activation(act, up[e].float() @ xr) * w)
    if shared_up is not None:
        out += shared_down.float() @ activation(act, shared_up.float() @ xf)
    return out.to(x.dtype)[None]


def fused_moe_decode(x, router_weight, correction_bias, up, down, shared_up=None, shared_down=None, *,
                     top_k: int, norm_topk: bool, scaling: float, act: str, x_routed=None,
                     block_e: int = 4, block_i: int = 32, block_h: int = 128, block_o: int = 16) -> torch.Tensor:
    """``moe_decode_reference`` on the Triton kernels (no host sync: capturable in a CUDA graph).
    The block sizes are the GPU's tuning knobs, per program: experts of the router, rows of an
    up projection, columns of the input per step, output rows of the down projection."""
    from superlinear.model.ops.triton_moe_decode import moe_decode_kernels

    xr = x if x_routed is None else x_routed
    num_experts, inner, routed_in = up.shape
    if x.dim() != 2 or x.shape[0] != 1 or xr.shape != (1, routed_in):
        raise ValueError(f"one token: x [1, H] and the routed input [1, {routed_in}], got {tuple(x.shape)}, "
                         f"{tuple(xr.shape)}")
    if router_weight.shape != (num_experts, x.shape[1]) or down.shape[0] != num_experts or down.shape[2] != inner:
        raise ValueError(f"router {tuple(router_weight.shape)}, up {tuple(up.shape)} and down "
                         f"{tuple(down.shape)} do not fit together")
    if (shared_up is None) != (shared_down is None):
        raise ValueError("the shared expert needs both shared_up and shared_down")
    if shared_up is not None and (shared_up.shape[1] != x.shape[1] or shared_down.shape != (down.shape[1],
                                                                                             shared_up.shape[0])):
        raise ValueError(f"shared expert {tuple(shared_up.shape)} / {tuple(shared_down.shape)} does not fit")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {ACTIVATIONS}")
    tensors = (x, xr, router_weight, correction_bias, up, down, shared_up, shared_down)
    if not all(t is None or t.is_contiguous() for t in tensors):
        raise ValueError("the fused MoE decode reads contiguous tensors (a copy would move the experts)")
    return moe_decode_kernels(x, xr, router_weight, correction_bias, up, down, shared_up, shared_down,
                              top_k=top_k, norm_topk=norm_topk, scaling=float(scaling), act=act,
                              block_e=block_e, block_i=block_i, block_h=block_h, block_o=block_o)


def unsupported(moe, config) -> str | None:
    """Why the fused kernels cannot run this MoE module (None: they can)."""
    if config.topk_group != config.n_group:
        return "group-limited routing (topk_group != n_group)"
    if config.mlp_hidden_act not in ACTIVATIONS:
        return f"activation {config.mlp_hidden_act!r}"
    if moe.shared_experts.up_proj.bias is not None or moe.shared_experts.down_proj.bias is not None:
        return "biases in the shared expert"
    return None


def moe_decode(moe, config, x: torch.Tensor) -> torch.Tensor:
    """``x [1, 1, hidden]`` through a ``NemotronHMoE`` module on the fused kernels. With a
    latent projection the shared expert and the projections run as they are (their sum
    cannot be fused past ``fc2_latent_proj``)."""
    flat = x.reshape(1, -1)
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
