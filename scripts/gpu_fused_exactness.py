"""Which decode op moves a bf16 hybrid's logits away from fp32: the tiny hybrid of
tests/test_model_hybrid_gpu.py decoded with each fused op on and off (and without CUDA graph),
each step's relative error against the fp32 reference beside transformers' bf16 error.

    python scripts/gpu_fused_exactness.py [--steps 9]        (on the device machine)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    from test_model_hybrid_gpu import make_gpu_hybrid

    from superlinear.model.random_weights import random_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = make_gpu_hybrid()
    exact = random_model(base.arch_config, name="gpu-hybrid-fp32", device="cuda", dtype="fp32")
    exact.hf.load_state_dict({k: v.float() for k, v in base.hf.state_dict().items()})
    exact = exact.with_attention(fast_paths=False, cuda_graph=False)
    ids = torch.randint(0, 2048, (900,), generator=torch.Generator().manual_seed(1)).tolist()

    def run(model) -> list[torch.Tensor]:
        cache = model.new_cache(1000)
        out = [model.prefill(cache, ids, chunk_size=512)]
        for token in tokens[:args.steps - 1]:
            out.append(model.decode_step(cache, token))
        return out

    tokens: list[int] = []
    cache = exact.new_cache(1000)
    reference = [exact.prefill(cache, ids, chunk_size=512)]
    for _ in range(args.steps - 1):
        tokens.append(int(reference[-1].argmax()))
        reference.append(exact.decode_step(cache, tokens[-1]))
    rows = {"transformers bf16": run(base.with_attention(fast_paths=False, cuda_graph=False))}
    hybrid = base._shared.hybrid  # noqa: SLF001 - a diagnostic flips the paths chosen at load
    fused = (hybrid.fused_mamba, hybrid.experts)
    for label, mamba, moe, graph in (("ours: fused Mamba + fused MoE, graph", True, True, True),
                                     ("ours: fused Mamba + fused MoE, eager", True, True, False),
                                     ("ours: fused Mamba only, eager", True, False, False),
                                     ("ours: fused MoE only, eager", False, True, False),
                                     ("ours: no fused op, eager", False, False, False)):
        hybrid.fused_mamba = mamba and fused[0]
        hybrid.experts = dataclasses.replace(fused[1], fused_decode=moe and fused[1].fused_decode)
        rows[label] = run(base.with_attention(cuda_graph=graph))
    hybrid.fused_mamba, hybrid.experts = fused
    # the same models stepped in turn (as tests/test_model_hybrid_gpu.py does): what one model's
    # step leaves in state shared with its siblings shows up here and not above
    models = {"interleaved: ours, graph": base, "interleaved: ours, eager": base.with_attention(cuda_graph=False),
              "interleaved: transformers bf16": base.with_attention(fast_paths=False, cuda_graph=False)}
    caches = {label: m.new_cache(1000) for label, m in models.items()}
    outs = {label: [m.prefill(caches[label], ids, chunk_size=512)] for label, m in models.items()}
    for token in tokens[:args.steps - 1]:
        for label, m in models.items():
            outs[label].append(m.decode_step(caches[label], token))
    rows.update(outs)
    table = {label: [round(rel(a, b), 4) for a, b in zip(out, reference, strict=True)] for label, out in rows.items()}
    width = max(map(len, table))
    for label, errors in table.items():
        print(f"{label:<{width}}  " + " ".join(f"{e:.4f}" for e in errors))
    print(json.dumps(table))


if __name__ == "__main__":
    main()
