"""The 30B hybrid's shape (random:superlinear-exp-30b: 52 layers, 128 experts) on one GPU: the
logits after all 52 layers stay finite and sane at long context, in bf16 and in fp16 (the model
card's dtype, on its fast path). Random weights, so no checkpoint is needed; ~3 minutes on an
H200 (scripts/gpu_flagship.sh sanity30b). ``SPL_GPU_30B_TOKENS`` sets the bf16 context (1M)."""

from __future__ import annotations

import gc
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LONG = int(os.environ.get("SPL_GPU_30B_TOKENS", str(1 << 20)))


def assert_sane(logits: torch.Tensor, where: str) -> None:
    """Finite, not constant, spread like the random LM head makes it: the final RMSNorm gives a
    hidden state of RMS 1 (norm weights are ones) and the head's rows are normal(0, 0.02) over
    2688 inputs, so any healthy hidden state gives logits of std ~1.04 with Gaussian tails; NaN,
    overflow or a vanished state (constant logits) fail."""
    assert torch.isfinite(logits).all(), f"{where}: non-finite logits"
    std = float(logits.std())
    assert 0.5 < std < 2.0, f"{where}: logits std {std}"
    z = float(((logits - logits.mean()) / std).abs().max())
    assert z < 8.0, f"{where}: a logit {z} standard deviations out"


@pytest.mark.parametrize("dtype, length", [("bf16", LONG), ("fp16", 64 * 1024)])
def test_30b_logits_are_sane_after_52_layers(dtype, length):
    from superlinear.model import load_model

    model = load_model("random:superlinear-exp-30b", dtype=dtype)
    try:
        info = model.info()
        assert info["layers"] == 52 and info["forward"] == "fast", info["forward_reason"]
        ids = torch.randint(1000, model.vocab_size - 1, (length,), generator=torch.Generator().manual_seed(0))
        cache = model.new_cache(length + 8)
        logits = model.prefill(cache, ids)
        assert_sane(logits, f"{dtype} prefill of {length}")
        steps = [logits]
        for step in range(4):  # decode (the CUDA graph) goes on from the long context
            steps.append(model.decode_step(cache, int(steps[-1].argmax())))
            assert_sane(steps[-1], f"{dtype} decode step {step} at {length}")
        assert model.info()["cuda_graph_error"] is None
        spread = max(float((a - b).norm() / b.norm()) for a, b in zip(steps[1:], steps[:-1], strict=True))
        assert spread > 1e-3, "the logits do not depend on the input"
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
