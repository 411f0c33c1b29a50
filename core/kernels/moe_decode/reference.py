"""The PyTorch oracle of the MoE decode kernels: the tokens of a decode step through a
Nemotron-H-style mixture of experts (router, top-k, routed experts, shared expert), one token
and one expert at a time in fp32 (tests only).
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
    """``x [T, H]`` -> ``[T, O]`` in ``x``'s dtype, per token: ``sum_k w_k down_e(act(up_e(xr)))``
    over the top-k experts ``e`` of ``sigmoid(router_weight @ x) + correction_bias``, plus the
    shared expert ``shared_down(act(shared_up(x)))`` if given. ``up [E, I, HR]``,
    ``down [E, O, I]``; ``xr`` is ``x_routed [T, HR]`` (a latent projection of x) or x. All in
    fp32."""
    xr_all = x if x_routed is None else x_routed
    rows = []
    for t in range(x.shape[0]):
        xf = x[t].float()
        scores = torch.sigmoid(router_weight.float() @ xf)
        experts = torch.topk(scores + correction_bias.float(), top_k).indices
        weights = scores[experts]
        if norm_topk:
            weights = weights / (weights.sum() + 1e-20)
        weights = weights * scaling
        xr = xr_all[t].float()
        out = torch.zeros(down.shape[1], dtype=torch.float32, device=x.device)
        for e, w in zip(experts.tolist(), weights, strict=True):
            out += down[e].float() @ (activation(act, up[e].float() @ xr) * w)
        if shared_up is not None:
            out += shared_down.float() @ activation(act, shared_up.float() @ xf)
        rows.append(out)
    return torch.stack(rows).to(x.dtype)
