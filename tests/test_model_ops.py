"""The MoE-decode and Mamba-2-step kernels (``superlinear.kernels.moe_decode``,
``superlinear.kernels.mamba2_step``) against their PyTorch references, and the hybrid forward
with them (the CUDA decode path) against the path without them.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` at small sizes with fp32/fp16 inputs
(the interpreter's bf16 arithmetic is wrong), the model's choice made as on an H100. On the GPU
(``-m gpu``) the same comparisons run in bf16 at the 30B hybrid's sizes
(``bash scripts/gpu_suite.sh normal``).
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (imported lazily below)

pytest.importorskip("triton")

from test_model_hybrid import tiny_hybrid_config  # noqa: E402

from superlinear.kernels.moe_decode import fused_moe_decode, moe_decode_reference  # noqa: E402
from superlinear.model import hybrid  # noqa: E402
from superlinear.model.moe import ExpertsPath, choose_experts_path, moe_decode_fused, moe_forward  # noqa: E402
from superlinear.model.random_weights import random_model  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where there is no GPU")


def moe_inputs(E, H, inner, shared_inner, dtype, latent=None, seed=0, tokens=1):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    routed_in = latent or H
    return dict(
        x=rand(tokens, H), router_weight=rand(E, H, scale=H ** -0.5), correction_bias=rand(E, scale=0.1).float(),
        up=rand(E, inner, routed_in, scale=routed_in ** -0.5), down=rand(E, routed_in, inner, scale=inner ** -0.5),
        shared_up=rand(shared_inner, H, scale=H ** -0.5) if shared_inner else None,
        shared_down=rand(routed_in, shared_inner, scale=shared_inner ** -0.5) if shared_inner else None,
        x_routed=rand(tokens, latent) if latent else None)


# (experts, hidden, inner, shared inner, top-k, latent): non-powers of two, blocks that do not
# divide the sizes, a top-1 and a top-all, no shared expert, a latent routed input
MOE_CASES = [(8, 48, 40, 24, 2, None), (13, 70, 33, 0, 3, None), (16, 64, 64, 96, 1, None),
             (6, 40, 24, 16, 6, None), (8, 48, 40, 0, 2, 20)]


@cpu_only
@pytest.mark.parametrize("case", range(len(MOE_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act,norm,tokens", [("relu2", True, 1), ("silu", False, 3)])
def test_fused_moe_decode_matches_reference(case, dtype, act, norm, tokens):
    E, H, inner, shared_inner, K, latent = MOE_CASES[case]
    inputs = moe_inputs(E, H, inner, shared_inner, dtype, latent, seed=case, tokens=tokens)
    kw = dict(top_k=K, norm_topk=norm, scaling=2.5, act=act)
    expected = moe_decode_reference(**inputs, **kw)
    got = fused_moe_decode(**inputs, **kw, block_e=4, block_i=16, block_h=32, block_o=16)
    assert got.dtype == dtype and got.shape == expected.shape == (tokens, latent or H)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@cpu_only
def test_fused_moe_decode_refuses_what_it_cannot_read():
    inputs = moe_inputs(8, 48, 40, 24, torch.float32)
    kw = dict(top_k=2, norm_topk=True, scaling=1.0, act="relu2")
    with pytest.raises(ValueError, match="contiguous"):
        fused_moe_decode(**{**inputs, "up": inputs["up"].transpose(1, 2).contiguous().transpose(1, 2)}, **kw)
    with pytest.raises(ValueError, match=r"x \[T, H\] and the routed input"):
        fused_moe_decode(**{**inputs, "x": inputs["x"][0]}, **kw)
    with pytest.raises(ValueError, match="activation"):
        fused_moe_decode(**inputs, **{**kw, "act": "gelu"})


@pytest.fixture(scope="module")
def tiny_hybrid():
    return random_model(tiny_hybrid_config(), name="tiny-hybrid", device=DEVICE, dtype="fp32", seed=2)


@cpu_only
def test_moe_decode_equals_the_grouped_moe_of_the_hybrid(tiny_hybrid):
    cfg = tiny_hybrid.hf.config
    for block in tiny_hybrid.hf.model.layers:
        if block.block_type != "moe":
            continue
        x = torch.randn(1, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
        expected = moe_forward(block.mixer, cfg, x, ExpertsPath("grouped"))
        torch.testing.assert_close(moe_decode_fused(block.mixer, cfg, x), expected, rtol=1e-5, atol=1e-5)


def prologue_inputs(heads, head_dim, state, groups, kernel, dtype, bias=True, dt_limit=(0.0, float("inf")),
                    seed=0):
    from superlinear.model.mamba2 import MambaDims

    dims = MambaDims(heads=heads, head_dim=head_dim, state=state, groups=groups, kernel=kernel, eps=1e-5,
                     dt_limit=dt_limit)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    projected = rand(1, 1, dims.inner + dims.conv_dim + heads)
    projected[..., -heads:] -= 6.0  # softplus(dt) down to ~1e-4: small steps must stay exact
    return dims, dict(projected=projected, conv_state=rand(1, dims.conv_dim, kernel),
                      conv_weight=rand(dims.conv_dim, kernel, scale=0.5),
                      conv_bias=rand(dims.conv_dim) if bias else None,
                      dt_bias=rand(heads, scale=0.5), a_log=rand(heads, scale=0.5))


# (heads, head_dim, state, groups, conv kernel, conv bias): one group, heads per group 1 and 4,
# sizes that are not powers of two
PROLOGUE_CASES = [(4, 16, 16, 1, 4, True), (8, 16, 16, 2, 4, False), (6, 12, 10, 3, 3, True), (4, 8, 8, 4, 2, True)]


@cpu_only
@pytest.mark.parametrize("case", range(len(PROLOGUE_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dt_limits", [(0.0, float("inf")), (1e-3, 0.1)])
def test_mamba_step_prologue_matches_reference(case, dtype, dt_limits):
    from superlinear.kernels.mamba2_step import step_prologue, step_prologue_reference

    *shape, bias = PROLOGUE_CASES[case]
    dims, inputs = prologue_inputs(*shape, dtype=dtype, bias=bias, dt_limit=dt_limits, seed=case)
    ref_state = inputs["conv_state"].clone()
    expected = step_prologue_reference(**{**inputs, "conv_state": ref_state}, dims=dims)
    got = step_prologue(**inputs, dims=dims)
    assert torch.equal(inputs["conv_state"], ref_state)  # the same shift, bit for bit
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    for name, a, b in zip("qkvg", got, expected, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
    dt = got[3] / -torch.exp(inputs["a_log"].float())
    assert dt.min() < 1e-3 or dt_limits[0] > 0  # the small steps were exercised
    if dtype == torch.float32:  # ... to full relative precision (a naive log(1 + exp) is 1e-3 off)
        torch.testing.assert_close(got[3], expected[3], rtol=1e-5, atol=0)


@cpu_only
def test_mixer_step_equals_the_default_decode_step(tiny_hybrid):
    from superlinear.model.mamba2 import MambaDims, mixer_forward, mixer_step_fused

    cfg = tiny_hybrid.hf.config
    dims = MambaDims.from_config(cfg)
    block = next(b for b in tiny_hybrid.hf.model.layers if b.block_type == "linear_attention")
    g = torch.Generator().manual_seed(7)
    conv = torch.randn(1, dims.conv_dim, dims.kernel, generator=g)
    ssm = torch.randn(1, dims.heads, dims.head_dim, dims.state, generator=g)
    states = [(conv.clone(), ssm.clone()), (conv.clone(), ssm.clone())]
    for _ in range(3):  # a few steps: the states carry over
        x = torch.randn(1, 1, cfg.hidden_size, generator=g)
        expected = mixer_forward(block.mixer, dims, x, *states[0], fast=False)
        got = mixer_step_fused(block.mixer, dims, x, *states[1], fast=False)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states[1][1], states[0][1], rtol=1e-5, atol=1e-5)
        assert torch.equal(states[1][0], states[0][0])


def as_on_a_gpu(monkeypatch, fused=True):
    """The decode paths of an H100 in fp32 (fused MoE and Mamba-2 step when ``fused``), chosen at
    load: on CPU the kernels then run in the interpreter; on the GPU ``fused=False`` gives the
    paths without them."""
    monkeypatch.setattr(hybrid, "experts_path", lambda device, dtype, blocker: choose_experts_path(
        "cuda", torch.float32, (9, 0), True, fused, blocker))
    monkeypatch.setattr(hybrid, "fused_mamba_step_runs", lambda device, dims: fused and dims is not None)


@cpu_only
def test_hybrid_decode_with_the_fused_ops_equals_the_default_path(monkeypatch):
    def greedy(model):
        cache = model.new_cache(64)
        logits = model.prefill(cache, list(range(3, 23)), chunk_size=8)
        out, seen = [], []
        for _ in range(6):
            out.append(int(logits.argmax()))
            logits = model.decode_step(cache, out[-1])
            seen.append(logits)
        return out, seen

    default = random_model(tiny_hybrid_config(), name="tiny", device=DEVICE, dtype="fp32", seed=4)
    assert default.info()["forward_paths"]["decode_ops"] == "default"  # on CPU
    expected = greedy(default)
    as_on_a_gpu(monkeypatch)
    fused = random_model(tiny_hybrid_config(), name="tiny", device=DEVICE, dtype="fp32", seed=4)
    assert fused.info()["forward_paths"]["decode_ops"] == "fused Triton: MoE, Mamba-2 step prologue"
    got = greedy(fused)
    assert got[0] == expected[0]
    for a, b in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@cpu_only
def test_a_fused_op_the_model_cannot_run_is_named_and_left_off(monkeypatch):
    as_on_a_gpu(monkeypatch)
    model = random_model(tiny_hybrid_config(n_group=2, topk_group=1), name="tiny", device=DEVICE, dtype="fp32")
    assert model.info()["forward_paths"]["decode_ops"] == ("fused Triton: Mamba-2 step prologue (no fused MoE "
                                                           "decode: group-limited routing (topk_group != n_group))")


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at the 30B hybrid's sizes, and the hybrid's graph decode with the fused ops
# ---------------------------------------------------------------------------------------------


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_fused_moe_decode_at_the_30b_sizes():
    inputs = moe_inputs(128, 2688, 1856, 3712, torch.bfloat16, seed=1)
    kw = dict(top_k=6, norm_topk=True, scaling=2.5, act="relu2")
    assert rel(fused_moe_decode(**inputs, **kw), moe_decode_reference(**inputs, **kw)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("sizes", [(64, 64, 128, 8, 4), (8, 32, 64, 2, 4), *[c[:5] for c in PROLOGUE_CASES]],
                         ids=["30b", "gpu-hybrid", *(f"case{i}" for i in range(len(PROLOGUE_CASES)))])
def test_gpu_mamba_step_prologue_equals_the_reference(sizes):
    """At the 30B's sizes and at blocks smaller than a program's threads (held by several warps:
    the in-place conv shift raced there), step after step on one conv state: every element
    within bf16 rounding of the fp32 reference, the state shifted exactly."""
    from superlinear.kernels.mamba2_step import step_prologue, step_prologue_reference

    dims, inputs = prologue_inputs(*sizes, torch.bfloat16, seed=2)
    ref_state = inputs["conv_state"].float()
    exact = {k: v.float() if torch.is_tensor(v) else v for k, v in inputs.items()}
    for step in range(8):
        expected = step_prologue_reference(**{**exact, "conv_state": ref_state}, dims=dims)
        got = step_prologue(**inputs, dims=dims)
        assert torch.equal(inputs["conv_state"].float(), ref_state), step
        for name, a, b in zip("qkvg", got, expected, strict=True):
            assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max())), (step, name)
        inputs["projected"] = torch.randn_like(inputs["projected"])
        inputs["projected"][..., -dims.heads:] -= 6.0
        exact["projected"] = inputs["projected"].float()


def without_fused_ops(monkeypatch):
    """The decode paths of this GPU without the fused kernels (the grouped matmul and the plain
    Mamba-2 step), chosen at load."""
    from superlinear.model.moe import experts_path

    monkeypatch.setattr(hybrid, "experts_path", lambda device, dtype, blocker: experts_path(
        device, dtype, "left off by the test"))
    monkeypatch.setattr(hybrid, "fused_mamba_step_runs", lambda device, dims: False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_graph_decode_with_fused_ops_equals_eager_and_the_default_path(monkeypatch):
    """Graph decode equals eager decode token for token with the fused ops on, and both stay
    close to the default path (the shape of tests/test_model_hybrid_gpu.py's hybrid)."""
    config = tiny_hybrid_config(hidden_size=256, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=64,
                                num_attention_heads=8, head_dim=32, moe_intermediate_size=128,
                                moe_shared_expert_intermediate_size=128, vocab_size=2048)
    ids = torch.randint(0, 2048, (700,), generator=torch.Generator().manual_seed(0)).tolist()

    def decode(model, forced=None):
        cache = model.new_cache(800)
        logits = model.prefill(cache, ids, chunk_size=256)
        tokens, seen = [], []
        for step in range(64):
            tokens.append(int(logits.argmax()) if forced is None else forced[step])
            logits = model.decode_step(cache, tokens[-1])
            seen.append(logits)
        return tokens, torch.stack(seen)

    def device_ops_per_step(model):
        """Kernels (and copies) one eager decode step puts on the GPU."""
        eager = model.with_attention(cuda_graph=False)
        cache = eager.new_cache(400)
        eager.prefill(cache, ids[:300], chunk_size=256)
        eager.decode_step(cache, 5)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eager.decode_step(cache, 7)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    without_fused_ops(monkeypatch)
    base = random_model(config, name="gpu-hybrid", device="cuda", dtype="bf16", seed=3)
    assert base.info()["forward_paths"]["decode_ops"].startswith("default")
    default = decode(base)
    monkeypatch.undo()  # the paths a bf16 model chooses on this GPU
    fused = random_model(config, name="gpu-hybrid", device="cuda", dtype="bf16", seed=3)
    assert fused.info()["forward_paths"]["decode_ops"] == "fused Triton: MoE, Mamba-2 step prologue"
    graph, eager = decode(fused), decode(fused.with_attention(cuda_graph=False))
    assert fused.info()["cuda_graph_error"] is None
    assert graph[0] == eager[0] and rel(graph[1], eager[1]) < 1e-2
    # the default path's tokens fed to the fused one: the same logits within bf16 rounding
    assert rel(decode(fused, forced=default[0])[1], default[1]) < 3e-2
    counts = device_ops_per_step(base), device_ops_per_step(fused)
    print(f"GPU kernels per decode step (2 MoE, 2 Mamba-2, 2 attention layers): default {counts[0]}, "
          f"fused {counts[1]}")
    assert counts[1] < counts[0]


@cpu_only
def test_the_kernels_compile_for_hopper(tmp_path):
    """The interpreter never runs Triton's compiler: compile each kernel for sm_90 here (a
    subprocess without TRITON_INTERPRET), so a kernel that would not build fails before a GPU."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    script = Path(__file__).parent / "triton_hopper_compile.py"
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        "_router", "_up", "_down", "_prologue", "_append_rows_kernel", "_score_rows_kernel", "_partial_rows_kernel"]
