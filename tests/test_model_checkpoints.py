"""Tiny random checkpoints written to disk: a llama-family dir, nemotron_h (Mamba-2 / attention /
MoE hybrid) and the superlinear-exp layout (routing-query projection) load, run and generate
through our loaders; name mismatches and unreachable hub ids fail with one clear message."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from superlinear.errors import InvalidRequest, NotFound, Unavailable
from superlinear.model import load_model

VOCAB = 49152  # the default model's tokenizer is copied next to each tiny checkpoint
HYBRID_LAYERS = ["linear_attention", "full_attention", "moe", "linear_attention", "full_attention", "mlp"]
SPAN = {"span_attention_sw_index": 2, "span_attention_num_spans": 2, "span_attention_backward_factor": 2.0,
        "span_attention_forward_factor": 1.0, "span_attention_span_power": 0.5,
        "span_attention_inv_search_power": 2}  # W = 8: a 40-token prompt reaches far past the window


@pytest.fixture(scope="module")
def tokenizer_files():
    from superlinear.model.default import ensure_default

    src = ensure_default()
    return [f for f in src.iterdir()
            if f.name.startswith(("tokenizer", "special_tokens")) or f.name.endswith(".jinja")]


def copy_tokenizer(files, target):
    for f in files:
        shutil.copy(f, target / f.name)


def nemotron_config(**extra):
    from transformers import NemotronHConfig

    return NemotronHConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, layers_block_type=HYBRID_LAYERS, mamba_num_heads=4, mamba_head_dim=16,
                           n_groups=1, ssm_state_size=16, conv_kernel=4, chunk_size=16, intermediate_size=128,
                           n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1,
                           tie_word_embeddings=False, **extra)


@pytest.fixture(scope="module")
def nemotron_dir(tmp_path_factory, tokenizer_files):
    from transformers import NemotronHForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("nemotron_h")
    hf = NemotronHForCausalLM(nemotron_config()).eval()
    hf.save_pretrained(path)
    copy_tokenizer(tokenizer_files, path)
    return path, hf


def write_superlinear_exp(path, tokenizer_files, *, seed=0, original_names=False):
    """A superlinear-exp checkpoint: Nemotron-H weights + a routing projection per attention layer."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    cfg = nemotron_config()
    hf = NemotronHForCausalLM(cfg)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for i, kind in enumerate(HYBRID_LAYERS):
        if kind == "full_attention":
            state[f"model.layers.{i}.mixer.routing_q_proj.weight"] = torch.randn(64, 64) * 0.2
    if original_names:  # NVIDIA's layout: backbone. prefix, one tensor per expert, q1_proj alias
        renamed = {}
        for name, t in state.items():
            name = name.replace("model.", "backbone.", 1).replace("routing_q_proj", "q1_proj")
            if name.endswith(("experts.up_proj", "experts.down_proj")):
                for j in range(t.shape[0]):
                    head, proj = name.rsplit(".", 1)
                    renamed[f"{head}.{j}.{proj}.weight"] = t[j].clone()
                continue
            renamed[name] = t
        state = renamed
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    config = json.loads(cfg.to_json_string())
    config.update(SPAN, model_type="superlinear-exp", architectures=["SuperlinearExpForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    copy_tokenizer(tokenizer_files, path)
    return path


def generate(model, ids, n):
    cache = model.new_cache(len(ids) + n + 1)
    logits = model.prefill(cache, ids)
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model.decode_step(cache, out[-1])
    return out


def test_tiny_llama_dir_retrofit(tmp_path, tokenizer_files):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    copy_tokenizer(tokenizer_files, tmp_path)
    model = load_model(str(tmp_path))
    assert model.info()["kind"].startswith("llama")
    ids = list(range(300, 340))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    # the retrofit window (2024) covers the prompt: exactly the original model
    torch.testing.assert_close(model.prefill(model.new_cache(64), ids), ref, atol=1e-4, rtol=1e-4)
    assert len(generate(model, ids, 4)) == 4


def test_tiny_qwen3_dir_is_an_attention_only_retrofit(tmp_path):
    """Qwen3's config has ``layer_types`` (full / sliding attention): not a hybrid's layer list."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    hf = Qwen3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert not model.has_recurrent_state and model.layer_types() == ["full_attention"] * 2
    ids = list(range(300, 340))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(model.prefill(model.new_cache(64), ids), ref, atol=1e-4, rtol=1e-4)


def test_nemotron_h_hybrid_runs_and_matches_transformers(nemotron_dir):
    path, hf = nemotron_dir
    model = load_model(str(path))
    info = model.info()
    assert model.has_recurrent_state
    assert info["layer_types"] == {"linear_attention": 2, "full_attention": 2, "moe": 1, "mlp": 1}
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    ids = list(range(100, 150))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    full = model.prefill(model.new_cache(64), ids)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    chunked = model.prefill(model.new_cache(64), ids, chunk_size=7)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)
    cache = model.new_cache(64)
    model.prefill(cache, ids[:-1])
    torch.testing.assert_close(model.decode_step(cache, ids[-1]), full, atol=1e-4, rtol=1e-4)
    assert len(generate(model, ids, 5)) == 5


def test_nemotron_h_cache_state_roundtrip(nemotron_dir):
    model = load_model(str(nemotron_dir[0]))
    ids = list(range(200, 230))
    cache = model.new_cache(64)
    model.prefill(cache, ids[:20])
    saved = cache.recurrent_state()
    assert set(saved) == {"layers.0.conv", "layers.0.ssm", "layers.3.conv", "layers.3.ssm"}
    snapshot = cache.state_tensors()
    after = model.prefill(cache, ids[20:])
    with pytest.raises(InvalidRequest, match="recurrent"):
        cache.truncate(20)
    cache.truncate(20, recurrent_state=saved)
    torch.testing.assert_close(model.prefill(cache, ids[20:]), after)
    restored = model.cache_from_state(snapshot, 20, 64)
    torch.testing.assert_close(model.prefill(restored, ids[20:]), after)
    clone = cache.clone()
    torch.testing.assert_close(model.decode_step(clone, 7), model.decode_step(cache, 7))


def test_superlinear_exp_loads_and_uses_its_routing_projection(tmp_path, tokenizer_files):
    path = write_superlinear_exp(tmp_path / "sx", tokenizer_files)
    model = load_model(str(path))
    info = model.info()
    assert info["kind"] == "superlinear-exp"
    assert info["attention"]["window"] == 8 and "routing_q_proj" in info["attention"]["routing_query"]
    ids = list(range(500, 540))
    full = model.prefill(model.new_cache(64), ids)
    chunked = model.prefill(model.new_cache(64), ids, chunk_size=9)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)
    cache = model.new_cache(64)
    model.prefill(cache, ids[:-1])
    torch.testing.assert_close(model.decode_step(cache, ids[-1]), full, atol=1e-4, rtol=1e-4)
    assert len(generate(model, ids, 5)) == 5
    # the routing query picks the spans: other routing weights, other output past the window
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.1.mixer.routing_q_proj.weight"] = -state["model.layers.1.mixer.routing_q_proj.weight"]
    state["model.layers.4.mixer.routing_q_proj.weight"] = torch.randn(64, 64)
    save_file(state, str(path / "model.safetensors"))
    other = load_model(str(path))
    assert other.fingerprint != model.fingerprint
    assert (other.prefill(other.new_cache(64), ids) - full).abs().max() > 1e-5


def test_superlinear_exp_original_names_load(tmp_path, tokenizer_files):
    a = load_model(str(write_superlinear_exp(tmp_path / "ours", tokenizer_files, seed=1)))
    b = load_model(str(write_superlinear_exp(tmp_path / "nvidia", tokenizer_files, seed=1,
                                             original_names=True)))
    ids = list(range(10, 40))
    torch.testing.assert_close(a.prefill(a.new_cache(32), ids), b.prefill(b.new_cache(32), ids))


def test_weight_name_mismatch_is_one_clear_error(tmp_path, tokenizer_files):
    path = write_superlinear_exp(tmp_path / "bad", tokenizer_files)
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.4.mixer.routing_q_proj.weight"]
    state["model.layers.4.mixer.surprise.weight"] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(InvalidRequest) as err:
        load_model(str(path))
    message = str(err.value)
    assert "missing 1: model.layers.4.mixer.routing_q_proj.weight" in message
    assert "unexpected 1: model.layers.4.mixer.surprise.weight" in message
    assert "\n" not in message


def test_unknown_and_unreachable_models(monkeypatch, tmp_path):
    with pytest.raises(NotFound, match="unknown model"):
        load_model("no-such-model-here")
    with pytest.raises(NotFound, match="has no config.json"):
        load_model(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(Unavailable, match="cannot fetch model 'nobody/nothing'"):
        load_model("nobody/nothing")
    assert time.monotonic() - start < 10


def test_models_cli_list_and_info(nemotron_dir, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from superlinear.cli.main import build_cli

    cli = build_cli()
    result = CliRunner().invoke(cli, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    names = [m["name"] for m in json.loads(result.output)["models"]]
    assert names[0] == "default"
    result = CliRunner().invoke(cli, ["models", "info", str(nemotron_dir[0])])
    assert result.exit_code == 0, result.output
    assert "kv bytes/token" in result.output and "window 2024 tokens" in result.output
    assert "linear_attention x2" in result.output
