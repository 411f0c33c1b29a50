"""Every request field honoured or refused, constrained output on every field that asks for it,
and the vLLM/llama.cpp generation knobs, on `spl serve --model default` through the official
`openai` client and httpx (the shared server; short generations: the default model is slow on
a small CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import user

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text[:500]
    return r.json()["error"]


def _chat(http, **body) -> dict:
    r = http.post("/v1/chat/completions", json={"model": "default", "temperature": 0, **body})
    assert r.status_code == 200, r.text[:500]
    return r.json()


# -- unknown, accepted and refused fields ------------------------------------------------------
UNKNOWN = ["max_token", "temprature", "top-p", "topk", "stream_option", "respone_format", "tool", "toolchoice",
           "guided_jsn", "guidedregex", "guided_choices", "structured_output", "gramar", "jsonschema",
           "min_token", "ignore_eos_token", "stop_tokens", "npredict", "presense_penalty", "frequency_penality",
           "logit_biases", "seeds", "max_completion_token", "sessionid", "reasoning_budgets", "foo", "bar_baz",
           "mirostat", "tfs_z", "dry_multiplier"]


def test_thirty_unknown_or_misspelled_fields_are_each_a_400_naming_it(http):
    assert len(set(UNKNOWN)) == 30
    for name in UNKNOWN:
        err = _error(http.post("/v1/chat/completions",
                               json={"messages": [user("hi")], "max_tokens": 1, name: 1}))
        assert err["param"] == name and err["code"] == "unknown_parameter", err
        assert err["type"] == "invalid_request_error" and repr(name) in err["message"]
    assert "did you mean 'max_tokens'" in _error(http.post("/v1/completions", json={"prompt": "a", "max_token": 1}))[
        "message"]


def test_fields_clients_send_are_accepted_and_refused_ones_say_so(client, http):
    r = client.chat.completions.create(
        model="default", messages=[user("hi")], max_tokens=1, user="u1", metadata={"k": "v"}, store=False,
        service_tier="auto", parallel_tool_calls=True,
        extra_body={"cache_prompt": True, "guided_decoding_backend": "xgrammar", "spaces_between_special_tokens": True})
    assert r.usage.completion_tokens == 1
    for route, name, value in (("/v1/chat/completions", "functions", []), ("/v1/completions", "suffix", "x"),
                               ("/v1/chat/completions", "use_beam_search", True)):
        body = {"messages": [user("hi")]} if route == "/v1/chat/completions" else {"prompt": "a"}
        err = _error(http.post(route, json={**body, name: value}))
        assert err["param"] == name and err["code"] == "unsupported_parameter", err


def test_lenient_fields_server_ignores_unknown_fields(persist_shutdown_server):
    server = persist_shutdown_server  # conftest's: started with --lenient-fields
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"messages": [user("hi")], "max_tokens": 2, "temprature": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 2
    assert "'temprature'" in server.log.read_text()  # ignored, and said so in the log (before the answer)


def test_docs_table_is_the_field_table():
    from superlinear.plugins.serve.fields import markdown_rows

    assert markdown_rows() in (ROOT / "docs" / "server.md").read_text()


# -- constrained output: 20 cases through every field that asks for it ------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
COLOUR = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]}
GBNF = 'root ::= "The answer is " ("yes" | "no") "."'
LARK = 'start: "A-" DIGIT DIGIT\nDIGIT: /[0-9]/'
ASK = "Answer briefly: is the sky blue? Describe a person, a colour or a code if asked."


def _schema_check(schema):
    return lambda text: jsonschema.validate(json.loads(text), schema)


def _regex_check(pattern):
    return lambda text: re.fullmatch(pattern, text) or pytest.fail(f"{text!r} does not match {pattern!r}")


def _choice_check(choices):
    return lambda text: text in choices or pytest.fail(f"{text!r} not in {choices}")


CASES = [  # (route, field, value, check)
    ("chat", "response_format", {"type": "json_schema", "json_schema": {"name": "f", "schema": FLAG}},
     _schema_check(FLAG)),  # (json_object: test_server_scripting; any object may run past max_tokens)
    ("chat", "response_format", {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
     _schema_check(PERSON)),
    ("chat", "response_format", {"type": "json_schema", "json_schema": {"name": "c", "schema": COLOUR}},
     _schema_check(COLOUR)),
    ("chat", "guided_json", PERSON, _schema_check(PERSON)),
    ("chat", "guided_json", json.dumps(FLAG), _schema_check(FLAG)),
    ("chat", "guided_regex", r"[0-9]{3}", _regex_check(r"[0-9]{3}")),
    ("chat", "guided_regex", r"(cat|dog)s?", _regex_check(r"(cat|dog)s?")),
    ("chat", "guided_choice", ["yes", "no"], _choice_check(["yes", "no"])),
    ("chat", "guided_choice", ["red wine", "white wine", "water"], _choice_check(["red wine", "white wine", "water"])),
    ("chat", "guided_grammar", GBNF, _regex_check(r"The answer is (yes|no)\.")),
    ("chat", "guided_grammar", LARK, _regex_check(r"A-[0-9]{2}")),
    ("chat", "structured_outputs", {"json": COLOUR}, _schema_check(COLOUR)),
    ("chat", "structured_outputs", {"regex": r"[A-Z][a-z]{1,6}"}, _regex_check(r"[A-Z][a-z]{1,6}")),
    ("chat", "structured_outputs", {"choice": ["up", "down"]}, _choice_check(["up", "down"])),
    ("chat", "structured_outputs", {"grammar": GBNF}, _regex_check(r"The answer is (yes|no)\.")),
    ("chat", "grammar", GBNF, _regex_check(r"The answer is (yes|no)\.")),
    ("chat", "json_schema", FLAG, _schema_check(FLAG)),
    ("completions", "grammar", LARK, _regex_check(r"A-[0-9]{2}")),
    ("completions", "guided_choice", ["north", "south"], _choice_check(["north", "south"])),
    ("completions", "json_schema", COLOUR, _schema_check(COLOUR)),
]


def test_twenty_constrained_outputs_parse_and_match(http):
    assert len(CASES) == 20
    passed = []
    for route, field, value, check in CASES:
        if route == "chat":
            out = _chat(http, messages=[user(ASK)], max_tokens=40, **{field: value})
            text, finish = out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]
        else:
            r = http.post("/v1/completions", json={"prompt": ASK + "\nAnswer:", "max_tokens": 40, "temperature": 0,
                                                   field: value})
            assert r.status_code == 200, r.text
            text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert finish == "stop", (field, value, text)
        check(text)
        passed.append(field)
    assert len(passed) == 20


def test_strict_json_schema_closes_every_object(client):
    # no additionalProperties, no required list: strict makes both, at every depth
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}}}}
    for seed in range(5):
        r = client.chat.completions.create(
            model="default", messages=[user("A person with a pet, as JSON.")], max_tokens=60, temperature=1.0,
            seed=seed, response_format={"type": "json_schema",
                                        "json_schema": {"name": "p", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        value = json.loads(r.choices[0].message.content)
        assert set(value) == {"name", "age", "pet"} and set(value["pet"]) == {"kind"}, value


def test_two_constraints_at_once_are_a_400(http):
    err = _error(http.post("/v1/chat/completions", json={"messages": [user("hi")], "guided_regex": "a",
                                                         "response_format": {"type": "json_object"}}))
    assert err["code"] == "conflicting_parameters" and err["param"] in ("guided_regex", "response_format")
    err = _error(http.post("/v1/chat/completions", json={"messages": [user("hi")], "structured_outputs": {
        "regex": "a", "choice": ["b"]}}))
    assert err["param"] == "structured_outputs"
    err = _error(http.post("/v1/chat/completions", json={"messages": [user("hi")], "grammar": "root ::= ("}))
    assert err["param"] == "grammar"


# -- tools ----------------------------------------------------------------------------------------
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _valid_calls(calls, names):
    assert calls, "no tool call"
    for call in calls:
        assert call.function.name in names, call.function.name
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_choice_required_and_named_give_valid_calls(client, choice):
    r = client.chat.completions.create(model="default", messages=[user("What's the weather in Paris this week?")],
                                       tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    _valid_calls(c.message.tool_calls, {"get_time"} if isinstance(choice, dict) else set(SCHEMAS))
    assert not c.message.content


def test_tool_choice_auto_gives_text_or_a_valid_call(client):
    for prompt in ("Say hello.", "Call get_weather for Rome, 2 days."):
        r = client.chat.completions.create(model="default", messages=[user(prompt)], tools=TOOLS, tool_choice="auto",
                                           max_tokens=60, temperature=0)
        c = r.choices[0]
        if c.message.tool_calls:
            _valid_calls(c.message.tool_calls, set(SCHEMAS))
        assert "<tool_call>" not in (c.message.content or "")


def test_tool_choice_errors(http):
    err = _error(http.post("/v1/chat/completions", json={"messages": [user("hi")], "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "Paris"}}}))
    assert err["param"] == "tool_choice.function.name" and "Paris" in err["message"]
    err = _error(http.post("/v1/chat/completions", json={"messages": [user("hi")], "tools": TOOLS,
                                                         "tool_choice": "required", "guided_regex": "a"}))
    assert err["code"] == "conflicting_parameters"


def test_a_call_cut_by_max_tokens_leaks_no_markup(client):
    kwargs = dict(model="default", messages=[user("Weather in Rome?")], tools=TOOLS, tool_choice="required",
                  max_tokens=6, temperature=0)
    c = client.chat.completions.create(**kwargs).choices[0]
    assert c.finish_reason == "length" and not c.message.tool_calls
    assert "<tool_call>" not in (c.message.content or "") and "{" not in (c.message.content or "")
    text, finish = "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            assert not chunk.choices[0].delta.tool_calls
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "length" and "<tool_call>" not in text and "{" not in text


# -- vLLM's and llama.cpp's generation knobs ----------------------------------------------------
def _eos(http) -> int:
    return http.post("/tokenize", json={"content": "<|im_end|>", "add_special": False}).json()["tokens"][0]


def test_ignore_eos_gives_exactly_max_tokens(http):
    forced_end = {str(_eos(http)): 100}  # the end token is the only likely one
    stopped = _chat(http, messages=[user("Hi")], max_tokens=16, logit_bias=forced_end)
    assert stopped["usage"]["completion_tokens"] == 0 and stopped["choices"][0]["finish_reason"] == "stop"
    out = _chat(http, messages=[user("Hi")], max_tokens=16, logit_bias=forced_end, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 16 and out["choices"][0]["finish_reason"] == "length"


def test_min_tokens_holds_the_end_back(http):
    out = _chat(http, messages=[user("Hi")], max_tokens=20, logit_bias={str(_eos(http)): 100}, min_tokens=5)
    assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["finish_reason"] == "stop"
    err = _error(http.post("/v1/chat/completions", json={"messages": [user("hi")], "min_tokens": 9, "max_tokens": 3}))
    assert err["param"] == "min_tokens"


def test_stop_token_ids_n_predict_and_stop_reason(http):
    body = {"prompt": "1, 2, 3, 4, 5,", "temperature": 0, "ignore_eos": True}
    free = http.post("/v1/completions", json={**body, "n_predict": 4}).json()
    assert free["usage"]["completion_tokens"] == 4 and free["choices"][0]["stop_reason"] is None
    ids = http.post("/tokenize", json={"content": free["choices"][0]["text"], "add_special": False}).json()["tokens"]
    stop_id = ids[1]
    r = http.post("/v1/completions", json={**body, "n_predict": 4, "stop_token_ids": [stop_id]}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_id
    assert r["usage"]["completion_tokens"] == 1  # the stop token itself is not counted, as vLLM
    r = http.post("/v1/completions", json={**body, "max_tokens": 8, "stop": [" 7"]}).json()
    assert r["choices"][0]["stop_reason"] == " 7" and " 7" not in r["choices"][0]["text"]


def test_top_k_minus_one_is_off(http):
    body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.8, "seed": 7}
    off = http.post("/v1/completions", json={**body, "top_k": -1})
    assert off.status_code == 200, off.text
    assert off.json()["choices"][0]["text"] == http.post("/v1/completions", json={**body, "top_k": 0}).json()[
        "choices"][0]["text"]


def test_max_tokens_zero_with_echo_scores_the_prompt(client, http):
    prompt = "The capital of France is Paris"
    r = client.completions.create(model="default", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == prompt and r.usage.completion_tokens == 0 and c.finish_reason == "length"
    n = len(http.post("/tokenize", json={"content": prompt}).json()["tokens"])
    assert len(c.logprobs.tokens) == n and c.logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs[1:])
    err = _error(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0}))
    assert err["param"] == "max_tokens"


def test_context_overflow_is_400_context_length_exceeded(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt=[1] * 3000, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and "3000" in e.value.body["message"]


# -- metrics: the Grafana dashboard reads only series the server exports -------------------------
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "by",
                "without", "le", "label_values", "model_name", "on", "ignoring", "and", "or", "unless", "offset"}


def test_grafana_dashboard_queries_resolve_against_metrics(http):
    _chat(http, messages=[user("Hi")], max_tokens=2)  # every histogram has a sample
    exported = set()
    for family in text_string_to_metric_families(http.get("/metrics").text):
        exported |= {s.name for s in family.samples}
        assert all("model_name" in s.labels for s in family.samples), family.name
    dashboard = json.loads((ROOT / "docs" / "grafana" / "spl.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    assert len(queries) > 20
    for query in queries:
        # without label matchers, ranges, strings, numbers and grouping clauses: the metric names
        bare = re.sub(r'\{[^}]*\}|\[[^\]]*\]|"[^"]*"|\b\d+(\.\d+)?\b|\b(by|without)\s*\([^)]*\)', " ", query)
        names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare)) - PROMQL_WORDS
        assert names, query
        for name in names:
            assert name in exported, f"{name} (in {query!r}) is not in /metrics"
