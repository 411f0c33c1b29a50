"""The MoE experts paths (superlinear.model.moe) and how a model names its slow fallbacks.

Which path runs where (``choose_experts_path``: grouped matmul with the fused MoE decode kernels
in a decode step, or transformers' experts loop), what each path computes against the per-expert
loop (fp32 and fp16; the Triton kernels under ``TRITON_INTERPRET=1`` without a GPU), an fp16
hybrid on its fast path against the same weights in fp32, and the fallback named once at load,
in ``model.info()`` and in ``spl models info``. The fp16 decode as a CUDA graph is checked on
the GPU: tests/test_model_hybrid_gpu.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before the Triton kernels are decorated (superlinear.kernels.moe_decode, imported lazily)
    os.environ["TRITON_INTERPRET"] = "1"

from test_model_hybrid import tiny_hybrid_config  # noqa: E402

from superlinear.model.moe import (  # noqa: E402
    ExpertsPath,
    choose_experts_path,
    grouped_experts,
    moe_forward,
    route,
)
from superlinear.model.random_weights import random_model  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("device, dtype, capability, grouped_mm, triton, blocker, kind, fused, reason", [
    ("cpu", FP32, None, True, False, None, "grouped", False, ""),
    ("cpu", FP16, None, True, True, None, "grouped", False, ""),  # no Triton kernels on CPU
    ("cuda", BF16, (9, 0), True, True, None, "grouped", True, ""),  # H100 / H200: CUTLASS grouped GEMM
    ("cuda", BF16, (10, 0), True, True, None, "grouped", True, ""),
    ("cuda", BF16, (9, 0), True, True, "group-limited routing", "grouped", False, ""),
    ("cuda", BF16, (9, 0), True, False, None, "grouped", False, ""),
    ("cuda", FP16, (9, 0), True, True, None, "fused", True, "float16 on sm90"),  # the model card's dtype
    ("cuda", FP32, (9, 0), True, True, None, "fused", True, "float32 on sm90"),
    ("cuda", BF16, (8, 0), True, True, None, "fused", True, "bfloat16 on sm80"),  # A100: no CUTLASS path
    ("cuda", FP16, (9, 0), True, False, None, "loop", False, "Triton is not installed"),
    ("cuda", FP16, (9, 0), True, True, "group-limited routing", "loop", False, "cannot run it (group-limited"),
    ("cuda", BF16, (7, 5), True, True, None, "loop", False, "compute capability 7.5"),
    ("cuda", BF16, (9, 0), False, True, None, "loop", False, "no grouped matmul"),
    ("cpu", FP32, None, False, False, None, "loop", False, "no grouped matmul"),
])
def test_experts_path_choice(device, dtype, capability, grouped_mm, triton, blocker, kind, fused, reason):
    path = choose_experts_path(device, dtype, capability, grouped_mm, triton, blocker)
    assert path.kind == kind and path.fused_for(1) == fused
    assert path.fast == (kind != "loop")
    assert reason in path.reason and (kind == "grouped") == (path.reason == "")
    assert (path.reason in path.describe()) == (kind != "loop")  # fused: says why the grouped matmul is not
    assert ("fused Triton MoE decode" in path.describe()) == fused
    # a prefill chunk never takes the fused kernels; a batched decode step only where the grouped
    # matmul would sync with the host
    assert not path.fused_for(512) and path.fused_for(8) == (fused and kind == "fused")


@pytest.fixture(scope="module")
def moe_block():
    """A real Nemotron-H MoE mixer (transformers' module: router, 8 experts of which 2 per token,
    shared expert) with routing logits spread enough that the picks differ per token."""
    model = random_model(tiny_hybrid_config(), name="tiny-hybrid", device="cpu", dtype="fp32", seed=5)
    block = next(b for b in model.hf.model.layers if hasattr(b.mixer, "experts"))
    with torch.no_grad():
        block.mixer.gate.weight.normal_(0, 0.5)
    return block.mixer, model.hf.config


def _loop(mixer, x, experts, weights):
    return mixer.experts(x, experts, weights)


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_grouped_and_fused_paths_equal_the_experts_loop(moe_block, dtype, tokens):
    """The grouped matmul and the fused decode kernels (a decode step of 1 or a few tokens) give
    transformers' per-expert loop's result, in fp32 and in fp16 (the model card's dtype)."""
    from superlinear.model.moe import moe_decode_fused

    mixer, config = moe_block
    x = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    weights, experts = route(mixer.gate, config, x)
    assert len(set(experts.flatten().tolist())) > 1
    up, down, act = mixer.experts.up_proj, mixer.experts.down_proj, mixer.experts.act_fn
    expected = _loop(mixer, x, experts, weights).double()
    scale = expected.abs().max()
    tolerance = 1e-5 if dtype == FP32 else 4e-3
    if dtype == FP16:
        x, up, down = x.half(), up.detach().half(), down.detach().half()
    grouped = grouped_experts(x, experts, weights, up, down, act)
    assert grouped.dtype == dtype
    assert float((grouped.double() - expected).abs().max() / scale) < tolerance
    if dtype == FP32 and tokens <= 5:  # the whole layer (shared expert too) on the fused kernels
        with torch.no_grad():
            fused = moe_decode_fused(mixer, config, x[None])
            whole = moe_forward(mixer, config, x[None], ExpertsPath("loop"))
        torch.testing.assert_close(fused, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["grouped", "fused", "loop"])
def test_moe_forward_follows_its_path(moe_block, kind):
    """``moe_forward`` with each path gives the same answer for a decode step (1 token) and a
    prefill chunk (80 tokens: above ``FUSED_MAX_TOKENS`` the fused path takes the grouped matmul)."""
    mixer, config = moe_block
    with torch.no_grad():
        for tokens in (1, 80):
            x = torch.randn(1, tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens))
            out = moe_forward(mixer, config, x, ExpertsPath(kind, fused_decode=kind == "fused"))
            ref = moe_forward(mixer, config, x, ExpertsPath("loop"))
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fp16_hybrid_runs_the_fast_path_and_matches_fp32():
    """fp16 (the superlinear-exp model card's dtype) runs our forward with grouped experts, named
    ``fast``, and its prefill and decode logits follow the same weights in fp32."""
    config = tiny_hybrid_config()
    half = random_model(config, name="tiny-fp16", device="cpu", dtype="fp16", seed=2)
    exact = random_model(config, name="tiny-fp32", device="cpu", dtype="fp32", seed=2)
    exact.hf.load_state_dict({k: v.float() for k, v in half.hf.state_dict().items()})
    info = half.info()
    assert info["dtype"] == "float16" and info["forward"] == "fast" and info["forward_reason"] is None
    assert info["forward_paths"]["moe"].startswith("grouped")
    ids = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    caches = {m: m.new_cache(200) for m in (half, exact)}
    logits = {m: m.prefill(caches[m], ids, chunk_size=64) for m in (half, exact)}
    for _ in range(6):
        rel = float((logits[half] - logits[exact]).norm() / logits[exact].norm())
        assert torch.isfinite(logits[half]).all() and rel < 2e-2, rel
        token = int(logits[exact].argmax())
        logits = {m: m.decode_step(caches[m], token) for m in (half, exact)}


