"""The superlinear-exp layout, built by our code on transformers' Nemotron-H (never remote code).

config.json: ``model_type: "superlinear-exp"``, the Nemotron-H keys (``layers_block_type`` or
``hybrid_override_pattern``, ``mamba_*``, ``n_routed_experts``...) and the ``span_attention_*``
keys (sw_index, num_spans, backward_factor, forward_factor, span_power, and search_power or
inv_search_power). Each attention layer has, besides Nemotron-H's q/k/v/o projections, a
routing-query projection ``model.layers.{i}.mixer.routing_q_proj.weight`` (the search query q1
of docs/attention-spec.md); ``q_proj`` is the attention query q2. docs/models.md lists every name.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from . import layer_types

# Names the routing projection may carry in a checkpoint; the first is ours.
ROUTING_NAMES = ("routing_q_proj", "q1_proj", "search_q_proj")


def nemotron_config(config: dict):
    """A ``NemotronHConfig`` from a superlinear-exp (or nemotron_h) config dict."""
    from transformers import NemotronHConfig

    body = {k: v for k, v in config.items()
            if not k.startswith("span_attention_")
            and k not in ("model_type", "architectures", "auto_map", "hybrid_override_pattern", "layers_block_type",
                          "layer_types")}
    types = layer_types.from_config(config)
    if types:  # the pattern string: read the same way by every transformers release
        body["hybrid_override_pattern"] = layer_types.to_pattern(types)
        body["num_hidden_layers"] = len(types)
    return NemotronHConfig.from_dict(body)


def routing_attention_class():
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHAttention

    class SuperlinearExpAttention(NemotronHAttention):
        """Nemotron-H attention with a separate routing-query projection (q1)."""

        def __init__(self, config, layer_idx: int):
            super().__init__(config, layer_idx)
            self.routing_q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim,
                                            bias=False)

        def forward(self, hidden_states: torch.Tensor, attention_mask=None, cache=None, **kwargs):
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            kwargs.pop("past_key_values", None)
            input_shape = hidden_states.shape[:-1]
            hidden_shape = (*input_shape, -1, self.head_dim)
            query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            routing = self.routing_q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
            out, weights = attention(self, query, key, value, attention_mask, dropout=0.0,
                                     scaling=self.scaling, routing_query=routing, **kwargs)
            out = out.reshape(*input_shape, -1).contiguous()
            return self.o_proj(out), weights

    return SuperlinearExpAttention


def build(config_dict: dict):
    """An empty (meta-weight) Nemotron-H causal LM whose attention mixers have a routing projection."""
    from transformers import NemotronHForCausalLM

    config = nemotron_config(config_dict)
    config._attn_implementation = "spl"
    attention_cls = routing_attention_class()
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
        for idx, kind in enumerate(layer_types.from_config(config)):
            if kind == layer_types.ATTENTION:
                model.model.layers[idx].mixer = attention_cls(config, idx)
    return model


# Multi-token-prediction heads some Nemotron-H checkpoints carry: inference does not run them
# (transformers ignores them too).
IGNORED_PREFIXES = ("mtp.", "model.mtp.", "backbone.mtp.")
_EXPERT_SLICE = re.compile(r"(model\.layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight")


def checkpoint_target(name: str) -> tuple[str, int | None] | None:
    """Our parameter for a Nemotron-H / superlinear-exp checkpoint tensor, with the expert's index
    when the tensor is one expert's slice of a fused experts parameter; None for a tensor
    inference ignores. Our own names map to themselves; NVIDIA's layout (``backbone.`` prefix,
    ``…experts.{j}.up_proj.weight``) and the routing projection's other names are accepted."""
    if name.startswith(IGNORED_PREFIXES):
        return None
    if name.startswith("backbone."):
        name = "model." + name[len("backbone."):]
    for alias in ROUTING_NAMES[1:]:
        name = name.replace(f".mixer.{alias}.", f".mixer.{ROUTING_NAMES[0]}.")
    expert = _EXPERT_SLICE.fullmatch(name)
    if expert:
        return f"{expert[1]}.{expert[3]}", int(expert[2])
    return name, None
