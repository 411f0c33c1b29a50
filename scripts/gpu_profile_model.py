"""Where a model's prefill chunk and decode step spend their time (torch profiler, CUDA).

    python3 scripts/gpu_profile_model.py MODEL DEPTH [--chunk N] [--top K]

Prefills DEPTH tokens, then profiles one more prefill chunk and one eager decode step (kernel
count, host time, GPU time per kernel family), and times CUDA-graph decode steps with events.
MODEL is any spec (random:superlinear-exp-30b builds the 30B shape with random weights).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from superlinear.model import load_model
from superlinear.plugins.bench.lengths import parse_length


def gpu_table(prof, top: int) -> tuple[str, float, int]:
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
    kernels = [e for e in events if e.self_device_time_total > 0]
    total_us = sum(e.self_device_time_total for e in kernels)
    count = sum(e.count for e in kernels)
    kernels.sort(key=lambda e: -e.self_device_time_total)
    lines = [f"{'GPU us':>10} {'%':>5} {'calls':>6}  kernel"]
    for e in kernels[:top]:
        lines.append(f"{e.self_device_time_total:10.0f} {100 * e.self_device_time_total / total_us:5.1f} "
                     f"{e.count:6d}  {e.key[:110]}")
    return "\n".join(lines), total_us, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("depth")
    parser.add_argument("--chunk", default=None)
    parser.add_argument("--top", type=int, default=22)
    args = parser.parse_args()
    depth = parse_length(args.depth)
    t0 = time.perf_counter()
    model = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s: {model.num_parameters() / 1e9:.2f}B "
          f"parameters, forward {model.forward_info()}")
    chunk = parse_length(args.chunk) if args.chunk else model.prefill_chunk_size()
    vocab = int(model.hf.config.vocab_size)
    ids = torch.randint(1000, vocab - 1, (depth + chunk + 64,), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(depth + chunk + 64)
    model.prefill(cache, ids[:chunk + 17], chunk_size=chunk)  # compile both chunk shapes
    cache.truncate(0, recurrent_state=cache.recurrent_state() if cache.has_recurrent_state else None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = model.prefill(cache, ids[:depth], chunk_size=chunk)
    torch.cuda.synchronize()
    print(f"prefill of {depth} tokens (chunk {chunk}): {time.perf_counter() - t0:.2f} s; "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        logits = model.prefill(cache, ids[depth:depth + chunk], chunk_size=chunk)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    table, gpu_us, count = gpu_table(prof, args.top)
    print(f"\n== one prefill chunk of {chunk} at depth {depth}: wall {wall * 1e3:.1f} ms, GPU {gpu_us / 1e3:.1f} ms, "
          f"{count} kernels ({chunk / wall:,.0f} tok/s)\n{table}")

    eager = model.with_attention(cuda_graph=False)
    token = int(logits.argmax())
    for _ in range(3):
        token = int(eager.decode_step(cache, token).argmax())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        token = int(eager.decode_step(cache, token).argmax())
        wall = time.perf_counter() - t0
    table, gpu_us, count = gpu_table(prof, args.top)
    print(f"\n== one eager decode step at depth {cache.position}: wall {wall * 1e3:.1f} ms, GPU {gpu_us / 1e3:.2f} ms, "
          f"{count} kernels\n{table}")

    if model.cuda_graph:
        for _ in range(3):
            token = int(model.decode_step(cache, token).argmax())
        torch.cuda.synchronize()
        steps = 32
        t0 = time.perf_counter()
        for _ in range(steps):
            token = int(model.decode_step(cache, token).argmax())
        torch.cuda.synchronize()
        step = (time.perf_counter() - t0) / steps
        print(f"\n== CUDA-graph decode at depth {cache.position}: {step * 1e3:.2f} ms/token ({1 / step:.1f} tok/s), "
              f"graph error: {model.info()['cuda_graph_error']}")


if __name__ == "__main__":
    main()