def test_a_slow_fallback_is_named_once_at_load_and_in_info(monkeypatch, capfd):
    """A torch without grouped matmul (before 2.9): the MoE falls back to transformers' experts
    loop; the load says so once on stderr (not again for siblings), ``info()`` says
    ``fallback`` with the reason, and the answers are those of the fast path."""
    fast = random_model(tiny_hybrid_config(), name="tiny-fast", device="cpu", dtype="fp32", seed=4)
    assert "slow fallback" not in capfd.readouterr().err
    monkeypatch.delattr(torch, "_grouped_mm")
    slow = random_model(tiny_hybrid_config(), name="tiny-slow", device="cpu", dtype="fp32", seed=4)
    slow.with_attention("dense")
    monkeypatch.undo()  # the fast model below needs it back; the slow one chose its path at load
    err = capfd.readouterr().err
    assert err.count("spl: warning: tiny-slow runs a slow fallback") == 1, err
    assert "has no grouped matmul" in err
    info = slow.info()
    assert info["forward"] == "fallback" and "has no grouped matmul" in info["forward_reason"]
    assert info["forward_paths"]["moe"].startswith("transformers experts loop")
    ids = list(range(3, 60))
    caches = fast.new_cache(64), slow.new_cache(64)
    torch.testing.assert_close(slow.prefill(caches[1], ids), fast.prefill(caches[0], ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(slow.decode_step(caches[1], 7), fast.decode_step(caches[0], 7), rtol=1e-4, atol=1e-4)


def test_models_info_shows_the_forward(tmp_path):
    """``spl models info`` names the forward (fast, or fallback with the reason); ``--json``
    carries ``forward``, ``forward_reason`` and ``forward_paths``."""
    from click.testing import CliRunner
    from nemotron_tiny import write_tiny_nemotron

    from superlinear.cli.main import build_cli

    write_tiny_nemotron(tmp_path)
    cli = build_cli()
    result = CliRunner().invoke(cli, ["models", "info", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "forward          fast (" in result.output and "grouped matmul" in result.output
    result = CliRunner().invoke(cli, ["models", "info", str(tmp_path), "--device", "cpu", "--json"])
    info = json.loads(result.output)
    assert info["forward"] == "fast" and info["forward_reason"] is None
    assert set(info["forward_paths"]) == {"mamba_prefill", "moe", "decode_ops"}
