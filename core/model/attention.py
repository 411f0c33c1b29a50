"""Superlinear (and dense) attention plugged into transformers' attention interface.

transformers' Llama and Nemotron-H attention modules project q/k/v, write k/v into our cache
(``Cache.update`` returns the whole preallocated ``[B, HKV, max_len, D]`` tensors) and then
call the function registered under ``config._attn_implementation``. We register one function,
``"spl"``; which attention it computes (superlinear or dense, with which span parameters) and
where the current chunk sits in the sequence come from a ``ForwardContext`` that the model
sets before each forward and that every attention module of the model shares. Positions are
tensors on the device, so a decode step can be captured as a CUDA graph and replayed at new
positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "spl"
# Dense prefill builds a boolean mask of [queries, keys]; query blocks keep it under this size.
_DENSE_MASK_ELEMENTS = 1 << 27


@dataclass
class ForwardContext:
    """What the attention functions need to know about the current forward pass."""

    mode: str = "superlinear"  # "superlinear" | "dense"
    params: Any = None  # superlinear.kernels.SpanParams
    backend: str | None = None  # kernels backend (None: auto)
    start: int = 0  # first position of this chunk (eager passes)
    length: int = 0  # tokens in this chunk
    positions: torch.Tensor | None = None  # [LQ] int64 on the device
    graph: bool = False  # inside a CUDA graph: no host-side position arithmetic
    # this process's slice of a context-parallel sequence (superlinear.distributed.ContextParallel):
    # the cache holds only its keys and the partition attends over every rank's; None: all here
    partition: Any = None
    # a batched decode step (superlinear.model.batch.BatchCache): B sequences, one token each,
    # each attending to its own cache; None: one sequence
    batch: Any = None
    extra: dict = field(default_factory=dict)


def spl_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """The attention function transformers calls: returns ``(out [B, LQ, HQ, D], None)``."""
    ctx: ForwardContext = module._spl_ctx
    routing_query = kwargs.get("routing_query")
    q1 = query if routing_query is None else routing_query
    if ctx.batch is not None:
        out = ctx.batch.attend(module.layer_idx, q1, query, ctx, scaling)
    elif ctx.partition is not None:
        out = ctx.partition.attend(q1, query, key, value, ctx.positions, ctx.params, ctx.mode, ctx.backend)
    else:
        out = attend(q1, query, key, value, ctx, scaling)
    return out.transpose(1, 2).contiguous(), None


def attend(q1, query, key, value, ctx: ForwardContext, scaling) -> torch.Tensor:
    """One sequence's attention ``[1, HQ, LQ, D]`` over its cache ``key``/``value`` (whole
    preallocated tensors: ``ctx`` says which keys are filled)."""
    if ctx.mode == "dense" or (not ctx.graph and ctx.start + ctx.length <= _window(ctx.params)):
        # Inside the window superlinear attention is causal attention (every query's whole
        # context is its window): dense SDPA computes the same function, faster.
        return _dense(query, key, value, ctx, scaling)
    from superlinear.kernels import superlinear_decode, superlinear_prefill

    if query.shape[2] == 1:
        return superlinear_decode(q1, query, key, value, ctx.positions, ctx.params, backend=ctx.backend)
    end = ctx.start + ctx.length
    return superlinear_prefill(q1, query, key[:, :, :end], value[:, :, :end], ctx.positions,
                               ctx.params, backend=ctx.backend)


@lru_cache(maxsize=32)
def _window(params) -> int:
    """W of superlinear attention with these span parameters (0: no window)."""
    return params.window_len


def _dense(query, key, value, ctx: ForwardContext, scaling):
    # GQA through SDPA's enable_gqa: no repeated copy of the (possibly huge) static cache
    gqa = query.shape[1] != key.shape[1]
    lq = query.shape[2]
    if ctx.graph:
        # Whole static cache, keys past the position masked out (garbage there is never read).
        key_pos = torch.arange(key.shape[2], device=key.device)
        mask = key_pos[None, :] <= ctx.positions[:, None]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[None], scale=scaling,
                                              enable_gqa=gqa)
    end = ctx.start + ctx.length
    key, value = key[:, :, :end], value[:, :, :end]
    if ctx.start == 0:
        return F.scaled_dot_product_attention(query, key, value, is_causal=lq > 1, scale=scaling,
                                              enable_gqa=gqa)
    if lq == 1:
        return F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
    key_pos = torch.arange(end, device=key.device)
    block = max(1, _DENSE_MASK_ELEMENTS // end)
    outs = []
    for b in range(0, lq, block):
        qpos = ctx.positions[b:b + block]
        mask = key_pos[None, :] <= qpos[:, None]
        outs.append(F.scaled_dot_product_attention(query[:, :, b:b + block], key, value,
                                                   attn_mask=mask[None, None], scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


_registered = False


def register() -> None:
    """Register ``"spl"`` with transformers (once). No mask function is registered on purpose:
    transformers then skips building a [LQ, LKV] mask, which our functions do not need."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, spl_attention)
    _registered = True


def attach(hf_model: torch.nn.Module, ctx: ForwardContext) -> int:
    """Point every attention module of ``hf_model`` at ``ctx``; returns how many there are."""
    count = 0
    for module in hf_model.modules():
        if hasattr(module, "k_proj") and hasattr(module, "o_proj") and hasattr(module, "layer_idx"):
            module._spl_ctx = ctx
            count += 1
    return count
