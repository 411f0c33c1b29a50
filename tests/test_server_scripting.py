"""The API people script against, on `spl serve --model default`: logprobs (chat and legacy
completions, echo with prompt log-likelihoods read by lm-evaluation-harness's own client),
structured output, penalties, the model name check, /v1/models' lengths and /metrics."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from server_helpers import user

pytestmark = pytest.mark.slow


# -- logprobs ---------------------------------------------------------------------------------
def test_chat_logprobs_streamed_and_not(client):
    kwargs = dict(model="default", messages=[user("Name a colour.")], max_tokens=5, temperature=0,
                  logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy: the most likely
        assert item.token == item.top_logprobs[0].token and item.bytes == list(item.token.encode())
    assert "".join(i.token for i in content).strip() == r.choices[0].message.content.strip()

    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [i.token for i in streamed] == [i.token for i in content]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-3)

    plain = client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_top_logprobs_need_logprobs_and_are_bounded(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="default", messages=[user("hi")], top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="default", messages=[user("hi")], logprobs=True, top_logprobs=21)


def test_completion_echo_logprobs_cover_the_prompt(http, default_model):
    prompt = "The capital of France is"
    ids = default_model.tokenizer.encode(prompt)
    r = http.post("/v1/completions", json={"model": "default", "prompt": prompt, "max_tokens": 2, "temperature": 0,
                                           "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert len(lp["tokens"]) == len(ids) + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes the first token
    assert all(v <= 0 for v in lp["token_logprobs"][1:]) and all(len(t) == 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][len(ids)] == len(prompt)  # the generated text starts after the echo
    # without logprobs there is no logprobs object, with or without echo
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "echo": True})
    assert r.json()["choices"][0]["logprobs"] is None


def test_completion_logprobs_streamed_match_the_answer(http):
    from server_helpers import sse_chunks

    body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    tokens, logprobs, text = [], [], ""
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for chunk in sse_chunks(r):
            choice = chunk["choices"][0]
            text += choice["text"]
            if choice["logprobs"]:
                tokens += choice["logprobs"]["tokens"]
                logprobs += choice["logprobs"]["token_logprobs"]
    assert text == whole["text"] and tokens == whole["logprobs"]["tokens"]
    assert logprobs[0] is None and logprobs[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-3)


def _reference_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The in-process model: one prefill per prefix, the next token's log-softmax."""
    ids, total, greedy = context + continuation, 0.0, True
    for i in range(len(context), len(ids)):
        logits = model.prefill(model.new_cache(len(ids)), ids[:i])
        logprobs = torch.log_softmax(logits.float(), -1)
        total += float(logprobs[ids[i]])
        greedy &= int(logprobs.argmax()) == ids[i]
    return total, greedy


# A small multiple-choice task: each context with its candidate continuations.
TASK = [("The capital of France is", [" Paris", " Berlin", " a city"]),
        ("Two plus two equals", [" four", " five"]),
        ("Water freezes at zero degrees", [" Celsius", " Fahrenheit"])]


def test_lm_eval_local_completions_matches_the_model(server, default_model, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from superlinear.model.default import ensure_default

    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="default",
                             tokenizer=str(ensure_default()), tokenizer_backend="huggingface",
                             num_concurrent=1, max_retries=1, batch_size=1, timeout=300)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=i)
                for i, (ctx, conts) in enumerate(TASK) for cont in conts]
    results = lm.loglikelihood(requests)
    assert len(results) == len(requests)
    for req, (logprob, greedy) in zip(requests, results, strict=True):
        context, continuation = lm._encode_pair(*req.args)
        ref_logprob, ref_greedy = _reference_loglikelihood(default_model, context, continuation)
        assert logprob == pytest.approx(ref_logprob, abs=1e-4), req.args  # measured: 6e-6 at most
        assert greedy == ref_greedy, req.args

    out = lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                      arguments=("The capital of France is", {"until": ["."], "max_gen_toks": 8}))])
    assert len(out) == 1 and isinstance(out[0], str) and "." not in out[0]


# -- structured output ------------------------------------------------------------------------
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
          "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24},
                         "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}}


