"""A checkpoint in NVIDIA's layout (``backbone.`` prefix, one tensor per expert, several shards
and an index) loads shard by shard: the loading process never holds more than about one shard
beyond the weights it builds (measured in a subprocess: its peak resident memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from checkpoint_writer import nvidia_names, write_shards

MiB = 1 << 20
# What the loading process may hold beyond the weights it built and one shard: allocator and
# import noise. The read-everything loader needed the whole checkpoint plus a stacked copy of
# the experts on top (here ~1 GiB more), so this bound separates the two clearly.
SLACK = 256 * MiB

# 4 MoE layers of 64 experts (64 x 2 x 512 x 1024 bf16 = 128 MiB each): ~540 MB on disk, ~1.1 GB
# once loaded in fp32 on the CPU.
CONFIG = {
    "model_type": "superlinear-exp", "vocab_size": 1024, "hidden_size": 1024,
    "hybrid_override_pattern": "ME*EMEME", "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "mamba_num_heads": 16, "mamba_head_dim": 64, "n_groups": 1, "ssm_state_size": 16, "conv_kernel": 4,
    "chunk_size": 64, "n_routed_experts": 64, "num_experts_per_tok": 4, "moe_intermediate_size": 512,
    "moe_shared_expert_intermediate_size": 512, "intermediate_size": 512, "n_group": 1, "topk_group": 1,
    "tie_word_embeddings": False,
    "span_attention_sw_index": 3, "span_attention_num_spans": 2, "span_attention_backward_factor": 2.0,
    "span_attention_forward_factor": 1.0, "span_attention_span_power": 0.5, "span_attention_search_power": 0.5,
}

# Runs in a fresh interpreter: imports everything the load needs first, then resets the
# kernel's peak-RSS mark (/proc/self/clear_refs) so that VmHWM is the load's own peak.
MEASURE = r"""
import json, sys
import psutil, safetensors.torch, torch, transformers
from transformers import AutoTokenizer, NemotronHForCausalLM
from superlinear.model import load_model, loaders, model, superlinear_exp, weights

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = psutil.Process().memory_info().rss
loaded = load_model(sys.argv[1], device="cpu")
tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
           for t in (*loaded.hf.parameters(), *loaded.hf.buffers())}
print(json.dumps({"base": base, "peak": status("VmHWM:"), "weights": sum(tensors.values())}))
"""


def write_big_checkpoint(path):
    from superlinear.model.loaders import build_empty

    hf, _, _ = build_empty(CONFIG, where="test")  # meta tensors: names and shapes, no memory

    def fill(meta):
        return torch.full(meta.shape, 0.01, dtype=torch.bfloat16)

    files = write_shards(path, nvidia_names(hf.state_dict().items(), fill), max_shard_bytes=100 * MiB)
    (path / "config.json").write_text(json.dumps(CONFIG))
    return files


def test_sharded_nvidia_checkpoint_loads_within_one_shard_of_host_memory(tmp_path):
    files = write_big_checkpoint(tmp_path / "ckpt")
    largest = max(f.stat().st_size for f in files)
    total = sum(f.stat().st_size for f in files)
    assert len(files) >= 5 and 60 * MiB < largest <= 101 * MiB and total > 500 * MiB
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "ckpt")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    assert rss["weights"] > 2 * total * 0.95  # bf16 on disk -> fp32 in memory: all of it was loaded
    # on a GPU the weights would live in device memory; on the CPU they are the host's
    beyond = rss["peak"] - rss["base"] - rss["weights"]
    print(f"peak beyond the weights: {beyond / MiB:.0f} MiB, largest shard {largest / MiB:.0f} MiB")
    assert beyond <= largest + SLACK, (
        f"peak host memory {beyond / MiB:.0f} MiB beyond the weights; largest shard {largest / MiB:.0f} MiB")
