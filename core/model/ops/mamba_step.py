"""The Mamba-2 decode step's prologue in one kernel.

Between the input projection and the state update a decode step of ``superlinear.model.mamba2``
runs the conv-state shift and conv, the split of the projection into x, B, C and dt, softplus,
the decay, fp32 casts and the per-head broadcasts of B and C: about a dozen small kernels per
Mamba layer, 23 layers per token in the 30B. ``step_prologue`` does all of it in one: from the
projected row ``[gate | x B C | dt]`` and the conv state it returns the operands of the
simple-GLA recurrence (q = C, k = dt B per head, v = x, g = dt A, all fp32) and updates the conv
state in place. ``step_prologue_reference`` is the same in PyTorch, built from the functions the
default path uses; ``mixer_step`` runs a whole mixer step with the prologue kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from superlinear.model.mamba2 import MambaDims, conv_step, gated_rms_norm


def step_prologue_reference(projected, conv_state, conv_weight, conv_bias, dt_bias, a_log, dims: MambaDims):
    """``projected [1, 1, inner + conv_dim + heads]`` -> ``(q, k, v, g)``: ``q, k [1, 1, H, N]``,
    ``v [1, 1, H, P]``, ``g [1, 1, H]`` fp32; shifts the token into ``conv_state`` in place.
    softplus(dt) is clamped to ``dims.dt_limit``."""
    _, xbc, dt = projected.split([dims.inner, dims.conv_dim, dims.heads], dim=-1)
    xbc = conv_step(xbc[:, 0], conv_state, conv_weight, conv_bias)[:, None]
    xs, b, c = xbc.float().split([dims.inner, dims.groups * dims.state, dims.groups * dims.state], dim=-1)
    per_group = dims.heads // dims.groups
    dt = F.softplus(dt.float() + dt_bias.float()).clamp(*dims.dt_limit)  # [1, 1, H]
    q = c.reshape(1, 1, dims.groups, 1, dims.state).expand(-1, -1, -1, per_group, -1)
    k = b.reshape(1, 1, dims.groups, 1, dims.state) * dt.reshape(1, 1, dims.groups, per_group, 1)
    g = dt * -torch.exp(a_log.float())
    return (q.reshape(1, 1, dims.heads, dims.state), k.reshape(1, 1, dims.heads, dims.state),
            xs.reshape(1, 1, dims.heads, dims.head_dim), g)


def step_prologue(projected, conv_state, conv_weight, conv_bias, dt_bias, a_log, dims: MambaDims):
    """``step_prologue_reference`` as one Triton kernel (no host sync)."""
    from superlinear.model.ops.triton_mamba_step import prologue_kernel

    width = dims.inner + dims.conv_dim + dims.heads
    if tuple(projected.shape) != (1, 1, width) or not projected.is_contiguous():
        raise ValueError(f"projected must be a contiguous [1, 1, {width}], got {tuple(projected.shape)}")
    if tuple(conv_state.shape) != (1, dims.conv_dim, dims.kernel) or not conv_state.is_contiguous():
        raise ValueError(f"conv_state must be a contiguous [1, {dims.conv_dim}, {dims.kernel}], "
                         f"got {tuple(conv_state.shape)}")
    if dims.heads % dims.groups:
        raise ValueError(f"{dims.heads} heads do not split into {dims.groups} groups")
    return prologue_kernel(projected, conv_state, conv_weight.contiguous(), conv_bias, dt_bias, a_log, dims)


def gla_step(q, k, v, g, state: torch.Tensor) -> torch.Tensor:
    """The recurrence in PyTorch: ``S = exp(g) S + v k^T``, ``y = S q`` (``state [1, H, P, N]``
    fp32, in place); ``y [1, 1, H, P]`` fp32. fla's fused recurrence does this on CUDA."""
    decay = torch.exp(g[:, 0])[..., None, None]
    state.copy_(state * decay + v[:, 0, :, :, None] * k[:, 0, :, None, :])
    return (state @ q[:, 0, :, :, None])[..., 0][:, None]


def mixer_step(mixer, dims: MambaDims, x: torch.Tensor, conv_state, ssm_state, fast: bool) -> torch.Tensor:
    """One token ``x [1, 1, hidden]`` through a Nemotron-H Mamba-2 mixer with the fused
    prologue; ``fast``: fla's fused recurrence and gated norm (CUDA)."""
    projected = mixer.in_proj(x)
    q, k, v, g = step_prologue(projected, conv_state, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                               mixer.dt_bias, mixer.A_log, dims)
    if fast:
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        y, final = fused_recurrent_simple_gla(q, k, v, g=g, scale=1.0, initial_state=ssm_state,
                                              output_final_state=True, state_v_first=True)
        ssm_state.copy_(final)
    else:
        y = gla_step(q, k, v, g, ssm_state)
    y = torch.addcmul(y.float(), v, mixer.D.float()[:, None]).reshape(1, 1, dims.inner)
    y = gated_rms_norm(y, projected[..., :dims.inner], mixer.norm.weight, dims.inner // dims.groups, dims.eps,
                       fast=fast)
    return mixer.out_proj(y.to(x.dtype))
