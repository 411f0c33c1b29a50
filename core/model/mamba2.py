"""The Mamba-2 mixer of Nemotron-H, run by us over the module's weights.

transformers' ``NemotronHMamba2Mixer`` owns the parameters (names and shapes of the checkpoint);
this module computes its forward against our cache, in two forms:

- a **chunk** (prefill): causal depthwise conv over the chunk, then the SSD scan. On CUDA both
  run on fla's Triton kernels (``fla-core``: ``causal_conv1d`` and ``chunk_simple_gla``, whose
  scalar-decay linear attention is exactly Mamba-2's SSD); elsewhere, or without fla, on the
  PyTorch reference below.
- a **step** (decode, one token): conv-state shift and SSM state update in plain tensor ops
  with no host synchronisation, so the whole decode step can be captured as a CUDA graph.

The SSD recurrence per head h, with state S [P, N] (head dim P, state size N)::

    dt_t = clamp(softplus(dt_raw_t + dt_bias), *time_step_limit)
                                                 (the config's limit, default (0, inf): no
                                                  clamp; in prefill and decode alike)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t  = S_t C_t + D * x_t

B and C are shared by the heads of a group. In simple-GLA terms: q = C, k = dt * B, v = x,
log-decay g = dt * A, scale 1. Outputs then go through the gated RMSNorm (per group, gate
silu(z) applied before the norm) and the output projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The reference scan walks the sequence in chunks of this many tokens (an intra-chunk
# [L, L] decay matrix per head, a state hand-off between chunks).
REFERENCE_CHUNK = 64


@dataclass(frozen=True)
class MambaDims:
    heads: int
    head_dim: int
    state: int
    groups: int
    kernel: int
    eps: float
    dt_limit: tuple[float, float] = (0.0, math.inf)

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.groups * self.state

    @classmethod
    def from_config(cls, cfg) -> MambaDims:
        return cls(heads=cfg.mamba_num_heads, head_dim=cfg.mamba_head_dim, state=cfg.ssm_state_size,
                   groups=cfg.n_groups, kernel=cfg.conv_kernel, eps=float(cfg.layer_norm_epsilon),
                   dt_limit=dt_limit_of(cfg))


def dt_limit_of(cfg) -> tuple[float, float]:
    """The clamp on softplus(dt) the model was trained with: the config's ``time_step_limit``
    (Mamba-2's ``dt_limit``). ``time_step_min`` only initialises ``dt_bias``; transformers 5.24
    clamped prefill at it and 5.25 does not, so the limit comes from the config, never from
    whichever transformers is installed."""
    limit = getattr(cfg, "time_step_limit", None)
    if limit is None:
        return (0.0, math.inf)
    low, high = (float(v) for v in limit)
    if not 0.0 <= low <= high:
        raise ValueError(f"time_step_limit {list(limit)} is not a range of non-negative numbers")
    return (low, high)


# ---------------------------------------------------------------------------------------------
# the mixer
# ---------------------------------------------------------------------------------------------

def mixer_forward(mixer, dims: MambaDims, x: torch.Tensor, conv_state: torch.Tensor,
                  ssm_state: torch.Tensor, fast: bool) -> torch.Tensor:
    """``x [B, T, hidden]`` -> ``[B, T, hidden]``; updates ``conv_state [B, conv_dim, kernel]``
    and ``ssm_state [B, heads, head_dim, state]`` (fp32) in place. ``fast``: fla kernels for a
    chunk (CUDA). ``B > 1`` only for a step (``T == 1``): B sequences' tokens, each row with its
    own state (``superlinear.model.batch``)."""
    rows, length = x.shape[0], x.shape[1]
    if rows > 1 and length > 1:
        raise ValueError("a Mamba-2 chunk runs one sequence; only a step (T == 1) takes several rows")
    projected = mixer.in_proj(x)
    gate, xbc, dt = projected.split([dims.inner, dims.conv_dim, dims.heads], dim=-1)
    weight = mixer.conv1d.weight.squeeze(1)  # [conv_dim, kernel]
    if length == 1:
        step = conv_step_fla if fast else conv_step
        xbc = step(xbc[:, 0], conv_state, weight, mixer.conv1d.bias)[:, None]
    elif fast:
        xbc = conv_chunk_fla(xbc, conv_state, weight, mixer.conv1d.bias)
    else:
        xbc = conv_chunk_reference(xbc, conv_state, weight, mixer.conv1d.bias)
    xs, b, c = xbc.split([dims.inner, dims.groups * dims.state, dims.groups * dims.state], dim=-1)
    xs = xs.reshape(rows, length, dims.heads, dims.head_dim)
    b = b.reshape(rows, length, dims.groups, dims.state)
    c = c.reshape(rows, length, dims.groups, dims.state)
    dt = F.softplus(dt.float() + mixer.dt_bias.float())  # [B, T, heads]
    a = -torch.exp(mixer.A_log.float())
    if dims.dt_limit != (0.0, math.inf):
        dt = dt.clamp(min=dims.dt_limit[0], max=dims.dt_limit[1])
    if fast:  # fla's scan (a chunk) or fused recurrence (a step): bf16 out, skip added in bf16
        scan = ssd_step_fla if length == 1 else ssd_chunk_fla
    else:
        scan = ssm_step if length == 1 else ssd_chunk_reference
    y = scan(xs, dt, a, b, c, mixer.D, ssm_state)
    y = y.reshape(rows, length, dims.inner)
    y = gated_rms_norm(y, gate, mixer.norm.weight, dims.inner // dims.groups, dims.eps, fast=fast)
    return mixer.out_proj(y.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# a decode step with the fused prologue (superlinear.kernels.mamba2_step)
# ---------------------------------------------------------------------------------------------

def gla_step(q, k, v, g, state: torch.Tensor) -> torch.Tensor:
    """The recurrence in PyTorch: ``S = exp(g) S + v k^T``, ``y = S q`` (``state [1, H, P, N]``
    fp32, in place); ``y [1, 1, H, P]`` fp32. fla's fused recurrence does this on CUDA."""
    decay = torch.exp(g[:, 0])[..., None, None]
    state.copy_(state * decay + v[:, 0, :, :, None] * k[:, 0, :, None, :])
    return (state @ q[:, 0, :, :, None])[..., 0][:, None]


def mixer_step_fused(mixer, dims: MambaDims, x: torch.Tensor, conv_state, ssm_state, fast: bool) -> torch.Tensor:
    """One token ``x [1, 1, hidden]`` through a Nemotron-H Mamba-2 mixer with the fused
    prologue; ``fast``: fla's fused recurrence and gated norm (CUDA)."""
    from superlinear.kernels.mamba2_step import step_prologue

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


# ---------------------------------------------------------------------------------------------
# causal depthwise conv
# ---------------------------------------------------------------------------------------------

def conv_step(u: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """One token per row ``u [B, conv_dim]``: shift it into ``state [B, conv_dim, kernel]`` (the
    last ``kernel`` inputs, newest last) and return silu(conv) ``[B, conv_dim]``."""
    state.copy_(torch.cat([state[:, :, 1:], u[:, :, None].to(state.dtype)], dim=-1))
    out = (state * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out).to(u.dtype)


def conv_step_fla(u: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """``conv_step`` as one fla Triton kernel (same state layout: last inputs, newest last)."""
    from fla.modules.causal_conv1d import causal_conv1d_update

    out = causal_conv1d_update(u, state, weight=weight, bias=bias, activation="silu")
    return out[0] if isinstance(out, tuple) else out


def _with_history(xbc: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``[1, kernel - 1 + T, conv_dim]``: the chunk preceded by the inputs it convolves with."""
    kernel = state.shape[-1]
    history = state[:, :, 1:].transpose(1, 2).to(xbc.dtype)  # last kernel-1 inputs
    return torch.cat([history, xbc], dim=1) if kernel > 1 else xbc.contiguous()


def _save_history(extended: torch.Tensor, state: torch.Tensor) -> None:
    state.copy_(extended[:, -state.shape[-1]:].transpose(1, 2))


def conv_chunk_reference(xbc: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """``xbc [1, T, conv_dim]`` -> silu(causal conv) ``[1, T, conv_dim]``, continuing from
    ``state``; the state then holds the chunk's last inputs."""
    extended = _with_history(xbc, state)
    # no padding: kernel-1 + T inputs give exactly T outputs
    out = F.conv1d(extended.transpose(1, 2).to(weight.dtype), weight[:, None], bias, groups=weight.shape[0])
    _save_history(extended, state)
    return F.silu(out).transpose(1, 2).to(xbc.dtype)


def conv_chunk_fla(xbc: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """The same on fla's Triton causal conv (``[B, T, D]`` layout, no state of its own: the
    history is prepended, so only its plain causal semantics are relied on)."""
    from fla.modules.causal_conv1d import causal_conv1d

    kernel = weight.shape[-1]
    extended = _with_history(xbc, state)
    out = causal_conv1d(extended, weight=weight, bias=bias, activation="silu")
    out = out[0] if isinstance(out, tuple) else out
    _save_history(extended, state)
    return out[:, kernel - 1:]


# ---------------------------------------------------------------------------------------------
# the SSD scan
# ---------------------------------------------------------------------------------------------

def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[1, T, groups, N]`` -> ``[1, T, heads, N]`` (heads of a group are consecutive)."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def ssm_step(xs, dt, a, b, c, d, state: torch.Tensor) -> torch.Tensor:
    """One token per row: ``xs [B, 1, H, P]``, ``dt [B, 1, H]`` fp32, ``b, c [B, 1, G, N]``;
    updates ``state [B, H, P, N]`` in place, returns ``y [B, 1, H, P]`` fp32."""
    heads = xs.shape[2]
    x = xs[:, 0].float()  # [B, H, P]
    step = dt[:, 0]  # [B, H]
    bh = _per_head(b, heads)[:, 0].float()  # [B, H, N]
    ch = _per_head(c, heads)[:, 0].float()
    decay = torch.exp(step * a)[..., None, None]  # [B, H, 1, 1]
    state.copy_(state * decay + (step[..., None] * x)[..., None] * bh[:, :, None, :])
    y = (state @ ch[..., None])[..., 0] + d.float()[:, None] * x  # [B, H, P]
    return y[:, None]


def ssd_chunk_reference(xs, dt, a, b, c, d, state: torch.Tensor, chunk: int = REFERENCE_CHUNK) -> torch.Tensor:
    """The scan over ``T`` tokens in fp32, ``REFERENCE_CHUNK`` at a time; ``state`` in/out."""
    _, length, heads, _ = xs.shape
    x = xs[0].float()  # [T, H, P]
    bh = _per_head(b, heads)[0].float()  # [T, H, N]
    ch = _per_head(c, heads)[0].float()
    log_decay = dt[0] * a  # [T, H]
    k = bh * dt[0][..., None]
    s = state[0].float()  # [H, P, N]
    out = torch.empty_like(x)
    for begin in range(0, length, chunk):
        end = min(begin + chunk, length)
        cum = torch.cumsum(log_decay[begin:end], dim=0)  # [L, H]
        # intra-chunk: y_t += sum_{s<=t} exp(cum_t - cum_s) (C_t . k_s) x_s
        diff = cum[:, None, :] - cum[None, :, :]  # [L(t), L(s), H]
        causal = torch.ones(end - begin, end - begin, dtype=torch.bool, device=x.device).tril()
        weights = torch.where(causal[..., None], torch.exp(diff.masked_fill(~causal[..., None], 0)), 0.0)
        scores = torch.einsum("thn,shn->tsh", ch[begin:end], k[begin:end]) * weights
        y = torch.einsum("tsh,shp->thp", scores, x[begin:end])
        # from the state before the chunk: y_t += exp(cum_t) S C_t
        y = y + torch.einsum("hpn,thn->thp", s, ch[begin:end]) * torch.exp(cum)[..., None]
        out[begin:end] = y
        # state after the chunk
        tail = torch.exp(cum[-1][None] - cum)  # [L, H]
        s = s * torch.exp(cum[-1])[:, None, None] + torch.einsum("th,thp,thn->hpn", tail, x[begin:end], k[begin:end])
    state.copy_(s[None])
    return (out + d.float()[None, :, None] * x)[None]


def _gla_inputs(xs, dt, a, b, c):
    """simple-GLA operands in the model dtype: q = C and k = dt * B per head (broadcast over the
    heads of a group, no fp32 copies), g = dt * A (fp32 log-decay)."""
    rows, length, heads, _ = xs.shape
    groups, state = b.shape[2], b.shape[3]
    per_group = heads // groups
    q = c[:, :, :, None, :].expand(rows, length, groups, per_group, state).reshape(rows, length, heads, state)
    k = (b[:, :, :, None, :] * dt.view(rows, length, groups, per_group, 1).to(b.dtype)).reshape(
        rows, length, heads, state)
    return q, k, xs.contiguous(), dt * a


def ssd_chunk_fla(xs, dt, a, b, c, d, state: torch.Tensor) -> torch.Tensor:
    """The scan on fla's ``chunk_simple_gla`` (Triton): q = C, k = dt * B, v = x, g = dt * A;
    its state in ``[H, V, K]`` order (``state_v_first``) is our ``[H, P, N]``. Returns y in the
    model dtype."""
    from fla.ops.simple_gla import chunk_simple_gla

    q, k, v, g = _gla_inputs(xs, dt, a, b, c)
    y, final = chunk_simple_gla(q, k, v, g=g, scale=1.0, initial_state=state, output_final_state=True,
                                state_v_first=True)
    state.copy_(final)
    return torch.addcmul(y, xs, d.to(y.dtype)[:, None])


def ssd_step_fla(xs, dt, a, b, c, d, state: torch.Tensor) -> torch.Tensor:
    """One token on fla's fused recurrence (one kernel for the state update and the output).
    The operands are a few KB, so they go in fp32: the step is as exact as the reference."""
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    q, k, v, g = _gla_inputs(xs.float(), dt, a, b.float(), c.float())
    y, final = fused_recurrent_simple_gla(q, k, v, g=g, scale=1.0, initial_state=state,
                                          output_final_state=True, state_v_first=True)
    state.copy_(final)
    return torch.addcmul(y.float(), v, d.float()[:, None])


# ---------------------------------------------------------------------------------------------
# gated RMSNorm (Nemotron-H: gate applied before the norm, one norm per group)
# ---------------------------------------------------------------------------------------------

def gated_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float,
                   fast: bool = False) -> torch.Tensor:
    if fast:
        from fla.modules.norm.layernorm_gated import rmsnorm_fn

        shape = y.shape
        out = rmsnorm_fn(y.reshape(-1, shape[-1]).contiguous().to(gate.dtype), weight, None,
                         z=gate.reshape(-1, shape[-1]).contiguous(), eps=eps, group_size=group_size,
                         norm_before_gate=False)
        return out.reshape(shape)
    h = y.float() * F.silu(gate.float())
    shape = h.shape
    h = h.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.reshape(shape).to(weight.dtype)


def fla_available() -> bool:
    """fla-core importable (the fast Mamba-2 chunk path needs it and a CUDA device)."""
    try:
        import fla.ops.simple_gla  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or broken against this torch/triton
        return False
    return True
