"""Server and client pieces that need no model: the session-chat rule, body parsing, the worker
queue, SSE parsing, error mapping, auth and validation on an app whose model never loads."""

from __future__ import annotations

import threading

import httpx
import pytest

from superlinear.errors import (
    BodyTooLarge,
    Busy,
    Conflict,
    InvalidRequest,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
)


def m(role, content):
    return {"role": role, "content": content}


T = [m("system", "be nice"), m("user", "hi"), m("assistant", "hello"), m("user", "how are you?"),
     m("assistant", "fine")]


def test_session_rule():
    from superlinear.service import merge_session_messages as merge

    assert merge([], [m("user", "x")]) == ([m("user", "x")], "new", 0)
    full, how, kept = merge(T, T + [m("user", "next")])
    assert how == "extend" and kept == 5 and full == T + [m("user", "next")]
    full, how, _ = merge(T, [m("user", "next")])
    assert how == "append" and full == T + [m("user", "next")]
    full, how, kept = merge(T, T[:3] + [m("user", "edited")])
    assert how == "rollback" and kept == 3 and full == T[:3] + [m("user", "edited")]
    full, how, kept = merge(T, T[:4])  # regenerate the last answer
    assert how == "rollback" and kept == 4 and full == T[:4]
    full, how, _ = merge(T, [m("system", "other")] + T[1:])  # a different system prompt
    assert how == "append"  # no common prefix and not "replace": taken as new messages
    full, how, kept = merge(T, [m("system", "other"), m("user", "q")], mode="replace")
    assert how == "rollback" and kept == 0 and full == [m("system", "other"), m("user", "q")]
    full, how, _ = merge(T, T[:2], mode="append")
    assert how == "append" and full == T + T[:2]
    with pytest.raises(InvalidRequest):
        merge(T, T)  # nothing new after an assistant message
    # Content parts, whitespace and tool-call argument formatting do not break the match.
    parts = [m("system", [{"type": "text", "text": "be nice"}]), m("user", "hi "), *T[2:]]
    assert merge(T, parts + [m("user", "z")])[1] == "extend"
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    call2 = {"role": "assistant", "content": "",
             "tool_calls": [{"id": "b", "type": "function", "function": {"name": "f", "arguments": '{ "x":1 }'}}]}
    assert merge([m("user", "q"), call], [m("user", "q"), call2, m("tool", "r")])[1] == "extend"


