"""Model paths on CUDA: the captured decode graph equals eager decode (attention-only and a
Mamba hybrid, whose recurrent state the capture must not advance), superlinear equals dense
inside the window, chunked prefill equals one prefill. Random-weight checkpoints of the
default model's shapes, so no download is needed on the GPU machine."""

from __future__ import annotations

import json

import pytest
import torch

# Deselected by `make test` (-m "not gpu"); skipped with a reason if run on a CPU machine anyway.
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL_WINDOW = {"span_attention_sw_index": 7, "span_attention_num_spans": 3,
                "span_attention_backward_factor": 3.0, "span_attention_forward_factor": 1.0,
                "span_attention_span_power": 0.5, "span_attention_inv_search_power": 2}  # W = 63


def write_llama(path, layers=4, span=None):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                      rope_theta=100000.0, max_position_embeddings=8192)
    hf = LlamaForCausalLM(cfg)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    config = json.loads(cfg.to_json_string())
    config.update(span or {})
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_hybrid(path):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    cfg = NemotronHConfig(vocab_size=2048, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, layers_block_type=["linear_attention", "full_attention", "mlp"] * 2,
                          mamba_num_heads=8, mamba_head_dim=32, n_groups=1, ssm_state_size=32, conv_kernel=4,
                          chunk_size=64, intermediate_size=512, tie_word_embeddings=False)
    NemotronHForCausalLM(cfg).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(SMALL_WINDOW)
    (path / "config.json").write_text(json.dumps(config))
    return path


def decode_both(model, ids, steps):
    """Logits of ``steps`` decode steps, with and without the CUDA graph, from the same cache."""
    results = []
    for graph in (True, False):
        variant = model.with_attention(cuda_graph=graph)
        cache = variant.new_cache(len(ids) + steps + 1)
        variant.prefill(cache, ids)
        token, out = ids[-1], []
        for _ in range(steps):
            logits = variant.decode_step(cache, token)
            out.append(logits)
            token = int(logits.argmax())
        results.append(torch.stack(out))
    return results


@pytest.mark.parametrize("attention", ["superlinear", "dense"])
def test_graph_decode_equals_eager(tmp_path, attention):
    from superlinear.model import load_model

    model = load_model(str(write_llama(tmp_path / "m", span=SMALL_WINDOW)), device="cuda",
                       dtype=torch.float32 if attention == "dense" else torch.bfloat16, attention=attention)
    assert model.cuda_graph
    ids = list(range(10, 200))  # well past the 63-token window: spans are searched
    graph, eager = decode_both(model, ids, 12)
    assert model.info()["cuda_graph_error"] is None
    torch.testing.assert_close(graph, eager, atol=2e-2, rtol=2e-2)


def test_superlinear_equals_dense_inside_window_and_chunking(tmp_path):
    from superlinear.model import load_model

    model = load_model(str(write_llama(tmp_path / "m")), device="cuda", dtype=torch.float32)
    dense = model.with_attention("dense")
    ids = list(range(5, 905))
    a = model.prefill(model.new_cache(1024), ids)
    b = dense.prefill(dense.new_cache(1024), ids)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    c = model.prefill(model.new_cache(1024), ids, chunk_size=128)
    torch.testing.assert_close(c, a, atol=2e-3, rtol=2e-3)


def test_hybrid_graph_decode_keeps_recurrent_state(tmp_path):
    from superlinear.model import load_model

    model = load_model(str(write_hybrid(tmp_path / "h")), device="cuda", dtype=torch.float32)
    assert model.cuda_graph and model.has_recurrent_state
    graph, eager = decode_both(model, list(range(3, 150)), 8)
    assert model.info()["cuda_graph_error"] is None
    torch.testing.assert_close(graph, eager, atol=1e-3, rtol=1e-3)
