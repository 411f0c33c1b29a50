"""The PyTorch oracles of the MoE decode kernels (fp32, plain loops: tests only).

``moe_decode_reference``: one token through a Nemotron-H-style mixture of experts (router,
top-k, routed experts, shared expert); ``expert_rows_reference``: the picked experts'
matrix-vector products.
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


def expert_rows_reference(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor,
                          rows_per_x: int = 1) -> torch.Tensor:
    """The oracle of ``triton_rows.expert_rows``: ``weight[experts[r]] @ x[r // rows_per_x]``, in
    fp32, out in ``x``'s dtype (it copies the picked experts' weights: tests only)."""
    rows = x.float().repeat_interleave(rows_per_x, dim=0)
    picked = weight.float().index_select(0, experts.reshape(-1))
    return torch.bmm(picked, rows[:, :, None])[:, :, 0].to(x.dtype)
