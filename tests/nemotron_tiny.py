"""A tiny Nemotron-H checkpoint on disk (Mamba-2, MoE with 4 experts, attention) written by
transformers' own ``save_pretrained``: for CLI tests that load a model directory."""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_nemotron(path: Path) -> Path:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    config = NemotronHConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, layers_block_type=["linear_attention", "moe", "full_attention"],
                             mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16, conv_kernel=4,
                             chunk_size=32, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1)
    NemotronHForCausalLM(config).save_pretrained(path)
    return path
