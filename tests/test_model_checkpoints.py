"""Tiny random checkpoints written to disk: a llama-family dir, nemotron_h (Mamba-2 / attention /
MoE hybrid) and the superlinear-exp layout (routing-query projection) load, run and generate
through our loaders; name mismatches and unreachable hub ids fail with one clear message."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from checkpoint_writer import nvidia_names, write_shards
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


def write_superlinear_exp(path, tokenizer_files, *, seed=0, original_names=False, max_shard_bytes=None,
                          extra=(), drop=()):
    """A superlinear-exp checkpoint: Nemotron-H weights + a routing projection per attention layer;
    ``original_names``: NVIDIA's layout (``backbone.`` prefix, one tensor per expert, ``q1_proj``);
    ``max_shard_bytes``: several shards and an index; ``extra`` tensors added, ``drop`` names left out."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    cfg = nemotron_config()
    hf = NemotronHForCausalLM(cfg)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for i, kind in enumerate(HYBRID_LAYERS):
        if kind == "full_attention":
            state[f"model.layers.{i}.mixer.routing_q_proj.weight"] = torch.randn(64, 64) * 0.2
    if original_names:
        state = {name.replace("routing_q_proj", "q1_proj"): t for name, t in nvidia_names(state.items())}
    state.update(extra)
    for name in drop:
        del state[name]
    path.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes:
        write_shards(path, state.items(), max_shard_bytes)
    else:
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


def check_chunks_and_decode_agree(model, ids, chunk_size):
    """One prefill, a chunked one and a prefill + decode of the last token give the same logits
    (returned), and the model generates."""
    full = model.prefill(model.new_cache(64), ids)
    chunked = model.prefill(model.new_cache(64), ids, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)
    cache = model.new_cache(64)
    model.prefill(cache, ids[:-1])
    torch.testing.assert_close(model.decode_step(cache, ids[-1]), full, atol=1e-4, rtol=1e-4)
    assert len(generate(model, ids, 5)) == 5
    return full


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
    full = check_chunks_and_decode_agree(model, ids, chunk_size=7)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)


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
    full = check_chunks_and_decode_agree(model, ids, chunk_size=9)
    # the routing query picks the spans: other routing weights, other output past the window
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.1.mixer.routing_q_proj.weight"] = -state["model.layers.1.mixer.routing_q_proj.weight"]
    state["model.layers.4.mixer.routing_q_proj.weight"] = torch.randn(64, 64)
    save_file(state, str(path / "model.safetensors"))
    other = load_model(str(path))
    assert other.fingerprint != model.fingerprint
    assert (other.prefill(other.new_cache(64), ids) - full).abs().max() > 1e-5


def test_superlinear_exp_original_names_load(tmp_path, tokenizer_files, caplog):
    """NVIDIA's layout in shards with an index loads to the same model as our own layout; the
    multi-token-prediction heads are ignored, and said so; a file the index does not name is not read."""
    mtp = {"mtp.layers.0.eh_proj.weight": torch.randn(64, 128), "mtp.layers.0.norm.weight": torch.ones(64)}
    a = load_model(str(write_superlinear_exp(tmp_path / "ours", tokenizer_files, seed=1)))
    nvidia = write_superlinear_exp(tmp_path / "nvidia", tokenizer_files, seed=1, original_names=True,
                                   max_shard_bytes=400_000, extra=mtp)
    assert len(list(nvidia.glob("model-*.safetensors"))) >= 4
    save_file({"not.in.the.index": torch.zeros(3)}, str(nvidia / "consolidated.safetensors"))
    with caplog.at_level("WARNING", logger="spl.model"):
        b = load_model(str(nvidia))
    assert "ignored 2 checkpoint tensors" in caplog.text and "mtp.layers.0.eh_proj.weight" in caplog.text
    ids = list(range(10, 40))
    torch.testing.assert_close(a.prefill(a.new_cache(32), ids), b.prefill(b.new_cache(32), ids))
    for name, param in a.hf.state_dict().items():
        torch.testing.assert_close(b.hf.state_dict()[name], param, msg=name)


