"""The official `openai` client against `spl serve --model default` on a free port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from server_helpers import user

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_create(client):
    r = client.chat.completions.create(model="default", messages=[user("What is the capital of France?")],
                                       max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    timings = r.model_extra["timings"]
    assert timings["prefill_tokens_per_s"] > 0 and timings["decode_tokens_per_s"] > 0


def test_content_parts_and_max_completion_tokens(client):
    r = client.chat.completions.create(
        model="default", max_completion_tokens=5, temperature=0,
        messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}])
    assert r.usage.completion_tokens <= 5


def test_stream_with_usage(client):
    stream = client.chat.completions.create(model="default", messages=[user("Count to five.")], max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    # Same seed, same prompt, greedy: streamed text equals the non-streamed one.
    r = client.chat.completions.create(model="default", messages=[user("Count to five.")], max_tokens=6,
                                       temperature=0)
    assert r.choices[0].message.content == text.strip()


def test_stop_and_seed(client):
    kwargs = dict(model="default", messages=[user("Write a long sentence about the sea.")], max_tokens=6,
                  temperature=0.9, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b
    r = client.chat.completions.create(model="default", messages=[user("Say: one, two, three")], max_tokens=8,
                                       temperature=0, stop=[","])
    assert "," not in r.choices[0].message.content


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _check_calls(calls):
    for call in calls or []:
        assert call.id and call.type == "function" and isinstance(call.function.name, str)
        assert isinstance(call.function.arguments, str)


def test_tools(client):
    # The 135M default model rarely writes a well-formed call, so this checks the plumbing: tools
    # and tool_choice are accepted, the answer is well-formed, and a tool round trip works.
    r = client.chat.completions.create(
        model="default", messages=[user("What is the weather in Paris? Use the tool.")], tools=TOOLS,
        tool_choice="auto", max_tokens=4, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("tool_calls", "stop", "length")
    _check_calls(choice.message.tool_calls)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    follow = client.chat.completions.create(
        model="default", tools=TOOLS, max_tokens=3, temperature=0,
        messages=[user("What is the weather in Paris? Use the tool."),
                  {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    assert follow.choices[0].message.content is not None


def test_tools_streamed(client):
    stream = client.chat.completions.create(
        model="default", messages=[user("Weather in Rome?")], tools=TOOLS, tool_choice="required",
        max_tokens=8, temperature=0, stream=True)
    calls, finish = [], None
    for c in stream:
        if c.choices:
            calls += c.choices[0].delta.tool_calls or []
            finish = c.choices[0].finish_reason or finish
    assert finish in ("tool_calls", "length", "stop")
    _check_calls(calls)


def test_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=[user("hi")], n=2)
    assert e.value.body["param"] == "n" and "n=1" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"].startswith("messages.0")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[user("hi")], temperature=9)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="default", messages=[user("hi")])
    # A prompt longer than the session's max_seq_len: 400 context_length_exceeded, saying how to resize.
    with server.http() as http:
        http.post("/v1/sessions", json={"session_id": "tiny", "max_seq_len": 64}).raise_for_status()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=[user("word " * 200)],
                                       extra_body={"session_id": "tiny"})
    assert e.value.body["code"] == "context_length_exceeded" and "64" in e.value.body["message"]
    with server.http() as http:
        info = http.get("/v1/sessions/tiny").json()
        assert info["position"] == 0 and info["message_count"] == 0  # left as before the request


def test_models(client):
    models = client.models.list().data
    assert models[0].id == "default"
    assert client.models.retrieve("default").id == "default"


def test_session_rule_with_resent_history(client, server):
    sid = "resend"
    history = [user("My name is Ada.")]
    r1 = client.chat.completions.create(model="default", messages=history, max_tokens=4, temperature=0,
                                        extra_body={"session_id": sid})
    assert r1.model_extra["session_update"] == "new"
    history += [{"role": "assistant", "content": r1.choices[0].message.content}, user("What is my name?")]
    r2 = client.chat.completions.create(model="default", messages=history, max_tokens=4, temperature=0,
                                        extra_body={"session_id": sid})
    assert r2.model_extra["session_update"] == "extend"
    reused = r2.usage.prompt_tokens_details.cached_tokens
    assert reused >= r1.usage.prompt_tokens  # the first turn was not prefilled again
    assert r2.model_extra["timings"]["prefill_tokens"] < r2.usage.prompt_tokens
    # Only the new message: appended.
    r3 = client.chat.completions.create(model="default", messages=[user("Thanks.")], max_tokens=4,
                                        temperature=0, extra_body={"session_id": sid})
    assert r3.model_extra["session_update"] == "append"
    with server.http() as http:
        assert len(http.get(f"/v1/sessions/{sid}/history").json()["messages"]) == 6
    # Diverging history (an edit of the 2nd question): rolled back to the common prefix.
    edited = history[:2] + [user("What is my name, again?")]
    r4 = client.chat.completions.create(model="default", messages=edited, max_tokens=4, temperature=0,
                                        extra_body={"session_id": sid})
    assert r4.model_extra["session_update"] == "rollback"
    with server.http() as http:
        messages = http.get(f"/v1/sessions/{sid}/history").json()["messages"]
    assert [m["content"] for m in messages[:3]] == [h["content"] for h in edited]
    assert len(messages) == 4


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- session-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no session example"
    return match.group(1)


def test_readme_session_example_verbatim(server):
    code = _readme_example()
    env = dict(os.environ, SPL_SERVER_URL=server.url, SPL_API_KEY=server.api_key)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tokens reused" in out.stdout
    reused = int(re.search(r"(\d+) prompt tokens reused", out.stdout).group(1))
    assert reused > 0
    with server.http() as http:
        info = http.get("/v1/sessions/readme-demo").json()
    assert info["message_count"] == 4
