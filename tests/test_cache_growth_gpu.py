"""Cache growth on the GPU at a long context (issue 18, section 5): the 30B hybrid's shape with
random weights, a 4M-token prefill, then decode with the cache forced to grow every 1K tokens
(each growth moves the whole 24 GiB KV and recaptures the decode graph). The peak of allocated
(and reserved) device memory must stay flat: it may rise by the KV of the tokens added, plus one
KV tensor while a growth moves it, never by a second copy of the cache.

Run on the device machine: ``bash scripts/gpu_flagship.sh growth`` (about 4 minutes on an H200),
which sets ``SPL_GPU_GROWTH_TOKENS`` (the context; without it the test is skipped, so that
``scripts/gpu_suite.sh`` stays within its call). ``SPL_GPU_GROWTH_MODEL`` / ``SPL_GPU_GROWTH_STEPS``
change the model and the number of decode tokens (default ``random:superlinear-exp-30b``, 4608:
four growths).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not os.environ.get("SPL_GPU_GROWTH_TOKENS"),
                                 reason="a 30B model at 4M tokens: set SPL_GPU_GROWTH_TOKENS (gpu_flagship.sh growth)")]

GROW_EVERY = 1024
GIB = 2**30


def test_decode_growth_every_1k_tokens_keeps_the_peak_flat():
    from superlinear.model import load_model

    model = load_model(os.environ.get("SPL_GPU_GROWTH_MODEL", "random:superlinear-exp-30b"), device="cuda")
    length = int(os.environ["SPL_GPU_GROWTH_TOKENS"])
    steps = int(os.environ.get("SPL_GPU_GROWTH_STEPS", "4608"))
    device = model.device
    weights = torch.cuda.memory_allocated(device)
    ids = torch.randint(0, model.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(length + steps + GROW_EVERY)
    # 1K tokens of headroom (not the default 0.8%), so that the decode grows the cache every 1K tokens
    cache.reserve(length + GROW_EVERY, exact=True)
    started = time.perf_counter()
    logits = model.prefill(cache, ids)
    torch.cuda.synchronize(device)
    print(f"prefill {length} tokens: {time.perf_counter() - started:.1f} s; weights {weights / GIB:.2f} GiB, "
          f"KV {cache.nbytes() / GIB:.2f} GiB, capacity {cache.capacity}")
    torch.cuda.empty_cache()  # the prefill's activation blocks: not part of the decode's baseline
    headroom = cache.capacity - length
    # per window (the prefill's 1K tokens of headroom, then one per growth): allocated at its
    # start, growth_bytes, peak allocated, peak reserved, seconds of the growth + recapture + one step
    windows = []
    token = int(logits.argmax())
    for step in range(steps):
        if step == 0 or cache.position + 1 > cache.capacity:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            promised = 0 if step == 0 else cache.growth_bytes(cache.position + GROW_EVERY, exact=True)
            t0 = time.perf_counter()
            if step:
                cache.reserve(cache.position + GROW_EVERY, exact=True)
            logits = model.decode_step(cache, token)  # (re)captures the decode graph on the cache's tensors
            torch.cuda.synchronize(device)
            windows.append([before, promised, 0, 0, time.perf_counter() - t0])
        else:
            logits = model.decode_step(cache, token)
        token = int(logits.argmax())
        windows[-1][2] = torch.cuda.max_memory_allocated(device)
        windows[-1][3] = torch.cuda.max_memory_reserved(device)
    assert torch.isfinite(logits).all()
    assert len(windows) == 1 + -(-(steps - headroom) // GROW_EVERY) >= 3  # the headroom's, then one per growth
    kv_step = GROW_EVERY * model.kv_bytes_per_token()
    one_tensor = cache.transient_bytes()
    for i, (before, promised, peak, reserved, seconds) in enumerate(windows):
        print(f"window {i}: allocated {before / GIB:.3f} GiB, growth_bytes {promised / GIB:.3f} GiB, "
              f"peak allocated {peak / GIB:.3f} GiB (+{(peak - before) / GIB:.3f}), peak reserved "
              f"{reserved / GIB:.3f} GiB, growth + recapture + one step {seconds * 1000:.0f} ms")
        # the transient is one KV tensor (plus decode activations and the new graph's pool),
        # never a second cache
        assert peak - before <= promised + GIB
        assert promised <= kv_step + one_tensor
    # flat: from one growth to the next the peaks rise by the added tokens' KV only (nothing piles
    # up in the allocator), and above the window without growth by one KV tensor more
    grown = len(windows) * kv_step
    for column, slack in ((2, 256 << 20), (3, GIB)):
        peaks = [w[column] for w in windows]
        assert max(peaks[1:]) - min(peaks[1:]) <= grown + slack, peaks
        assert max(peaks[1:]) - peaks[0] <= one_tensor + grown + slack, peaks