def load_error(path) -> str:
    with pytest.raises(InvalidRequest) as err:
        load_model(str(path))
    return str(err.value)


def test_weight_name_mismatch_is_one_clear_error(tmp_path, tokenizer_files):
    path = write_superlinear_exp(tmp_path / "bad", tokenizer_files,
                                 drop=["model.layers.4.mixer.routing_q_proj.weight"],
                                 extra={"model.layers.4.mixer.surprise.weight": torch.zeros(2),
                                        "backbone.layers.2.mixer.gate.weight": torch.zeros(4, 64),
                                        "model.layers.5.mixer.up_proj.weight": torch.zeros(3, 64)})
    message = load_error(path)
    assert "layer 4 (attention): missing mixer.routing_q_proj.weight; unexpected mixer.surprise.weight" in message
    assert "layer 2 (moe): duplicate mixer.gate.weight" in message
    assert "layer 5 (mlp): wrong shape mixer.up_proj.weight (3, 64) != (128, 64)" in message
    assert "docs/models.md" in message and "\n" not in message


def test_missing_routing_projection_never_falls_back_to_the_query(tmp_path, tokenizer_files):
    """A Nemotron-H checkpoint (no routing projection) under a superlinear-exp config: every
    attention layer is named, nothing loads with q2 standing in for q1."""
    drop = [f"backbone.layers.{i}.mixer.q1_proj.weight" for i in (1, 4)] + [
        "backbone.layers.2.mixer.experts.3.up_proj.weight"]
    path = write_superlinear_exp(tmp_path / "no-routing", tokenizer_files, original_names=True,
                                 max_shard_bytes=400_000, drop=drop)
    message = load_error(path)
    assert "layer 1 (attention): missing mixer.routing_q_proj.weight" in message
    assert "layer 4 (attention): missing mixer.routing_q_proj.weight" in message
    assert "layer 2 (moe): missing mixer.experts.up_proj[3]" in message


def test_model_card_span_keys_are_read_as_given():
    from superlinear.kernels import SpanParams

    card = {"span_attention_sw_index": 65, "span_attention_num_spans": 3, "span_attention_backward_factor": 3.0,
            "span_attention_forward_factor": 1.0, "span_attention_search_power": 0.55,
            "span_attention_span_power": 0.55}
    params = SpanParams.from_config(card)
    assert (params.sw_index, params.num_spans, params.backward_factor, params.forward_factor, params.search_power,
            params.span_power, params.inv_search_power) == (65, 3, 3.0, 1.0, 0.55, 0.55, None)
    assert params.window_len == int(66 ** (1 / 0.55)) - 1


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


def run_check(*args):
    from click.testing import CliRunner

    from superlinear.cli.main import build_cli

    return CliRunner().invoke(build_cli(), ["models", "check", *args])