def test_parse_body():
    from superlinear import protocol
    from superlinear.plugins.serve.routes_api import body_model
    from superlinear.plugins.serve.schemas import ChatCompletionRequest, parse_body

    CreateSession = body_model(protocol.CreateSession)  # noqa: N806 - a model

    ok = parse_body(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
                    b' {"type": "text", "text": "b"}]}], "user": "u1"}', ChatCompletionRequest)
    assert ok.plain_messages() == [{"role": "user", "content": "ab"}]
    with pytest.raises(InvalidRequest) as e:  # a field outside fields.py's table
        parse_body(b'{"messages": [{"role": "user", "content": "x"}], "extra_field": 1}', ChatCompletionRequest)
    assert e.value.param == "extra_field" and e.value.code == "unknown_parameter"
    lenient = parse_body(b'{"messages": [{"role": "user", "content": "x"}], "extra_field": 1}', ChatCompletionRequest,
                         lenient=True)
    assert lenient.model_extra == {}
    for raw in (b"", b"nope", b"[]", b"3", b'{"messages": 3}', b'{"messages": [{"role": "x"}]}'):
        with pytest.raises(InvalidRequest):
            parse_body(raw, ChatCompletionRequest)
    with pytest.raises(InvalidRequest) as e:
        parse_body(b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "lots"}', ChatCompletionRequest)
    assert e.value.param == "max_tokens"
    assert parse_body(b"", CreateSession, allow_empty=True).session_id is None
    with pytest.raises(InvalidRequest) as e:
        parse_body(b'{"sesion_id": "typo"}', CreateSession)
    assert "unknown field" in e.value.message
    with pytest.raises(BodyTooLarge):
        parse_body(b"{}" * 10, CreateSession, max_bytes=5)
    req = parse_body(b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', ChatCompletionRequest)
    with pytest.raises(InvalidRequest):
        req.check_supported()


def test_worker_fifo_limit_and_cancel():
    from superlinear.api.worker import JobCancelled, Worker

    order: list[int] = []
    gate = threading.Event()
    w = Worker(max_queued=3)
    first = w.submit(lambda j: (gate.wait(5), order.append(0)), kind="generation")
    second = w.submit(lambda j: order.append(1), kind="generation")
    third = w.submit(lambda j: order.append(2), kind="generation")
    with pytest.raises(Busy):
        w.submit(lambda j: None, kind="generation")
    admin = w.submit(lambda j: order.append(9))  # admin work is not limited, but waits its turn
    third.cancel()
    gate.set()
    first.future.result(5)
    second.future.result(5)
    with pytest.raises(JobCancelled):
        third.future.result(5)
    admin.future.result(5)
    assert w.generations == 0
    assert w.call(lambda: w.call(lambda: 7)) == 7  # a call from the worker itself runs at once
    w.submit(lambda j: None, kind="generation")  # room again
    w.stop()
    assert order == [0, 1, 9]


def test_reading_a_chat_stream_gives_the_core_events():
    """The remote API reads OpenAI chunks (plus spl's ``done`` field) back into the core events."""
    from superlinear.api import Done, Persisted, ReasoningDelta, Started, TextDelta, ToolCallsEvent
    from superlinear.api.remote import read_chat

    done = {"finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Hello"},
            "usage": {"completion_tokens": 3}, "timings": {"prefill_s": 1}, "reasoning": "hmm", "partial": False}
    chunks = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}], "session_id": "s", "session_update": "new"},
        {"choices": [{"delta": {"reasoning_content": "hmm"}}], "session_id": "s"},
        {"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f",
                                                                                     "arguments": "{}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}], "persisted": True, "done": done},
        {"choices": [], "usage": {"completion_tokens": 3}},
    ]
    events = list(read_chat(iter(chunks)))
    assert events == [Started("new"), ReasoningDelta("hmm"), TextDelta("Hel"), TextDelta("lo"),
                      ToolCallsEvent([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
                      Persisted(True), Done("tool_calls", done["message"], done["usage"], done["timings"],
                                            reasoning="hmm")]
    with pytest.raises(TooLarge):
        from superlinear.api.remote import _chunks

        class Message:
            data = '{"error": {"message": "full", "type": "invalid_request_error", "code": "context_length_exceeded"}}'

        list(_chunks([Message()]))


def test_error_mapping_and_unreachable():
    from superlinear import connect
    from superlinear.api.remote import error_from_response

    def resp(status, body):
        return httpx.Response(status, json=body)

    body = {"error": {"message": "nope", "type": "x", "param": "p", "code": "c"}}
    for status, cls in ((400, InvalidRequest), (401, Unauthorized), (404, NotFound), (409, Conflict),
                        (413, BodyTooLarge), (429, Busy), (503, Unavailable)):
        err = error_from_response(resp(status, body))
        assert isinstance(err, cls) and err.message == "nope" and err.param == "p"
    assert error_from_response(httpx.Response(500, text="boom")).http_status == 500
    with connect("http://127.0.0.1:9", connect_timeout=0.5) as c:
        assert not c.is_up()
        with pytest.raises(Unavailable) as e:
            c.list_sessions()
        assert "spl server start" in e.value.message


def test_parse_bytes():
    from superlinear.settings.options import parse_bytes

    assert parse_bytes("8GB") == 8 << 30 and parse_bytes("512m") == 512 << 20 and parse_bytes("100") == 100
    assert parse_bytes("1.5KiB") == 1536 and parse_bytes(None) is None
    with pytest.raises(InvalidRequest):
        parse_bytes("lots")


@pytest.fixture
def loading_app():
    """The app with a model that never finishes loading (no lifespan): validation and auth only."""
    from fastapi.testclient import TestClient

    from superlinear.plugins.serve.app import create_app
    from superlinear.plugins.serve.runtime import Runtime
    from superlinear.settings.options import ServeOptions

    rt = Runtime(ServeOptions(api_key="k"))
    client = TestClient(create_app(rt), raise_server_exceptions=False)  # no `with`: no lifespan, no load
    yield client, rt
    rt.worker.stop(0.1)


def test_app_auth_validation_and_loading(loading_app):
    client, rt = loading_app
    auth = {"Authorization": "Bearer k"}
    health = client.get("/health")  # readiness probes read the status code: not ready while loading
    assert health.status_code == 503 and health.json()["status"] == "loading" and health.json()["progress"]
    assert health.headers["Retry-After"] == "1"
    r = client.get("/v1/sessions")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/chat/completions", content=b"{bad", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/chat/completions", json={"messages": [m("user", "x")]}, headers=auth)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    r = client.post("/v1/chat/completions", headers={**auth, "Content-Length": str(1 << 40)}, content=b"{}")
    assert r.status_code in (400, 413)
    r = client.get("/v1/unknown", headers=auth)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.delete("/health")
    assert r.status_code == 405 and "error" in r.json()


def test_the_operations_routes_are_their_declarations(loading_app):
    """Each served operation of the protocol has its route, method and body model with the
    command's bounds; its body is checked before the server is asked to be ready."""
    from fastapi.routing import APIRoute

    from superlinear import protocol

    client, _rt = loading_app
    routes = {(method, r.path): r for r in client.app.routes if isinstance(r, APIRoute) for method in r.methods}
    for op in protocol.OPERATIONS:
        if op.http.served:
            assert routes[(op.http.method, op.http.route)].status_code == op.http.status, op.name
    auth = {"Authorization": "Bearer k"}
    for body, status, param in (({"max_seq_len": 0}, 400, "max_seq_len"), ({"max_seq_len": "x"}, 400, "max_seq_len"),
                                ({"max_seq_len": 8, "x": 1}, 400, "x"), ({"max_seq_len": 8}, 503, None)):
        r = client.post("/v1/sessions/s/resize", json=body, headers=auth)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    r = client.get("/v1/snapshots", params={"all": "maybe"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "all"
    resize = client.get("/openapi.json").json()["components"]["schemas"]["Resize"]
    assert resize["properties"]["max_seq_len"]["minimum"] == 1 and resize["required"] == ["max_seq_len"]


def test_health_is_503_after_a_failed_load(tmp_path, monkeypatch):
    """A model that cannot load: /health answers 503 with the error (never 200), the API 503."""
    import time

    from fastapi.testclient import TestClient

    from superlinear.plugins.serve.app import create_app
    from superlinear.plugins.serve.runtime import Runtime
    from superlinear.settings.options import ServeOptions

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    monkeypatch.setenv("SPL_SNAPSHOT_DIR", str(tmp_path / "snaps"))
    rt = Runtime(ServeOptions(model=str(broken)))
    with TestClient(create_app(rt), raise_server_exceptions=False) as client:  # lifespan: loads
        deadline = time.monotonic() + 60
        while rt.status == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error" and r.json()["error"]
        r = client.get("/v1/sessions")
        assert r.status_code == 503 and "failed to start (loading model" in r.json()["error"]["message"]


def test_json_guards_name_the_field():
    from superlinear.plugins.serve.schemas import ChatCompletionRequest, parse_body

    def err(raw: bytes) -> InvalidRequest:
        with pytest.raises(InvalidRequest) as e:
            parse_body(raw, ChatCompletionRequest)
        return e.value

    base = b'{"messages": [{"role": "user", "content": %s}]%s}'
    assert err(base % (rb'"\ud800"', b"")).param == "messages.0.content"  # a lone surrogate
    assert "nested too deeply" in err(b"[" * 100_000 + b"]" * 100_000).message
    assert "nested too deeply" in err(base % (b'"x"', b', "chat_template_kwargs": {"a": ' + b"[" * 70 + b"]" * 70
                                             + b"}")).message
    assert err(base % (b'"x"', b', "temperature": NaN')).code == "invalid_json"
    assert err(base % (b'"x"', b', "top_p": 1e999')).param == "top_p"
    e = err(base % (b'"x"', b', "repetition_detection": {"max_period": 10000000000000}'))
    assert e.param == "repetition_detection.max_period" and "1024" in e.message
    e = err(base % (b'"x"', b', "chat_template_kwargs": {"add_generation_prompt": false}'))
    assert e.param == "chat_template_kwargs" and "add_generation_prompt" in e.message
    assert err(base % (b'"x"', b', "seed": 18446744073709551616')).param == "seed"


def test_every_declared_field_reaches_the_engine_through_the_wire():
    """A field an engine request type declares for clients (``request_field`` with a ``doc``)
    goes on the wire as the remote API builds the body, is parsed by the server's OpenAI bodies
    and arrives in the engine's request unchanged; and it is a row of the fields table, on the
    routes of its type, as every field of the bodies is."""
    from server_helpers import declared_values

    from superlinear import protocol
    from superlinear.api.types import Completion
    from superlinear.engine.types import ChatRequest, SamplingParams
    from superlinear.plugins.serve.fields import FIELDS
    from superlinear.plugins.serve.schemas import ChatCompletionRequest, CompletionRequest
    from superlinear.service import ChatTurn

    sampling, chat = declared_values(SamplingParams), declared_values(ChatRequest)
    assert {"temperature", "min_p", "logit_bias", "ignore_eos", "repeat_last_n"} <= set(sampling)
    sp = SamplingParams(**sampling)
    turn = ChatTurn(ChatRequest(messages=[{"role": "user", "content": "hi"}], sampling=sp, **chat))
    body = ChatCompletionRequest.model_validate(protocol.chat_body(turn))
    request = body.engine_request(body.plain_messages(), {})
    assert {k: getattr(request.sampling, k) for k in sampling} == sampling
    assert {k: getattr(request, k) for k in chat} == chat
    text = CompletionRequest.model_validate(protocol.completion_body(Completion("hi", sp)))
    assert {k: getattr(text.engine_request("hi", {}).sampling, k) for k in sampling} == sampling
    for route, model, names in (("chat", ChatCompletionRequest, {*sampling, *chat}),
                                ("completions", CompletionRequest, set(sampling))):
        assert names <= set(FIELDS[route]) and set(model.model_fields) <= set(FIELDS[route]), route
    assert not set(chat) & set(FIELDS["completions"])