def test_response_format_json_schema(client):
    r = client.chat.completions.create(
        model="default", messages=[user("Describe Paris as JSON with city, country and population.")],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_response_format_json_object(client):
    r = client.chat.completions.create(
        model="default", messages=[user("Give me a JSON object about a cat.")], max_tokens=60, temperature=0.7,
        seed=3, top_p=0.9, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of a JSON object
        assert r.choices[0].message.content.startswith("{")


def test_response_format_on_completions(http):
    r = http.post("/v1/completions", json={"prompt": "A JSON object with a name:", "max_tokens": 40, "temperature": 0,
                                           "response_format": {"type": "json_schema", "json_schema": {
                                               "name": "n", "schema": SCHEMA}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice["text"]
    jsonschema.validate(json.loads(choice["text"]), SCHEMA)


def test_bad_response_format_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=[user("hi")],
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert err.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[user("hi")], response_format={"type": "xml"})


# -- penalties --------------------------------------------------------------------------------
def _generated_tokens(http, **fields) -> list[str]:
    r = http.post("/v1/completions", json={"prompt": "the the the the the the the the", "max_tokens": 8,
                                           "temperature": 0, "logprobs": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def test_penalties_change_what_is_generated(http):
    plain = _generated_tokens(http)  # greedy: "-the-future-of-the", a "-" every other token
    assert plain.count("-") >= 3 and "the" in plain
    # the output's repeats are pushed down: fewer "-"
    assert _generated_tokens(http, presence_penalty=2.0).count("-") < plain.count("-")
    assert _generated_tokens(http, frequency_penalty=2.0).count("-") < plain.count("-")
    # repeat_penalty counts the prompt too: "the" is not generated again
    assert "the" not in [t.strip() for t in _generated_tokens(http, repeat_penalty=5.0)]


def test_logit_bias_through_the_api(http):
    berlin = http.post("/tokenize", json={"content": " Berlin", "add_special": False}).json()["tokens"][0]
    body = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] != " Berlin"
    biased = http.post("/v1/completions", json={**body, "logit_bias": {str(berlin): 100}})
    assert biased.json()["choices"][0]["text"] == " Berlin"
    r = http.post("/v1/completions", json={**body, "logit_bias": {"60000": 1}})  # past the vocabulary (49152)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_penalty_and_min_p_bounds_are_enforced(client):
    for field, value in (("frequency_penalty", 2.5), ("presence_penalty", -2.5), ("min_p", 1.5),
                         ("repeat_penalty", 0)):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="default", messages=[user("hi")], extra_body={field: value})
        assert err.value.body["param"] == field


# -- the model a request names ----------------------------------------------------------------
def test_unknown_model_is_404_model_not_found(client, http):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[user("hi")], max_tokens=1)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    r = http.post("/v1/completions", json={"model": "gpt-4o", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    served = client.models.list().data[0].id
    for name in (served, "default"):
        assert client.chat.completions.create(model=name, messages=[user("hi")], max_tokens=1).choices
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})  # no model: the one served
    assert r.status_code == 200


def test_models_report_the_context_limit_and_the_memory_limit(http):
    card = http.get("/v1/models").json()["data"][0]
    # the server's --max-seq-len (vLLM's --max-model-len), where the trained context is 8192
    assert card["max_model_len"] == 2048 and card["info"]["max_position_embeddings"] == 8192
    assert isinstance(card["max_seq_len_limit"], int) and card["max_seq_len_limit"] > 0
    assert http.post("/tokenize", json={"content": "hi"}).json()["max_model_len"] == 2048


# -- metrics ----------------------------------------------------------------------------------
def test_metrics_latency_histograms_and_gauges(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="default", messages=[user("Say hi.")], max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("spl_time_to_first_token_seconds", "spl_time_per_output_token_seconds",
                 "spl_e2e_request_latency_seconds"):
        assert families[name].type == "histogram"
        count = next(s.value for s in families[name].samples if s.name == name + "_count")
        assert count >= 1, name
    for name in ("spl_requests_running", "spl_requests_waiting", "spl_cache_usage_ratio"):
        assert families[name].type == "gauge"
    assert 0 <= families["spl_cache_usage_ratio"].samples[0].value <= 1
    assert not [line for line in text.splitlines() if "_created" in line]
