"""Persist cost of a session journal: the whole journal vs the incremental persist after one
turn, and what rewriting the whole state would cost (default model).

    .venv/bin/python scripts/journal_bench.py [WORDS]   # WORDS of filler in the first message
"""
import shutil
import sys
import tempfile
import time

from superlinear.engine import ChatRequest, Done, SamplingParams, run_turn
from superlinear.model import load_model
from superlinear.sessions import SessionManager, SnapshotStore

n_words = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
model = load_model("default")
kvpt = model.layout.kv_bytes_per_token(model.dtype)
tmp = tempfile.mkdtemp(prefix="jbench-")
m = SessionManager(model, SnapshotStore(tmp), default_max_seq_len=8192)
m.create("b")


def turn(text, n=8):
    with m.use("b") as s:
        conv = s.conversation
        req = ChatRequest(messages=conv.transcript + [{"role": "user", "content": text}],
                          sampling=SamplingParams(temperature=0.0, max_tokens=n))
        return [e for e in run_turn(conv, req) if isinstance(e, Done)][-1]


def timed_persist():
    t = time.perf_counter()
    m.persist("b")
    return time.perf_counter() - t


long = " ".join(f"word{i % 97}" for i in range(n_words))
turn("Summarise: " + long)
full_s = timed_persist()
s = m._lookup("b")
p0, full_b = s.position, s.last_persist_bytes
turn("And in one sentence?", n=16)
p1 = s.position
inc_s = timed_persist()
inc_b = s.last_persist_bytes
print(f"kv_bytes_per_token={kvpt}  position {p0} -> {p1} (+{p1 - p0} tokens)")
print(f"first persist (whole journal): {full_b / 2**20:.1f} MiB in {full_s * 1000:.0f} ms")
print(f"persist after the turn: {inc_b / 2**20:.2f} MiB in {inc_s * 1000:.0f} ms "
      f"(new rows {(p1 - p0) * kvpt / 2**20:.2f} MiB)")
s._journal = None  # what rewriting the whole state costs now (the pre-journal scheme)
again_s = timed_persist()
print(f"whole-state rewrite at position {p1}: {s.last_persist_bytes / 2**20:.1f} MiB in {again_s * 1000:.0f} ms")
shutil.rmtree(tmp, ignore_errors=True)
