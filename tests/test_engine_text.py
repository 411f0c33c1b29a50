"""Pure parts of the engine, no model: stops, UTF-8 detokenization, <think>, tools, loops, sampling."""

import json

import pytest

from superlinear.engine.decode import IncrementalDetokenizer, StopCutter
from superlinear.engine.repetition import RepetitionDetector
from superlinear.engine.tools import parse_tool_calls
from superlinear.engine.turn import ThinkSplitter
from superlinear.engine.types import RepetitionConfig, SamplingParams


def _stream(cutter, pieces):
    return "".join(cutter.push(p) for p in pieces) + cutter.flush()


@pytest.mark.parametrize("pieces", [["Hello ST", "OP world"], list("Hello STOP world"), ["Hello STOP"]])
def test_stop_string_cut_cleanly(pieces):
    c = StopCutter(["STOP"])
    seen = ""
    for p in pieces:
        seen += c.push(p)
        assert seen == "Hello "[:len(seen)]  # never a piece of the stop string
    assert seen + c.flush() == "Hello "
    assert c.stopped


def test_stop_holds_back_only_possible_prefix():
    c = StopCutter(["</end>", "xyz"])
    assert c.push("abc <") == "abc "  # "<" could start "</end>"
    assert c.push("b>") == "<b>"
    assert c.push("xy") == ""
    assert c.flush() == "xy"  # generation ended: the held text was not a stop string


def test_stop_earliest_of_several():
    assert _stream(StopCutter(["bb", "a"]), ["xxbba"]) == "xx"


def _byte_tokenizer():
    """A byte-level tokenizer (tokenizers' own byte-level BPE, no merges): every token is one
    UTF-8 byte, the worst case for multi-byte text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # one per byte
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_detok_never_breaks_utf8():
    text = "Paris 🇫🇷 — 東京は日本の首都です 😀!"
    tok = _byte_tokenizer()
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode())  # one token per byte
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == text


def test_detok_flush_gives_a_cut_character_as_replacement():
    """A generation cut inside a character ends with what was held: U+FFFD, never silence."""
    tok = _byte_tokenizer()
    ids = tok.encode("ok 😀").ids[:-2]  # the emoji's last two bytes never came
    d = IncrementalDetokenizer(tok)
    text = "".join(d.push(i) for i in ids)
    assert text == "ok " and d.flush() == "\ufffd"


def test_think_splitter_streams():
    s = ThinkSplitter()
    reasoning, answer = "", ""
    for ch in "<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.":
        r, a = s.push(ch)
        reasoning += r
        answer += a
    r, a = s.flush()
    assert (reasoning + r).strip() == "Let me see: 2+2."
    assert answer + a == "It is 4."
    assert "<" not in reasoning


def test_think_opened_by_prompt_and_no_think():
    s = ThinkSplitter(in_reasoning=True)
    assert s.push("plan</think>answer") == ("plan", "answer")
    s = ThinkSplitter()
    assert s.push("<b>hi") == ("", "<b>hi")


def test_hermes_tool_calls_several_typed():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1.5, "b": -2}}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1.5, "b": -2}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_nemotron_xml_tool_calls():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"zip": {"type": "string"}, "n": {"type": "integer"}}}}}]
    text = ("<tool_call>\n<function=lookup>\n<parameter=zip>\n01234\n</parameter>\n<parameter=n>\n7\n"
            "</parameter>\n<parameter=flags>\n[1, 2]\n</parameter>\n</function>\n</tool_call>\n"
            "<tool_call>\n<function=now>\n</function>\n</tool_call>")
    content, calls = parse_tool_calls(text, tools)
    assert content == ""
    assert json.loads(calls[0]["function"]["arguments"]) == {"zip": "01234", "n": 7, "flags": [1, 2]}
    assert calls[1]["function"] == {"name": "now", "arguments": "{}"}


def test_nemotron_v2_toolcall_list():
    text = 'Ok.<TOOLCALL>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</TOOLCALL>'
    content, calls = parse_tool_calls(text)
    assert content == "Ok." and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}


def test_unclosed_tool_call_at_end_is_parsed():
    _, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}')
    assert calls[0]["function"]["name"] == "f"


def test_repetition_detector_stops_a_loop_early():
    det = RepetitionDetector(RepetitionConfig(tail_len=24, min_repeats=3, max_period=16))
    prefix = list(range(100, 140))  # no loop: never triggers
    assert not any(det.push(t) for t in prefix)
    loop = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    tokens = loop * 10
    n = next(i for i, t in enumerate(tokens, 1) if det.push(t))
    assert det.period == 10
    assert n <= 3 * len(loop)  # within three periods of the loop's start


def test_repetition_short_runs_are_not_loops():
    det = RepetitionDetector(RepetitionConfig(tail_len=16, min_repeats=3, max_period=8))
    assert not any(det.push(t) for t in [5] * 10)


def test_sampler_seeds():
    torch = pytest.importorskip("torch")
    from superlinear.engine.decode import Sampler

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    s1, s2 = Sampler(p), Sampler(p)
    a = [s1(logits) for _ in range(30)]
    b = [s2(logits) for _ in range(30)]
    assert a == b and len(set(a)) > 1
    allowed = set(torch.topk(logits, 50).indices.tolist())
    assert set(a) <= allowed
    assert Sampler(SamplingParams(temperature=0))(logits) == int(logits.argmax())
    s3 = Sampler(SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99))
    assert [s3(logits) for _ in range(30)] != a  # another seed, other tokens
