"""Tiny random checkpoints (llama, Nemotron-H hybrid) for session tests, loadable by load_model.

Random weights: the text is noise, but greedy decoding is deterministic, which is all the
session tests need (same state in => same tokens out).
"""

from __future__ import annotations

from pathlib import Path


def _save(hf, cfg, path: Path, tokenizer) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tied = getattr(cfg, "tie_word_embeddings", False)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(path / "model.safetensors"))
    cfg.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_hybrid(path, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    cfg = NemotronHConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
        layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, conv_kernel=4, expand=1,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _save(NemotronHForCausalLM(cfg), cfg, Path(path), tokenizer)


def write_tiny_llama(path, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _save(LlamaForCausalLM(cfg), cfg, Path(path), tokenizer)


def write_tiny_llama_with_default_tokenizer(path) -> Path:
    """A tiny random llama with the default model's tokenizer and chat template: a real model a
    server loads in a second and runs a turn on in milliseconds (bad-input sweeps, crash tests)."""
    from superlinear.model.default import ensure_default
    from superlinear.model.loaders import load_tokenizer

    return write_tiny_llama(path, load_tokenizer(ensure_default()))


def greedy_turn(manager, session_id: str, text: str, max_tokens: int):
    """One greedy chat turn of ``text`` on a managed session; its ``Done`` event."""
    from superlinear.engine import ChatRequest, Done, SamplingParams, run_turn

    with manager.use(session_id) as session:
        conv = session.conversation
        request = ChatRequest(messages=conv.transcript + [{"role": "user", "content": text}],
                              sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens))
        return [ev for ev in run_turn(conv, request) if isinstance(ev, Done)][-1]
