"""The sampler's penalties, min-p, logprobs and response_format grammar, on hand-made logits."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch

from superlinear.engine.decode import Sampler, prompt_logprobs, token_logprob
from superlinear.engine.grammar import from_response_format, grammar_of
from superlinear.engine.limits import check_sampling
from superlinear.engine.types import SamplingParams
from superlinear.errors import InvalidRequest


def greedy(**fields) -> SamplingParams:
    return SamplingParams(temperature=0, **fields)


def test_presence_penalty_subtracts_once_per_seen_token():
    logits = torch.tensor([3.0, 2.5, 0.0])
    plain = Sampler(greedy())
    assert [plain(logits) for _ in range(3)] == [0, 0, 0]
    # 3.0 - 1.0 < 2.5 once token 0 was generated; token 1 then drops to 1.5 and 0 wins again
    s = Sampler(greedy(presence_penalty=1.0))
    assert [s(logits) for _ in range(3)] == [0, 1, 0]


def test_frequency_penalty_grows_with_the_count():
    logits = torch.tensor([3.0, 2.5, 0.0])
    s = Sampler(greedy(frequency_penalty=0.3))
    # token 0: 3.0, then 2.7 (> 2.5), then 2.4 (< 2.5): the second repeat costs more
    assert [s(logits) for _ in range(3)] == [0, 0, 1]


def test_frequency_penalty_shapes_the_sampled_distribution():
    # two equal logits; token 0 generated once: p(0) = 1 / (1 + e^penalty)
    penalty, draws = math.log(3.0), 600
    hits = 0
    for seed in range(draws):
        s = Sampler(SamplingParams(temperature=1.0, frequency_penalty=penalty, seed=seed))
        s.accept([0])
        hits += s(torch.zeros(2)) == 0
    assert abs(hits / draws - 0.25) < 0.06


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    # llama.cpp's rule over the prompt's and output's last repeat_last_n tokens
    assert Sampler(greedy(repeat_penalty=1.5), prompt_ids=[0])(torch.tensor([2.0, 1.5])) == 1  # 2 / 1.5 < 1.5
    assert Sampler(greedy(repeat_penalty=1.5), prompt_ids=[0])(torch.tensor([-1.0, -1.2])) == 1  # -1.5 < -1.2
    assert Sampler(greedy(repeat_penalty=1.2), prompt_ids=[0])(torch.tensor([2.0, 1.5])) == 0  # 1.67 > 1.5
    # outside the window: not penalized
    assert Sampler(greedy(repeat_penalty=1.5, repeat_last_n=2), prompt_ids=[0, 5, 5])(torch.tensor([2.0, 1.5])) == 0
    assert Sampler(greedy(repeat_penalty=1.5, repeat_last_n=0), prompt_ids=[0])(torch.tensor([2.0, 1.5])) == 0


def test_logit_bias_adds_to_the_named_tokens():
    logits = torch.tensor([1.0, 0.0, -1.0])
    assert Sampler(greedy(logit_bias={1: 2.0}))(logits) == 1
    assert Sampler(greedy(logit_bias={0: -100, 1: -100}))(logits) == 2
    with pytest.raises(InvalidRequest) as err:
        check_sampling(SamplingParams(logit_bias={3: 1.0}), vocab=3)  # no token 3
    assert err.value.param == "logit_bias"
    with pytest.raises(InvalidRequest):
        check_sampling(SamplingParams(logit_bias={0: 101}), vocab=3)


def test_min_p_drops_the_unlikely_tokens():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()

    def seen(min_p: float) -> set[int]:
        s = Sampler(SamplingParams(temperature=1.0, min_p=min_p, seed=7))
        return {s(logits) for _ in range(300)}

    assert seen(0.0) == {0, 1, 2}
    assert seen(0.5) == {0, 1}  # 0.2 < 0.5 * 0.5
    assert seen(0.7) == {0}


def test_logprobs_are_the_models_not_the_penalized():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    expected = torch.log_softmax(logits, -1)
    s = Sampler(SamplingParams(temperature=0.5, presence_penalty=2.0, seed=1, logprobs=2))
    s.accept([0])
    token, entry = s.pick(logits)
    assert token == entry.id and entry.logprob == pytest.approx(float(expected[token]))
    assert [i for i, _, _ in entry.top] == [0, 1]
    assert [lp for _, _, lp in entry.top] == pytest.approx(expected[:2].tolist())
    assert Sampler(greedy()).pick(logits)[1] is None  # not asked for


def test_prompt_logprobs_match_one_token_at_a_time():
    torch.manual_seed(0)
    rows = torch.randn(4, 10)
    following = [3, 1, 4, 1]
    entries = prompt_logprobs(rows, following, 3, None)
    for row, t, e in zip(rows, following, entries, strict=True):
        one = token_logprob(row, t, 3, None)
        assert e.logprob == pytest.approx(one.logprob) and e.id == t
        assert [i for i, _, _ in e.top] == [i for i, _, _ in one.top]


@pytest.mark.parametrize("field,value", [("frequency_penalty", 2.5), ("presence_penalty", -3), ("min_p", 1.5),
                                         ("repeat_penalty", 0.0), ("repeat_last_n", -1), ("logprobs", 21)])
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(InvalidRequest) as err:
        check_sampling(SamplingParams(**{field: value}))
    assert err.value.param == ("top_logprobs" if field == "logprobs" else field)


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "tag"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tag": {"enum": ["red", "green"]}}}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from superlinear.model.default import ensure_default

    return AutoTokenizer.from_pretrained(str(ensure_default()))


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}},
    {"type": "json_object"},
])
def test_grammar_masks_random_logits_into_valid_json(tokenizer, response_format):
    end = tokenizer.eos_token_id
    # a random walk through JSON would not end soon: the tokens that close things are favoured
    closers = [tokenizer.convert_tokens_to_ids(t) for t in ('"', "}", ":", "1")]
    torch.manual_seed(0)
    for seed in range(3):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed, structured=from_response_format(response_format)),
                    tokenizer=tokenizer, end_ids=[end])
        ids = []
        for _ in range(200):
            logits = torch.randn(len(tokenizer))
            logits[closers] += 8
            t = s(logits)
            if t == end:
                break
            ids.append(t)
        else:
            pytest.fail("the grammar never let the generation end")
        value = json.loads(tokenizer.decode(ids))
        assert isinstance(value, dict)
        if response_format["type"] == "json_schema":
            jsonschema.validate(value, SCHEMA)


def test_bad_response_formats_are_refused():
    for fmt, param in (({"type": "yaml"}, "response_format.type"),
                       ({"type": "json_schema"}, "response_format.json_schema.schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                        "response_format")):
        with pytest.raises(InvalidRequest) as err:
            grammar_of(from_response_format(fmt), "response_format")
        assert err.value.param == param
    assert from_response_format({"type": "text"}) is None
    with pytest.raises(InvalidRequest):
        check_sampling(SamplingParams(structured={"regex": "a", "choice": ["b"]}))  # two at once


def test_strict_schema_closes_every_object_and_requires_every_property():
    from superlinear.engine.grammar import strict_schema

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}}}}
    out = strict_schema(schema)
    assert out["additionalProperties"] is False and out["required"] == ["a", "c"]
    assert out["properties"]["a"]["required"] == ["b"] and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["items"]["required"] == ["d"]
    assert "required" not in schema  # a copy


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("spec,text,ok", [
    ({"choice": "required"}, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>', True),
    ({"choice": "required"}, '<tool_call>\n{"name":"Paris","arguments":{"city":"Oslo"}}\n</tool_call>', False),
    ({"choice": "required"}, '<tool_call>\n{"name":"get_weather","arguments":{"town":"Oslo"}}\n</tool_call>', False),
    ({"choice": "required"}, "Hello", False),
    ({"choice": "auto"}, "Hello, no tool needed.", True),
    ({"choice": "auto"}, 'Hi <tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>', True),
    ({"choice": "auto"}, "Hi <tool_call>\nnot json", False),
    ({"choice": "required", "format": "xml"},
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>", True),
    ({"choice": "required", "reasoning": True},
     'hmm</think>\n\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>', True),
    ({"choice": "required", "parallel": True}, '<tool_call>\n{"name":"get_weather","arguments":{"city":"A"}}\n'
     '</tool_call>\n<tool_call>\n{"name":"get_weather","arguments":{"city":"B"}}\n</tool_call>', True),
])
def test_tool_grammars_take_valid_calls_only(tokenizer, spec, text, ok):
    from superlinear.engine.grammar import Grammar

    g = Grammar(tokenizer, grammar_of({"tools": {"tools": TOOLS, **spec}}), [tokenizer.eos_token_id])
    took = all(g.matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
    assert (took and g.matcher.is_accepting() and not g.matcher.is_error()) == ok


@pytest.mark.parametrize("structured,param", [
    ({"choice": []}, "x"), ({"regex": "("}, "x"), ({"grammar": "root ::= ("}, "x"), ({"json": "{not json"}, "x"),
    ({"tools": {"tools": TOOLS, "choice": "nope"}}, "tool_choice")])
def test_unusable_constraints_are_refused(structured, param):
    with pytest.raises(InvalidRequest) as err:
        grammar_of(structured, "x")
    assert err.value.param == param
