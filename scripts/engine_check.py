"""Engine check and overhead measurement on any device, without the real weights.

Builds a random-weight llama of the default model's shape (config + tokenizer from SRC, by
default the converted default model in the cache), then runs engine turns (greedy, sampled,
cancelled, second turn, fork) with superlinear and dense attention and compares the engine's
decode rate with a bare ``decode_step`` + argmax loop.

    python scripts/engine_check.py [SRC]        # N=256 tokens per turn (env N)
"""
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from superlinear.engine import ChatRequest, SamplingParams, TextDelta, run_turn
from superlinear.engine.conversation import Conversation
from superlinear.model import load_model

if len(sys.argv) > 1:
    src = Path(sys.argv[1])
else:
    from superlinear.model.default import ensure_default
    src = Path(ensure_default())
d = Path("/tmp/spl-engine-check")
d.mkdir(exist_ok=True)
cfg = json.loads((src / "config.json").read_text())
torch.manual_seed(0)
hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}, d / "model.safetensors")
for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(src / f, d / f)
del hf

sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

for attention in ("superlinear", "dense"):
    m = load_model(str(d), attention=attention)
    print("model", m.device, m.dtype, m.attention, "cuda_graph", m.cuda_graph, flush=True)
    msgs = [{"role": "user", "content": "What is the capital of France? " * 20}]
    N = int(os.environ.get("N", 256))
    for rep in range(2):
        conv = Conversation(m, 8192)
        ev = list(run_turn(conv, ChatRequest(msgs, sampling=SamplingParams(max_tokens=N))))
        print(attention, "greedy turn", rep, ev[-1].finish_reason, ev[-1].usage, ev[-1].timings, flush=True)
    # bare decode loop for the engine's overhead
    cache = m.new_cache(8192)
    logits = m.prefill(cache, conv.render(msgs, add_generation_prompt=True).ids)
    sync()
    t = time.perf_counter()
    for _ in range(N):
        logits = m.decode_step(cache, int(torch.argmax(logits)))
    sync()
    bare = N / (time.perf_counter() - t)
    print(attention, f"bare decode_step+argmax loop: {bare:.1f} tok/s", flush=True)
    sp = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=5, max_tokens=N)
    outs = []
    for _ in range(2):
        conv = Conversation(m, 8192)
        ev = list(run_turn(conv, ChatRequest(msgs, sampling=sp)))
        outs.append(conv.token_ids)
        print(attention, "sampled turn", ev[-1].usage["completion_tokens"], ev[-1].timings, flush=True)
    print(attention, "same seed same tokens:", outs[0] == outs[1], flush=True)
    # second turn reuse, cancel, fork on CUDA
    nxt = conv.transcript + [{"role": "user", "content": "And Germany?"}]
    before = (conv.position, conv.token_ids)
    cancel = threading.Event()
    for e in run_turn(conv, ChatRequest(nxt, sampling=SamplingParams(max_tokens=50)), cancel):
        if isinstance(e, TextDelta):
            cancel.set()
    print(attention, "cancelled:", e.finish_reason, "unchanged:", (conv.position, conv.token_ids) == before)
    f = conv.fork()
    a = list(run_turn(conv, ChatRequest(nxt, sampling=SamplingParams(max_tokens=32))))[-1]
    b = list(run_turn(f, ChatRequest(nxt, sampling=SamplingParams(max_tokens=32))))[-1]
    print(attention, "second turn usage", a.usage, "fork equal:", a.message == b.message, flush=True)
