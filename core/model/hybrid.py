"""Our forward pass for Nemotron-H-family hybrids (nemotron_h, superlinear-exp).

transformers builds the modules and holds the weights; this walks the blocks itself so that
every mixer runs the way long contexts need:

- Mamba-2 mixers on fla's Triton kernels in prefill (CUDA); in decode the fused step prologue
  (``superlinear.kernels.mamba2_step``) and fla's recurrence on CUDA, plain tensor ops elsewhere
  (``superlinear.model.mamba2``);
- MoE mixers without host synchronisation (``superlinear.model.moe``: grouped matmuls in
  prefill, the fused MoE decode kernels in a decode step on CUDA), so the whole decode step is
  one CUDA graph;
- attention mixers (no positional embedding in Nemotron-H) writing into our cache and calling
  the superlinear kernels through ``superlinear.model.attention.spl_attention``;
- the LM head on the last token only (a 32K-token chunk of 131K-vocab logits would be 8 GiB).

``Model`` uses it for these architectures; ``fast_paths=False`` goes back to transformers'
own forward (the reference the tests compare against).
"""

from __future__ import annotations

import importlib.util

import torch

from superlinear.model import layer_types
from superlinear.model.attention import spl_attention
from superlinear.model.mamba2 import MambaDims, fla_available, mixer_forward, mixer_step_fused
from superlinear.model.moe import experts_path, fused_decode_unsupported, moe_forward


def fused_mamba_step_runs(device: torch.device, dims: MambaDims | None) -> bool:
    """Whether a decode step's Mamba-2 mixers run the fused prologue kernel
    (``superlinear.kernels.mamba2_step``): on CUDA with Triton, for a model with Mamba layers."""
    return dims is not None and device.type == "cuda" and importlib.util.find_spec("triton") is not None


class HybridForward:
    def __init__(self, hf: torch.nn.Module):
        self.hf = hf
        cfg = hf.config
        self.blocks = list(hf.model.layers)
        self.types = layer_types.from_config(cfg)
        self.dims = MambaDims.from_config(cfg) if layer_types.MAMBA in self.types else None
        param = next(hf.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.fla = self.device.type == "cuda" and fla_available()
        self.has_moe = layer_types.MOE in self.types
        moes = [b.mixer for b, kind in zip(self.blocks, self.types, strict=True) if kind == layer_types.MOE]
        # why the fused MoE decode cannot run this model (None: it can)
        self.fused_moe_blocker = next(filter(None, (fused_decode_unsupported(m, cfg) for m in moes)), None)
        self.experts = experts_path(self.device, self.dtype, self.fused_moe_blocker)
        self.fused_mamba = fused_mamba_step_runs(self.device, self.dims)
        self.eps = float(cfg.layer_norm_epsilon)

    def info(self) -> dict:
        fused = [name for on, name in ((self.has_moe and self.experts.fused_for(1), "MoE"),
                                       (self.fused_mamba, "Mamba-2 step prologue")) if on]
        decode_ops = f"fused Triton: {', '.join(fused)}" if fused else "default"
        if self.has_moe and self.experts.blocked:
            decode_ops += f" (no fused MoE decode: {self.experts.blocked})"
        return {"mamba_prefill": "fla (Triton)" if self.fla else "PyTorch reference",
                "moe": self.experts.describe(),
                "decode_ops": decode_ops}

    def slow_reasons(self) -> list[str]:
        """The slow fallbacks this forward takes on its device (empty: all fast paths)."""
        reasons = [self.experts.reason] if self.has_moe and not self.experts.fast else []
        if self.device.type == "cuda" and not self.fla and self.dims is not None:
            reasons.append("fla (flash-linear-attention) is not installed: Mamba-2 prefill runs the PyTorch "
                           "reference scan")
        return reasons

    def __call__(self, ids: torch.Tensor, cache, keep: int = 1) -> torch.Tensor:
        """``ids [1, T]`` at the cache's current write position -> fp32 logits ``[1, keep, V]``
        of the last ``keep`` tokens (0: all). A batched step: ``ids [B, 1]`` over a
        ``superlinear.model.batch.BatchCache`` (each row its own sequence)."""
        residual = self.hf.model.embeddings(ids)
        h = None  # the last mixer's output, not yet added to the residual stream
        fused_mamba = self.fused_mamba and tuple(ids.shape) == (1, 1)  # one sequence's step (not a batch)
        for idx, (block, kind) in enumerate(zip(self.blocks, self.types, strict=True)):
            normed, residual = self._add_and_norm(h, residual, block.norm)
            if kind == layer_types.MAMBA:
                step = mixer_step_fused if fused_mamba else mixer_forward
                h = step(block.mixer, self.dims, normed, cache.conv[idx], cache.ssm[idx], fast=self.fla)
            elif kind == layer_types.ATTENTION:
                h = _attention(block.mixer, normed, cache)
            elif kind == layer_types.MOE:
                h = moe_forward(block.mixer, self.hf.config, normed, self.experts)
            else:
                h = block.mixer(normed)
        last, _ = self._add_and_norm(h[:, -keep:], residual[:, -keep:], self.hf.model.norm_f)
        return self.hf.lm_head(last).float()

    def _add_and_norm(self, h, residual, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + h`` (h None: nothing to add yet) and its RMSNorm; on CUDA one fla kernel
        for both (a decode step has 53 of them, a prefill chunk reads the stream once, not 7x)."""
        if self.fla:
            from fla.modules.norm.layernorm import rms_norm

            if h is None:
                return rms_norm(residual, norm.weight, None, eps=self.eps), residual
            return rms_norm(h, norm.weight, None, residual=residual, eps=self.eps, prenorm=True)
        if h is not None:
            residual = residual + h
        return norm(residual.to(norm.weight.dtype)), residual


def _attention(attn, h: torch.Tensor, cache) -> torch.Tensor:
    """Nemotron-H attention (no RoPE) with superlinear attention over our cache; a
    superlinear-exp mixer's ``routing_q_proj`` gives the search query."""
    shape = (*h.shape[:-1], -1, attn.head_dim)
    query = attn.q_proj(h).view(shape).transpose(1, 2)
    key = attn.k_proj(h).view(shape).transpose(1, 2)
    value = attn.v_proj(h).view(shape).transpose(1, 2)
    routing = getattr(attn, "routing_q_proj", None)
    extra = {} if routing is None else {"routing_query": routing(h).view(shape).transpose(1, 2)}
    key, value = cache.update(key, value, attn.layer_idx)
    out, _ = spl_attention(attn, query, key, value, scaling=attn.scaling, **extra)
    return attn.o_proj(out.reshape(*h.shape[:-1], -1))
