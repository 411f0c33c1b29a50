"""The routes users of llama.cpp's and vLLM's servers expect: /tokenize, /detokenize,
/v1/completions (official openai client and httpx), /metrics (parsed with prometheus-client's
own parser, counters moving after a turn) and one structured log line per turn."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import user

pytestmark = pytest.mark.slow


def _error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err) and err["message"]
    return err


def test_tokenize_and_detokenize_round_trip(http):
    text = "Hello, wörld! ☃ 1234"
    r = http.post("/tokenize", json={"content": text, "with_pieces": True})
    assert r.status_code == 200, r.text
    body = r.json()
    tokens = body["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens) and body["count"] == len(tokens)
    assert body["max_model_len"] >= 1
    assert "".join(p["piece"] for p in body["pieces"]) == text
    assert [p["id"] for p in body["pieces"]] == tokens
    back = http.post("/detokenize", json={"tokens": tokens})
    assert back.status_code == 200 and back.json()["content"] == text == back.json()["prompt"]
    # vLLM's spelling: "prompt"; and chat messages through the template
    assert http.post("/tokenize", json={"prompt": text}).json()["tokens"] == tokens
    chat = http.post("/tokenize", json={"messages": [user("hi")]}).json()
    plain = http.post("/tokenize", json={"content": "hi"}).json()
    assert chat["count"] > plain["count"]  # the template's role markers are tokens too


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": "a", "messages": [user("b")]}, "content"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 12]}, "tokens"),
])
def test_tokenizer_routes_refuse_bad_bodies(http, path, body, param):
    err = _error(http.post(path, json=body), 400)
    assert err["param"] == param


def test_tokenizer_routes_need_the_api_key(server):
    with server.http(auth=False) as anon:
        assert anon.post("/tokenize", json={"content": "x"}).status_code == 401
        assert anon.post("/detokenize", json={"tokens": [1]}).status_code == 401


def test_completions_with_the_official_client(client, http):
    prompt = "The capital of France is Paris. The capital of Italy is"
    first = client.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0)
    choice = first.choices[0]
    assert first.object == "text_completion" and choice.text.strip() and choice.finish_reason == "length"
    assert first.usage.completion_tokens == 8 and first.usage.prompt_tokens > 5
    # streamed: the same greedy text, chunk by chunk
    chunks = list(client.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # token ids as the prompt, and a stop string
    ids = http.post("/tokenize", json={"content": prompt, "add_special": True}).json()["tokens"]
    same = client.completions.create(model="default", prompt=ids, max_tokens=8, temperature=0)
    assert same.choices[0].text == choice.text
    word = choice.text.split()[0]
    stopped = client.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].text


@pytest.mark.parametrize("change,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"n": 2}, "n"),
    ({"logprobs": 21}, "logprobs"),  # more alternatives than the limit (20)
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
])
def test_completions_refuse_what_they_cannot_do(http, change, param):
    body = {"model": "default", "prompt": "hello", "max_tokens": 2, **change}
    err = _error(http.post("/v1/completions", json=body), 400)
    assert err["param"] == param


def _metrics(http) -> dict:
    """The samples of /metrics by (name, labels but ``model_name``), which every sample has."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    model = http.get("/v1/models").json()["data"][0]["id"]
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = dict(s.labels)
            assert labels.pop("model_name", None) == model, (s.name, s.labels)
            samples[(s.name, tuple(sorted(labels.items())))] = s.value
    return samples


def _total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_metrics_parse_and_move_after_a_turn(http, server):
    before = _metrics(http)
    for name in ("spl_queue_depth", "spl_generations", "spl_session_memory_bytes",
                 "spl_process_resident_memory_bytes"):
        assert (name, ()) in before, name
    assert ("spl_sessions", (("state", "resident"),)) in before
    r = http.post("/v1/chat/completions", json={"model": "default", "messages": [user("Say hi.")],
                                                 "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    after = _metrics(http)
    assert _total(after, "spl_prompt_tokens_total") - _total(before, "spl_prompt_tokens_total") \
        == usage["prompt_tokens"]
    assert _total(after, "spl_completion_tokens_total") - _total(before, "spl_completion_tokens_total") \
        == usage["completion_tokens"]
    assert _total(after, "spl_turns_total") == _total(before, "spl_turns_total") + 1
    assert _total(after, "spl_prefill_seconds_count") == _total(before, "spl_prefill_seconds_count") + 1
    for histogram in ("spl_request_queue_time_seconds", "spl_request_prompt_tokens", "spl_request_generation_tokens"):
        assert _total(after, histogram + "_count") == _total(before, histogram + "_count") + 1, histogram
    assert _total(after, "spl_request_prompt_tokens_sum") - _total(before, "spl_request_prompt_tokens_sum") \
        == usage["prompt_tokens"]
    key = ("spl_requests_total", (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200")))
    assert after.get(key, 0) == before.get(key, 0) + 1
    assert after[("spl_decode_tokens_per_second", ())] > 0
    # and the turn's one JSON log line
    deadline = time.time() + 10
    while time.time() < deadline:
        lines = [json.loads(line.split("spl.turn: ", 1)[1]) for line in server.log.read_text().splitlines()
                 if "spl.turn: " in line and '"event":"turn"' in line]
        if any(x["completion_tokens"] == usage["completion_tokens"] and x["prompt_tokens"] == usage["prompt_tokens"]
               for x in lines):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no structured log line for the turn")
    line = lines[-1]
    assert {"finish", "prefill_s", "decode_tok_s", "cached_tokens", "queued_s", "session"} <= set(line)
