"""A decode step's tokens through Nemotron-H's mixture of experts in three kernels instead of ~25.

The grouped-matmul path spends a decode step's MoE layer on the router's matmul, sigmoid, top-k,
gathers, a sort, counts, offsets, two grouped matmuls padded to full tiles for one row, the
activation, an inverse sort, the weighted sum and the shared expert's three kernels. For one
token the work is a handful of GEMVs; here (``triton_fused``):

1. the router: sigmoid(W_g x) for every expert (fp32);
2. the up projections of the K selected experts and of the shared expert, activation and
   routing weight included (each program also does the top-k over the E scores: E values);
3. the down projections and the sum: every output row reads its slice of each selected
   expert's weight once, adds the shared expert's, and is written in the model's dtype.

``reference.moe_decode_reference`` is the oracle.
"""

from __future__ import annotations

import torch

from .reference import ACTIVATIONS


def fused_moe_decode(x, router_weight, correction_bias, up, down, shared_up=None, shared_down=None, *,
                     top_k: int, norm_topk: bool, scaling: float, act: str, x_routed=None,
                     block_e: int = 4, block_i: int = 32, block_h: int = 128, block_o: int = 16) -> torch.Tensor:
    """``moe_decode_reference`` on the Triton kernels (no host sync: capturable in a CUDA graph),
    for the T tokens of a decode step (each reads its own experts' rows). The block sizes are the
    GPU's tuning knobs, per program: experts of the router, rows of an up projection, columns of
    the input per step, output rows of the down projection."""
    from .triton_fused import moe_decode_kernels

    xr = x if x_routed is None else x_routed
    num_experts, inner, routed_in = up.shape
    if x.dim() != 2 or x.shape[0] < 1 or xr.shape != (x.shape[0], routed_in):
        raise ValueError(f"x [T, H] and the routed input [T, {routed_in}] for T >= 1 tokens, got {tuple(x.shape)}, "
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
