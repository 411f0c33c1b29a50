"""On a CUDA machine: the server stays responsive during a very long prefill, and a client that
leaves mid-prefill frees the GPU within about one chunk.

SPL_GPU_TEST_MODEL picks the model (default: ``default``); SPL_GPU_LONG_TOKENS the prompt
length (default 1,000,000). Measured numbers are printed, and written to $OUT/server_gpu.json
when OUT is set.
"""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
from server_helpers import start_server

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="module")
def gpu_server():
    if not _cuda():
        pytest.skip("needs a CUDA GPU")
    n = int(os.environ.get("SPL_GPU_LONG_TOKENS", 1_000_000))
    model = os.environ.get("SPL_GPU_TEST_MODEL", "default")
    server = start_server(api_key=None, extra_args=("--model", model, "--device", "cuda",
                                                    "--max-seq-len", str(int(n * 1.2) + 4096)))
    yield server, n
    server.stop()


def _prompt(n_tokens: int) -> str:
    # These words average 1.125 tokens each in SmolLM2's tokenizer.
    words = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa")
    return " ".join(words[i % 8] for i in range(int(n_tokens / 1.125)))


def test_long_prefill_keeps_server_responsive_and_disconnect_stops_it(gpu_server):
    server, n = gpu_server
    numbers: dict = {"prompt_words": n}
    http = httpx.Client(base_url=server.url, timeout=1800)
    body = {"messages": [{"role": "user", "content": _prompt(n)}], "max_tokens": 4, "temperature": 0,
            "session_id": "long"}
    result: dict = {}

    def long_turn():
        t = time.perf_counter()
        result["r"] = http.post("/v1/chat/completions", json=body)
        result["wall_s"] = time.perf_counter() - t

    worker = threading.Thread(target=long_turn)
    worker.start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as probe:
        while worker.is_alive():
            for path in ("/health", "/v1/sessions", "/v1/snapshots", "/v1/models"):
                t = time.perf_counter()
                assert probe.get(path).status_code == 200
                latencies.append(time.perf_counter() - t)
            time.sleep(0.05)
    worker.join()
    r = result["r"]
    assert r.status_code == 200, r.text[:500]
    out = r.json()
    numbers.update(long_turn_wall_s=round(result["wall_s"], 2), usage=out["usage"], timings=out["timings"],
                   probes=len(latencies), probe_max_s=round(max(latencies), 4),
                   probe_median_s=round(sorted(latencies)[len(latencies) // 2], 4))
    assert max(latencies) < 1.0

    # Follow-up turn on the long session: only the new tokens are prefilled.
    r2 = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Summarise."}],
                                                 "max_tokens": 4, "session_id": "long", "temperature": 0})
    assert r2.status_code == 200, r2.text[:300]
    numbers["second_turn"] = {"usage": r2.json()["usage"], "timings": r2.json()["timings"]}
    assert r2.json()["timings"]["tokens_reused"] >= out["usage"]["prompt_tokens"]
    http.delete("/v1/sessions/long")

    # Leave mid-prefill: close the stream at its first progress chunk (the prompt is being
    # prefilled then); the turn is cancelled within about one step and leaves nothing behind.
    short = max(n // 2, 16384)
    leave_body = {**body, "session_id": "leaver", "stream": True, "return_progress": True,
                  "messages": [{"role": "user", "content": _prompt(short)}]}
    with httpx.Client(base_url=server.url, timeout=600) as c:
        t0 = time.perf_counter()
        with c.stream("POST", "/v1/chat/completions", json=leave_body) as stream:
            # the stream opens with the role (and session) chunk; the progress chunks follow
            seen = next(line for line in stream.iter_lines()
                        if "prompt_progress" in line or '"content": "' in line and '"content": ""' not in line
                        or line == "data: [DONE]")
        left_at = time.perf_counter() - t0
    assert "prompt_progress" in seen, f"the prompt was prefilled before any progress chunk: {seen[:300]}"
    t1 = time.perf_counter()
    tiny = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 1})
    assert tiny.status_code == 200
    numbers["leave"] = {"prompt_words": short, "left_after_s": round(left_at, 2),
                        "next_request_wall_s": round(time.perf_counter() - t1, 3),
                        "next_request_queued_s": tiny.json()["timings"]["queued_s"]}
    deadline = time.perf_counter() + 30
    while (info := http.get("/v1/sessions/leaver")).status_code == 200 and info.json()["busy"]:
        assert time.perf_counter() < deadline, "the abandoned prefill still runs 30 s later"
        time.sleep(0.05)
    numbers["leave"]["stopped_after_s"] = round(time.perf_counter() - t0 - left_at, 3)
    if info.status_code == 200:
        numbers["leave"]["session_after"] = {k: info.json()[k] for k in ("position", "message_count", "busy")}
        assert info.json()["message_count"] == 0 and info.json()["position"] == 0
    health = http.get("/health").json()
    numbers["health_after"] = health
    print(json.dumps(numbers, indent=2))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "server_gpu.json"), "w") as f:
            json.dump(numbers, f, indent=2)
    assert numbers["leave"]["next_request_queued_s"] < 10.0
