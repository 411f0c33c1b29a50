"""Our forward for Nemotron-H hybrids (superlinear.model.hybrid) against transformers' own, on CPU.

The fast paths that also run on CPU: the Mamba-2 chunk scan and conv written by us (the
reference the fla kernels are checked against on the GPU), the decode step as plain tensor ops,
and the MoE experts as grouped matmuls without host syncs. The fla kernels themselves need
CUDA: tests/test_model_hybrid_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from superlinear.errors import NotFound
from superlinear.model import layer_types, mamba2
from superlinear.model.moe import grouped_experts
from superlinear.model.random_weights import random_model, read_shape

SPAN = {"span_attention_sw_index": 3, "span_attention_num_spans": 3, "span_attention_backward_factor": 3.0,
        "span_attention_forward_factor": 1.0, "span_attention_span_power": 0.5,
        "span_attention_inv_search_power": 2}


def tiny_hybrid_config(**extra) -> dict:
    """superlinear-exp at toy size: 2 groups, MoE with 8 experts (top 2), a routing projection,
    a window of 15 tokens so that spans are used beyond it."""
    config = {"model_type": "superlinear-exp", "vocab_size": 512, "hidden_size": 64,
              "layers_block_type": ["linear_attention", "moe", "full_attention", "linear_attention", "moe",
                                    "full_attention", "mlp"],
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 2, "conv_kernel": 4,
              "chunk_size": 32, "intermediate_size": 64, "n_routed_experts": 8, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 48, "n_group": 1,
              "topk_group": 1, "mlp_hidden_act": "relu2", "tie_word_embeddings": False, **SPAN}
    config.update(extra)
    return config


def make_state_matter(model, router_std: float | None = None):
    """Random Mamba parameters that make the decay and the skip matter (random init leaves them
    near no-ops) and, with ``router_std``, a router that spreads the tokens over the experts."""
    with torch.no_grad():
        for block in model.hf.model.layers:
            if layer_types.canonical([block.block_type]) == [layer_types.MAMBA]:
                block.mixer.A_log.uniform_(-1.0, 1.5)
                block.mixer.dt_bias.uniform_(-2.0, 0.5)
                block.mixer.D.normal_()
                block.mixer.conv1d.weight.normal_(0, 0.3)
            if router_std is not None and block.block_type == layer_types.MOE:
                block.mixer.gate.weight.normal_(0, router_std)
    return model


@pytest.fixture(scope="module")
def hybrid():
    return make_state_matter(random_model(tiny_hybrid_config(), name="tiny-hybrid", device="cpu", dtype="fp32",
                                          seed=1))


def _greedy(model, ids, steps, chunk_size):
    cache = model.new_cache(len(ids) + steps + 1)
    logits = model.prefill(cache, ids, chunk_size=chunk_size)
    first = logits.clone()
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = model.decode_step(cache, out[-1])
    return first, out, cache


def test_hybrid_forward_equals_transformers_prefill_and_decode(hybrid):
    assert hybrid.fast_paths and hybrid.info()["forward_paths"]["moe"].startswith("grouped")
    assert hybrid.info()["forward"] == "fast" and hybrid.info()["forward_reason"] is None
    reference = hybrid.with_attention(fast_paths=False)
    assert reference.info()["forward"] == "fallback" and "fast_paths=False" in reference.info()["forward_reason"]
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    # chunks of 128: the reference scan's 64-token blocks and the model chunks both cross
    ours, ours_tokens, ours_cache = _greedy(hybrid, ids, 24, chunk_size=128)
    theirs, their_tokens, their_cache = _greedy(reference, ids, 24, chunk_size=128)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours_tokens == their_tokens
    for i in ours_cache.ssm:
        torch.testing.assert_close(ours_cache.ssm[i], their_cache.ssm[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours_cache.conv[i], their_cache.conv[i])
    assert len(set(ours_tokens)) > 3  # not a degenerate model


def test_chunked_prefill_equals_one_chunk(hybrid):
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    whole, tokens_whole, _ = _greedy(hybrid, ids, 8, chunk_size=512)
    pieces, tokens_pieces, _ = _greedy(hybrid, ids, 8, chunk_size=37)
    torch.testing.assert_close(whole, pieces, rtol=1e-4, atol=1e-4)
    assert tokens_whole == tokens_pieces


def test_ssd_chunk_scan_equals_the_step_recurrence():
    g = torch.Generator().manual_seed(3)
    length, heads, head_dim, state, groups = 150, 4, 8, 6, 2
    xs = torch.randn(1, length, heads, head_dim, generator=g)
    dt = torch.rand(1, length, heads, generator=g) * 0.8 + 0.01
    a = -torch.rand(heads, generator=g) * 2 - 0.1
    b = torch.randn(1, length, groups, state, generator=g)
    c = torch.randn(1, length, groups, state, generator=g)
    d = torch.randn(heads, generator=g)
    start = torch.randn(1, heads, head_dim, state, generator=g)
    chunked_state = start.clone()
    chunked = mamba2.ssd_chunk_reference(xs, dt, a, b, c, d, chunked_state)
    step_state = start.clone()
    steps = [mamba2.ssm_step(xs[:, t:t + 1], dt[:, t:t + 1], a, b[:, t:t + 1], c[:, t:t + 1], d, step_state)
             for t in range(length)]
    torch.testing.assert_close(chunked, torch.cat(steps, dim=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked_state, step_state, rtol=1e-4, atol=1e-4)


def test_conv_chunks_and_steps_agree():
    g = torch.Generator().manual_seed(4)
    dim, kernel, length = 12, 4, 40
    x = torch.randn(1, length, dim, generator=g)
    weight, bias = torch.randn(dim, kernel, generator=g), torch.randn(dim, generator=g)
    start = torch.randn(1, dim, kernel, generator=g)
    whole_state = start.clone()
    whole = mamba2.conv_chunk_reference(x, whole_state, weight, bias)
    split_state = start.clone()
    split = torch.cat([mamba2.conv_chunk_reference(x[:, :17], split_state, weight, bias),
                       mamba2.conv_chunk_reference(x[:, 17:], split_state, weight, bias)], dim=1)
    step_state = start.clone()
    steps = torch.stack([mamba2.conv_step(x[:, t], step_state, weight, bias) for t in range(length)], dim=1)
    torch.testing.assert_close(whole, split)
    torch.testing.assert_close(whole, steps, rtol=1e-5, atol=1e-5)
    assert torch.equal(whole_state, split_state) and torch.equal(whole_state, step_state)
    assert torch.equal(whole_state[0], x[0, -kernel:].T)  # the state is the last inputs


def test_grouped_experts_equal_the_per_expert_loop(hybrid):
    moe = next(b.mixer for b in hybrid.hf.model.layers if b.block_type == "moe")
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(5))
    _, weights, experts = moe.gate(x)
    ours = grouped_experts(x, experts, weights, moe.experts.up_proj, moe.experts.down_proj, moe.experts.act_fn)
    theirs = moe.experts(x, experts, weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # one token, the decode shape
    torch.testing.assert_close(grouped_experts(x[:1], experts[:1], weights[:1], moe.experts.up_proj,
                                               moe.experts.down_proj, moe.experts.act_fn),
                               theirs[:1], rtol=1e-5, atol=1e-6)


def test_the_30b_shape_has_the_published_dimensions():
    from superlinear.model.loaders import build_empty

    config = read_shape("superlinear-exp-30b")
    hf, kind, _ = build_empty(config, where="shape")  # meta weights: nothing is allocated
    types = list(hf.config.layers_block_type)
    assert (types.count("linear_attention"), types.count("moe"), types.count("full_attention")) == (23, 23, 6)
    total = sum(p.numel() for p in hf.parameters())
    experts = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    active = total - experts * (1 - 6 / 128) - hf.model.embeddings.weight.numel()
    assert 31.0e9 < total < 32.5e9, total
    assert 3.1e9 < active < 3.5e9, active  # ~3.3B parameters read per decoded token
    assert kind == "superlinear-exp"


def test_random_default_shape_generates_and_unknown_shapes_are_clear():
    from superlinear.model import load_model

    model = load_model("random:default", device="cpu")
    assert model.tokenizer is None and model.info()["parameters"] > 100e6
    cache = model.new_cache(64)
    logits = model.prefill(cache, list(range(100, 140)))
    assert logits.shape == (49152,) and torch.isfinite(logits).all()
    with pytest.raises(NotFound, match="superlinear-exp-30b"):
        load_model("random:nope", device="cpu")


# -- semantics taken from the config, whatever transformers is installed -------------------------

LAYERS_5_24 = ["linear_attention", "moe", "full_attention", "linear_attention", "moe", "full_attention", "mlp"]


@pytest.mark.parametrize("spelling", [
    {"layers_block_type": ["mamba", "moe", "attention", "mamba", "moe", "attention", "mlp"]},  # transformers 5.3
    {"layers_block_type": None, "hybrid_override_pattern": "ME*ME*-"},  # NVIDIA's config.json
])
def test_layer_types_are_read_in_every_spelling(spelling):
    reference = random_model(tiny_hybrid_config(), name="t", device="cpu", dtype="fp32", seed=7)
    config = {k: v for k, v in {**tiny_hybrid_config(), **spelling}.items() if v is not None}
    model = random_model(config, name="t", device="cpu", dtype="fp32", seed=7)
    assert model.layer_types() == LAYERS_5_24
    assert model.layout == reference.layout
    assert model.layout.attention_layers == (2, 5) and model.layout.mamba_layers == (0, 3)
    ids = list(range(3, 40))
    torch.testing.assert_close(model.prefill(model.new_cache(64), ids),
                               reference.prefill(reference.new_cache(64), ids))


def test_an_unknown_layer_type_is_named():
    from superlinear.errors import InvalidRequest

    config = tiny_hybrid_config(layers_block_type=["mamba", "moe", "transformer"])
    with pytest.raises((ValueError, InvalidRequest), match="layer 2 has unknown type 'transformer'"):
        random_model(config, name="t", device="cpu", dtype="fp32")


def _small_dt_model(**extra):
    """The tiny hybrid with softplus(dt) = 1.2e-4 everywhere (below time_step_min = 1e-3), a large
    |A| and large mixer weights, so that a clamp at 1e-3 would change the answer visibly."""
    model = random_model(tiny_hybrid_config(**extra), name="small-dt", device="cpu", dtype="fp32", seed=3)
    with torch.no_grad():
        for block in model.hf.model.layers:
            if block.block_type == "linear_attention":
                block.mixer.dt_bias.fill_(-9.0)
                block.mixer.in_proj.weight.normal_(0, 1.0)  # large x, B, C: the mixer matters
                block.mixer.in_proj.weight[-block.mixer.num_heads:].zero_()  # dt_raw = 0: dt = softplus(-9)
                block.mixer.conv1d.weight.normal_(0, 0.5)
                block.mixer.out_proj.weight.normal_(0, 1.0)
                block.mixer.A_log.fill_(5.0)
                block.mixer.D.zero_()
    return model


def _prefill_then_decode(model, ids, decoded):
    """Logits of the last token, with the last ``decoded`` ids fed one at a time by decode."""
    cache = model.new_cache(len(ids) + 1)
    logits = model.prefill(cache, ids[:len(ids) - decoded], chunk_size=64)
    for token in ids[len(ids) - decoded:]:
        logits = model.decode_step(cache, token)
    return logits, cache


def _assert_prefill_equals_decode(model, ids, decoded):
    """A token's answer, and the recurrent state, do not depend on whether it was prefilled or
    decoded; returns the prefilled logits and cache."""
    prefilled, pc = _prefill_then_decode(model, ids, 0)
    logits, dc = _prefill_then_decode(model, ids, decoded)
    torch.testing.assert_close(prefilled, logits, rtol=1e-4, atol=1e-4)
    for i in pc.ssm:
        torch.testing.assert_close(pc.ssm[i], dc.ssm[i], rtol=1e-4, atol=1e-6)
    return prefilled, pc


def test_dt_below_time_step_min_is_not_clamped():
    model = _small_dt_model()
    ids = torch.randint(0, 512, (90,), generator=torch.Generator().manual_seed(4)).tolist()
    prefilled, pc = _assert_prefill_equals_decode(model, ids, 30)
    # and equals transformers' forward where it honours the config's limit (from 5.25 on; 5.24
    # clamped a prefill at time_step_min - the difference this test guards against)
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.25"):
        theirs, _ = _prefill_then_decode(model.with_attention(fast_paths=False), ids, 0)
        torch.testing.assert_close(prefilled, theirs, rtol=1e-4, atol=1e-4)
    # a clamp at time_step_min would have changed the recurrent state a lot
    clamped = _small_dt_model(time_step_limit=[1e-3, float("inf")])
    clamped_logits, cc = _prefill_then_decode(clamped, ids, 0)
    assert all((cc.ssm[i] - pc.ssm[i]).abs().max() > 0.5 * pc.ssm[i].abs().max() for i in pc.ssm)
    assert not torch.allclose(clamped_logits, prefilled, rtol=1e-4, atol=1e-4)


def test_the_configs_time_step_limit_holds_in_prefill_and_decode():
    model = _small_dt_model(time_step_limit=[2e-3, 0.05])
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    _assert_prefill_equals_decode(model, ids, 25)


def test_layer_type_spellings_map_to_one_canonical_list():
    from superlinear.model import layer_types

    canonical = ["linear_attention", "moe", "full_attention", "mlp"]
    assert layer_types.canonical(["mamba", "moe", "attention", "mlp"]) == canonical
    assert layer_types.canonical("ME*-") == canonical
    assert layer_types.from_config({"hybrid_override_pattern": "ME*-"}) == canonical
    assert layer_types.from_config({"layers_block_type": ["mamba", "E", "*", "-"]}) == canonical
    assert layer_types.from_config({"num_hidden_layers": 4}) is None
    # another family's layer_types (Qwen3: full / sliding attention) is not a hybrid's
    assert layer_types.from_config({"layer_types": ["full_attention", "sliding_attention"]}) is None
    assert layer_types.to_pattern(canonical) == "ME*-"
