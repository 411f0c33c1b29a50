"""`spl bench serve` against a real server (the shared default-model one, on a free port, with an
API key from the environment): its JSON is consistent (counts, ordered percentiles, throughput
= tokens / time, ratios, provenance) at fixed concurrencies, under Poisson arrivals with
sessions (the history's tokens come back as cached) and in the long-prefill mix; an unreachable
server or a refused key is one line and exit 2, and server errors are counted, not a crash."""

from __future__ import annotations

import json

import pytest
from server_helpers import free_port, spl

from superlinear.plugins.bench.serve_stats import markdown

PROVENANCE_KEYS = {"date", "git_commit", "git_dirty", "versions", "device_info", "command"}
DISTRIBUTIONS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")


def bench(server, *args: str, env: dict | None = None):
    done = spl(server, "bench", "serve", *args, env=env, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def run_json(server, *args: str) -> dict:
    done = bench(server, *args, "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout)


def check_level(level: dict) -> None:
    """What every level must satisfy, whatever the server's speed."""
    assert level["completed"] + level["errors"] == level["requests"]
    for name in DISTRIBUTIONS:
        dist = level[name]
        if dist["n"]:
            assert dist["p50"] <= dist["p90"] <= dist["p99"], (name, dist)
            assert dist["p50"] > 0
    # per request TTFT <= end-to-end, so every percentile keeps that order
    for p in ("p50", "p90", "p99"):
        assert level["ttft_s"][p] <= level["e2e_s"][p]
    assert level["duration_s"] >= level["e2e_s"]["p99"]
    out = level["output_tokens"]
    assert level["output_throughput"] == pytest.approx(out["total"] / level["duration_s"], rel=1e-9)
    assert level["request_throughput"] == pytest.approx(level["completed"] / level["duration_s"], rel=1e-9)
    assert 1 <= out["total"] <= out["asked_total"]
    assert (out["short"] == 0) == (out["total"] == out["asked_total"])
    assert out["counted"] == ["usage"]  # spl reports usage in the stream
    # a request of k tokens has at most k - 1 gaps between its token chunks
    assert level["itl_s"]["n"] <= out["total"] - level["completed"]
    prompt = level["prompt_tokens"]
    assert prompt["new"] == prompt["total"] - prompt["cached"]


def test_concurrency_levels(server):
    result = run_json(server, "--concurrency", "1,2", "--num-prompts", "4", "--prompt-tokens", "32",
                      "--output-tokens", "4")
    assert PROVENANCE_KEYS <= set(result) and result["git_commit"]
    assert result["device_info"]["type"] == "host" and result["device_info"]["cpus"] >= 1  # the client's
    assert result["target"]["url"] == server.url  # from $SPL_SERVER_URL, as the other commands
    assert result["target"]["model"] == "default" and result["target"]["device"] == "cpu"
    assert result["prompt_sizing"] == "tokenize" and result["warmup"]["ok"]
    levels = result["levels"]
    assert [lv["label"] for lv in levels] == ["c=1", "c=2"]
    for level in levels:
        check_level(level)
        assert level["requests"] == 4 and level["completed"] == 4 and level["errors"] == 0
        # real text sized in the server's tokens: the prompt the server prefilled has ~32 tokens
        assert abs(level["prompt_tokens"]["mean"] - 32) <= 2
        # each prompt is its own text: a prefix cache can reuse at most the chat template's tokens
        assert level["prompt_tokens"]["cached"] <= level["completed"] * result["template_tokens"]
        assert level["itl_s"]["n"] > 0 and level["tpot_s"]["n"] > 0
    one, two = levels
    assert one["ratio_to_c1"] == 1.0
    assert two["ratio_to_c1"] == pytest.approx(two["output_throughput"] / one["output_throughput"])


def test_poisson_arrivals_with_sessions(server, http):
    result = run_json(server, "--request-rate", "20", "--sessions", "--turns", "2", "--num-prompts", "4",
                      "--prompt-tokens", "32", "--output-tokens", "2", "--seed", "1")
    (level,) = result["levels"]
    check_level(level)
    assert level["label"] == "rate 20/s" and level["request_rate"] == 20
    assert level["completed"] == 4 and level["ratio_to_c1"] is None
    # two conversations of two turns: each second turn resends the first, which the session holds
    assert level["prompt_tokens"]["cached"] >= 2 * 32 - 4
    assert result["settings"]["sessions"] and result["settings"]["turns"] == 2
    left = [s["id"] for s in http.get("/v1/sessions").json()["data"] if s["id"].startswith("bench-")]
    assert left == []  # the bench removes the sessions it made


def test_long_prefill_mix(server):
    result = run_json(server, "--mix", "long-prefill", "--long-prompt-tokens", "256", "--concurrency", "1",
                      "--num-prompts", "2", "--prompt-tokens", "32", "--output-tokens", "1")
    (level,) = result["levels"]
    check_level(level)
    assert level["label"] == "c=1 + long" and level["ratio_to_c1"] is None
    long = level["long"]
    assert long["ok"] and long["error"] is None and long["output_tokens"] == 1
    assert abs(long["prompt_tokens"] - 256) <= 4
    assert long["ttft_s"] <= long["e2e_s"]
    # the chats start once the server took the long request and stop when it ends
    assert 1 <= long["chats_started_during"] == level["requests"] <= 2
    assert 0 <= long["chats_first_token_during"] <= level["completed"]
    assert abs(level["prompt_tokens"]["asked_mean"] - 32) < 1e-9  # the chats only, not the long one


def test_duration_bounds_a_level(server):
    # both workers send their first request at once; a request that ends within the 0.1 s may be
    # followed by another, but the level stops far short of its 50 prompts
    result = run_json(server, "--concurrency", "2", "--duration", "0.1", "--num-prompts", "50",
                      "--prompt-tokens", "16", "--output-tokens", "1")
    (level,) = result["levels"]
    assert level["requests"] == level["completed"]
    assert 2 <= level["requests"] <= 10, level["requests"]


def test_unreachable_server_is_one_line_and_exit_2(server):
    env = {**server.env}
    env.pop("SPL_SERVER_URL")
    done = bench(server, "--url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "1", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "cannot reach" in done.stderr


def test_refused_api_key_is_exit_2(server):
    done = bench(server, "--num-prompts", "1", env={**server.env, "SPL_API_KEY": "wrong-key"})
    assert done.returncode == 2 and "refused the API key" in done.stderr


def test_server_errors_are_counted(server):
    done = bench(server, "--model", "no-such-model", "--num-prompts", "2", "--prompt-tokens", "32",
                 "--output-tokens", "2", "--json")
    assert done.returncode == 1  # a run with failed requests is not a clean benchmark
    (level,) = json.loads(done.stdout)["levels"]
    assert level["requests"] == 2 and level["errors"] == 2 and level["completed"] == 0
    assert level["error_messages"][0].startswith("HTTP 404") and "no-such-model" in level["error_messages"][0]
    assert level["output_throughput"] == 0 and level["ttft_s"]["n"] == 0
    assert "2 requests failed" in done.stderr
    table = markdown(json.loads(done.stdout))  # what the command prints without --json
    assert "| c=1 | 0 / 2 |" in table and "- c=1: HTTP 404" in table


@pytest.mark.parametrize(("args", "message"), [
    (("--prompt-tokens", "0"), "--prompt-tokens must be from 1"),
    (("--output-tokens", "9:3"), "low <= high"),
    (("--concurrency", "1,x"), "--concurrency must be comma-separated"),
    (("--long-prompt-tokens", "1K:2K"), "one length"),
    (("--mix", "long-prefill", "--request-rate", "2"), "fixed --concurrency"),
    (("--concurrency", "2", "--request-rate", "2"), "not both"),
])
def test_bad_options_exit_2(server, args, message):
    done = bench(server, *args)
    assert done.returncode == 2 and message in done.stderr

