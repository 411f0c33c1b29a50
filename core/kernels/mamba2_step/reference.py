"""The PyTorch oracle of the Mamba-2 decode step's prologue (``fused.step_prologue``).

Between the input projection and the state update, one token's step of a Mamba-2 mixer shifts
the token into the conv state and convolves, splits the projection into x, B, C and dt, applies
softplus and the dt limit and forms the decay. From the projected row ``[gate | x B C | dt]``
this returns the operands of the simple-GLA recurrence (q = C, k = dt B per head, v = x,
g = dt A, all fp32). ``dims`` is any object with the mixer's sizes: ``heads``, ``head_dim``,
``state``, ``groups``, ``kernel``, ``inner``, ``conv_dim``, ``dt_limit`` (the model's
``MambaDims``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_shift_reference(u: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """``u [1, C]``: shift it into ``state [1, C, kernel]`` (newest last, in place) and return
    silu(depthwise conv) ``[1, C]`` in ``u``'s dtype."""
    state.copy_(torch.cat([state[:, :, 1:], u[:, :, None].to(state.dtype)], dim=-1))
    out = (state * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out).to(u.dtype)


def step_prologue_reference(projected, conv_state, conv_weight, conv_bias, dt_bias, a_log, dims):
    """``projected [1, 1, inner + conv_dim + heads]`` -> ``(q, k, v, g)``: ``q, k [1, 1, H, N]``,
    ``v [1, 1, H, P]``, ``g [1, 1, H]`` fp32; shifts the token into ``conv_state`` in place.
    softplus(dt) is clamped to ``dims.dt_limit``."""
    _, xbc, dt = projected.split([dims.inner, dims.conv_dim, dims.heads], dim=-1)
    xbc = conv_shift_reference(xbc[:, 0], conv_state, conv_weight, conv_bias)[:, None]
    xs, b, c = xbc.float().split([dims.inner, dims.groups * dims.state, dims.groups * dims.state], dim=-1)
    per_group = dims.heads // dims.groups
    dt = F.softplus(dt.float() + dt_bias.float()).clamp(*dims.dt_limit)  # [1, 1, H]
    q = c.reshape(1, 1, dims.groups, 1, dims.state).expand(-1, -1, -1, per_group, -1)
    k = b.reshape(1, 1, dims.groups, 1, dims.state) * dt.reshape(1, 1, dims.groups, per_group, 1)
    g = dt * -torch.exp(a_log.float())
    return (q.reshape(1, 1, dims.heads, dims.state), k.reshape(1, 1, dims.heads, dims.state),
            xs.reshape(1, 1, dims.heads, dims.head_dim), g)
