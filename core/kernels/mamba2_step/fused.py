"""The Mamba-2 decode step's prologue in one kernel (``triton_prologue``).

The default step runs the conv-state shift and conv, the projection split, softplus, the decay,
fp32 casts and the per-head broadcasts of B and C as about a dozen small kernels per Mamba layer
(23 layers per token in the 30B); ``step_prologue`` does it in one and returns what
``reference.step_prologue_reference`` returns.
"""

from __future__ import annotations


def step_prologue(projected, conv_state, conv_weight, conv_bias, dt_bias, a_log, dims):
    """``step_prologue_reference`` as one Triton kernel (no host sync)."""
    from .triton_prologue import prologue_kernel

    width = dims.inner + dims.conv_dim + dims.heads
    if tuple(projected.shape) != (1, 1, width) or not projected.is_contiguous():
        raise ValueError(f"projected must be a contiguous [1, 1, {width}], got {tuple(projected.shape)}")
    if tuple(conv_state.shape) != (1, dims.conv_dim, dims.kernel) or not conv_state.is_contiguous():
        raise ValueError(f"conv_state must be a contiguous [1, {dims.conv_dim}, {dims.kernel}], "
                         f"got {tuple(conv_state.shape)}")
    if dims.heads % dims.groups:
        raise ValueError(f"{dims.heads} heads do not split into {dims.groups} groups")
    return prologue_kernel(projected, conv_state, conv_weight.contiguous(), conv_bias, dt_bias, a_log, dims)
