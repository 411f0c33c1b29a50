"""The MoE experts paths (superlinear.model.moe) and how a model names its slow fallbacks.

Which path runs where (``choose_experts_path``: grouped matmul, grouped + the Triton expert-rows
kernel in decode, or transformers' experts loop), what each path computes against the per-expert
loop (fp32 and fp16; the Triton kernel under ``TRITON_INTERPRET=1`` without a GPU), an fp16
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
    # must be set before the Triton kernel is decorated (superlinear.kernels.moe_decode.triton_rows, imported below)
    os.environ["TRITON_INTERPRET"] = "1"

from test_model_hybrid import tiny_hybrid_config  # noqa: E402

from superlinear.kernels.moe_decode import expert_rows_reference  # noqa: E402
from superlinear.model.moe import (  # noqa: E402
    ExpertsPath,
    choose_experts_path,
    grouped_experts,
    moe_forward,
    route,
    rows_experts,
)
from superlinear.model.random_weights import random_model  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("device, dtype, capability, grouped_mm, triton, kind, reason", [
    ("cpu", FP32, None, True, False, "grouped", ""),
    ("cpu", FP16, None, True, False, "grouped", ""),
    ("cuda", BF16, (9, 0), True, True, "grouped", ""),  # H100 / H200: CUTLASS grouped GEMM
    ("cuda", BF16, (10, 0), True, True, "grouped", ""),
    ("cuda", FP16, (9, 0), True, True, "rows", "float16 on sm90"),  # the model card's dtype
    ("cuda", FP32, (9, 0), True, True, "rows", "float32 on sm90"),
    ("cuda", BF16, (8, 0), True, True, "rows", "bfloat16 on sm80"),  # A100: no CUTLASS path
    ("cuda", FP16, (9, 0), True, False, "loop", "Triton"),
    ("cuda", BF16, (7, 5), True, True, "loop", "compute capability 7.5"),
    ("cuda", BF16, (9, 0), False, True, "loop", "no grouped matmul"),
    ("cpu", FP32, None, False, False, "loop", "no grouped matmul"),
])
def test_experts_path_choice(device, dtype, capability, grouped_mm, triton, kind, reason):
    path = choose_experts_path(device, dtype, capability, grouped_mm, triton)
    assert path.kind == kind
    assert path.fast == (kind != "loop")
    assert reason in path.reason and (kind == "grouped") == (path.reason == "")
    assert (path.reason in path.describe()) == (kind != "loop")  # rows: says why it is not CUTLASS


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
@pytest.mark.parametrize("rows_per_x", [1, 3])
def test_expert_rows_kernel_equals_reference(dtype, rows_per_x):
    from superlinear.kernels.moe_decode.triton_rows import expert_rows

    g = torch.Generator().manual_seed(rows_per_x)
    # sizes off the kernel's blocks (32 output rows, 256 inputs per step) on purpose
    x = torch.randn(4, 300, generator=g).to(dtype)
    weight = (torch.randn(6, 50, 300, generator=g) / 16).to(dtype)
    experts = torch.randint(0, 6, (4 * rows_per_x,), generator=g)
    out = expert_rows(x, weight, experts, rows_per_x)
    ref = expert_rows_reference(x, weight, experts, rows_per_x)
    assert out.dtype == dtype and out.shape == (4 * rows_per_x, 50)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    # against a row-by-row product, so the oracle is checked too
    manual = torch.stack([weight[e].float() @ x[r // rows_per_x].float() for r, e in enumerate(experts.tolist())])
    torch.testing.assert_close(ref.float(), manual, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_grouped_and_rows_paths_equal_the_experts_loop(moe_block, dtype, tokens):
    """The decode step's rows path (Triton kernel, and its oracle) and the grouped matmul give
    transformers' per-expert loop's result, in fp32 and in fp16 (the model card's dtype)."""
    from superlinear.kernels.moe_decode.triton_rows import expert_rows

    mixer, config = moe_block
    x = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    weights, experts = route(mixer.gate, config, x)
    assert len(set(experts.flatten().tolist())) > 1
    up, down, act = mixer.experts.up_proj, mixer.experts.down_proj, mixer.experts.act_fn
    expected = _loop(mixer, x, experts, weights).double()
    if dtype == FP16:
        x, up, down = x.half(), up.detach().half(), down.detach().half()
    scale = expected.abs().max()
    outs = {"grouped": grouped_experts(x, experts, weights, up, down, act),
            "rows": rows_experts(x, experts, weights, up, down, act, expert_rows),
            "rows oracle": rows_experts(x, experts, weights, up, down, act, expert_rows_reference)}
    tolerance = 1e-5 if dtype == FP32 else 4e-3
    for name, out in outs.items():
        assert out.dtype == dtype, name
        error = float((out.double() - expected).abs().max() / scale)
        assert error < tolerance, (name, error)


@pytest.mark.parametrize("kind", ["grouped", "rows", "loop"])
def test_moe_forward_follows_its_path(moe_block, kind):
    """``moe_forward`` with each path gives the same answer for a decode step (1 token) and a
    prefill chunk (24 tokens: above the rows kernel's limit the rows path takes the grouped matmul)."""
    mixer, config = moe_block
    with torch.no_grad():
        for tokens in (1, 24):
            x = torch.randn(1, tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens))
            out = moe_forward(mixer, config, x, ExpertsPath(kind))
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
