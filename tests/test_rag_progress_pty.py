"""`spl rag ingest` of a corpus whose prefill takes tens of seconds on this CPU, in a terminal
(pexpect): the time estimate is printed first, the prefill bar advances, the ingest succeeds.

The corpus is sized from the speed this server measures on a short calibration prompt, so the
prefill lasts about ``TARGET_S`` whatever the machine's load (bounded: the test costs well under a
minute); the bar redraws every half second, so that is many redraws."""

from __future__ import annotations

import os
import sys

import httpx
import pytest

pytestmark = pytest.mark.slow

TARGET_S = 8  # the prefill should take about this long (the corpus grows with the context: more), twice
# the 4 s the test needs to watch the bar redraw (every 0.5 s)
# ...but never more tokens than this: the calibration's short prompt overstates the speed of a
# long context (superlinear attention's per-token cost grows with it): 12K tokens sized from a
# fast calibration ran for over 20 minutes on a loaded CPU
MAX_TOKENS = 5000

_WORDS = ("river", "archive", "lantern", "harbor", "meadow", "copper", "signal", "orchard", "glacier",
          "market", "ledger", "compass", "thistle", "quarry", "beacon", "willow")


def _sentence(i: int) -> str:
    a, b, c = _WORDS[i % 16], _WORDS[(i * 7 + 3) % 16], _WORDS[(i * 11 + 5) % 16]
    return f"Record {i}: the {a} near the {b} was logged with {c} number {i * 37 % 1000}."


def _text(first: int, n: int) -> str:
    return "\n".join(_sentence(i) for i in range(first, first + n)) + "\n"


@pytest.fixture(scope="module")
def server(one_thread_server):
    """conftest's ``one_thread_server``: its 256-token prefill chunks move the bar every few
    seconds even on a loaded CPU."""
    return one_thread_server


def _calibrate(server) -> tuple[float, float]:
    """(prefill tokens/s, tokens per sentence) measured on this server now."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                   json={"messages": [{"role": "user", "content": _text(0, 24)}], "max_tokens": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["timings"]["prefill_tokens_per_s"], body["usage"]["prompt_tokens"] / 24


def test_ingest_shows_estimate_and_an_advancing_bar(server, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    rate, per_sentence = _calibrate(server)
    tokens = min(MAX_TOKENS, int(rate * TARGET_S))
    sentences = int(tokens / per_sentence)
    docs = tmp_path / "docs"
    docs.mkdir()
    for k in range(4):  # a few files, as a real folder has
        (docs / f"part{k}.txt").write_text(_text(k * sentences // 4, sentences // 4))
    max_seq_len = (tokens + 3000) // 1024 * 1024 + 1024
    env = {**os.environ, "SPL_SERVER_URL": server.url, "SPL_WORKSPACES_DIR": str(tmp_path / "ws"),
           "SPL_STATE_DIR": str(tmp_path / "state"), "TERM": "xterm", "COLUMNS": "120", "LINES": "30"}
    child = pexpect.spawn(sys.executable, ["-m", "superlinear.cli.main", "rag", "ingest", str(docs), "-w", "long",
                                           "--max-seq-len", str(max_seq_len)],
                          env=env, encoding="utf-8", timeout=TARGET_S * 4, dimensions=(30, 120))
    child.logfile_read = open(tmp_path / "ingest-pty.log", "w")
    percentages: set[int] = set()
    try:
        # the estimate, from the speed the calibration measured, before the prefill starts
        child.expect(r"prefilling the documents \(~?[\d,]+ tokens\) into session \S+: about .+ at [\d,]+ tokens/s")
        while True:
            i = child.expect([r"(\d{1,3})%", r"context: (\d+) tokens in snapshot (\S+), prefill ([\d.]+) s"])
            if i == 0:
                percentages.add(int(child.match.group(1)))
                continue
            context_tokens, prefill_s = int(child.match.group(1)), float(child.match.group(3))
            break
        child.expect(pexpect.EOF)
    finally:
        child.close()
    log = (tmp_path / "ingest-pty.log").read_text()
    assert child.exitstatus == 0, log[-2000:]
    assert len([p for p in percentages if 0 < p < 100]) >= 2, (percentages, log[-2000:])  # it advanced
    assert context_tokens >= tokens * 0.8
    assert prefill_s > 4, (prefill_s, rate)  # long enough to watch the bar (it redraws every 0.5 s)
    assert "ReadTimeout" not in log and "error" not in log.lower()
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["prefill"]["tokens"] >= context_tokens - 2
    print(f"calibrated {rate} tokens/s; ingest of {context_tokens} tokens prefilled in {prefill_s} s; "
          f"bar showed {sorted(percentages)}")