def test_models_check_explains_every_tensor(tmp_path, tokenizer_files):
    mtp = {"mtp.layers.0.norm.weight": torch.ones(64)}
    path = write_superlinear_exp(tmp_path / "nvidia", tokenizer_files, original_names=True, max_shard_bytes=400_000,
                                 extra=mtp)
    result = run_check(str(path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["kind"] == "superlinear-exp" and report["error"] is None
    assert report["layer_types"] == {"mamba": 2, "attention": 2, "moe": 1, "mlp": 1}
    assert report["checkpoint"]["dtypes"] == {"F32": report["checkpoint"]["tensors"]}
    assert len(report["checkpoint"]["files"]) >= 4
    rows = {t["name"]: t for t in report["tensors"]}
    assert rows["backbone.layers.2.mixer.experts.3.down_proj.weight"]["target"] == \
        "model.layers.2.mixer.experts.down_proj[3]"
    assert rows["backbone.layers.1.mixer.q1_proj.weight"]["target"] == "model.layers.1.mixer.routing_q_proj.weight"
    assert rows["mtp.layers.0.norm.weight"] == {"name": "mtp.layers.0.norm.weight", "dtype": "F32", "shape": [64],
                                                "target": None, "status": "ignored"}
    assert all(t["status"] == "ok" for name, t in rows.items() if not name.startswith("mtp."))
    assert report["ignored"] == ["mtp.layers.0.norm.weight"] and report["missing"] == report["unexpected"] == []
    assert report["attention"]["window"] == 8 and report["attention"]["inv_search_power"] == 2
    memory = report["memory"]
    assert memory["dtype"] == "bfloat16" and memory["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert [c["label"] for c in memory["contexts"]] == ["128K", "1M", "10M"]
    ten_m = memory["contexts"][2]
    assert ten_m["tokens"] == 10 << 20 and ten_m["kv_bytes"] == memory["kv_bytes_per_token"] * (10 << 20)
    assert ten_m["total_bytes"] == memory["weights_bytes"] + ten_m["kv_bytes"] + memory["recurrent_bytes"]
    text = run_check(str(path))
    assert text.exit_code == 0, text.output
    assert "mamba x2, attention x2, moe x1, mlp x1" in text.output
    assert "and 3 more experts" in text.output and "-> model.layers.2.mixer.experts.up_proj[0..3]" in text.output
    assert "ignored 1: mtp.layers.0.norm.weight" in text.output and "window 8 tokens" in text.output
    assert "OK: every tensor is accounted for" in text.output


def test_models_check_takes_a_model_name(tokenizer_files):
    result = run_check("default", "--json")  # the converted default model, under the models dir
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["model_type"] == "llama" and report["layer_types"] == {"attention": 30}
    assert report["attention"]["window"] == 2024 and report["memory"]["recurrent_bytes"] == 0


def test_models_check_reads_headers_only_and_reports_mismatches(tmp_path):
    """The 30B shape (59 GiB of bf16 weights) is checked on the meta device against a two-tensor
    checkpoint: nothing is allocated, every missing weight is named, the exit code is 1."""
    from superlinear.model.random_weights import read_shape

    path = tmp_path / "30b"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(read_shape("superlinear-exp-30b")))
    save_file({"backbone.embeddings.weight": torch.zeros(131072, 2, dtype=torch.bfloat16),
               "backbone.layers.5.mixer.q_proj.weight": torch.zeros(4096, 2688, dtype=torch.bfloat16)},
              str(path / "model.safetensors"))
    result = run_check(str(path), "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["layer_types"] == {"mamba": 23, "moe": 23, "attention": 6}
    assert report["wrong_shape"] == ["backbone.embeddings.weight (131072, 2) != (131072, 2688)"]
    assert "model.layers.5.mixer.routing_q_proj.weight" in report["missing"]
    assert "model.layers.5.mixer.q_proj.weight" not in report["missing"]
    layer5 = next(part for part in report["error"].split(" | ") if part.startswith("layer 5 "))
    assert layer5 == ("layer 5 (attention): missing norm.weight, mixer.k_proj.weight, mixer.v_proj.weight, "
                      "mixer.o_proj.weight, mixer.routing_q_proj.weight")
    assert 31.0e9 * 2 < report["memory"]["weights_bytes"] < 32.5e9 * 2
    assert report["attention"]["search_power"] == 0.55 and report["attention"]["span_power"] == 0.55


def test_models_check_bad_directory_is_one_line(tmp_path):
    from cli_helpers import isolated_env, one_error_line, run_spl

    env = isolated_env(tmp_path)
    assert "is not a directory" in one_error_line(run_spl(env, "models", "check", str(tmp_path / "nowhere")))
    assert "no config.json" in one_error_line(run_spl(env, "models", "check", str(tmp_path)))
