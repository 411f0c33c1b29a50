"""A bad-input sweep over every route of a real server: bodies generated from the request
schemas (each field set to wrong types, numbers at and past type limits, NaN/Infinity, deep
nesting, huge strings, lone surrogates, unknown enum values, reserved tags, bad ids), whole
bodies that are not JSON objects, bad path ids and query values. Every answer is < 500, every
error is OpenAI-shaped, and the server answers /health after each batch."""

from __future__ import annotations

import io
import json
import tarfile
import types
import typing
from urllib.parse import quote

import httpx
import pytest
from pydantic import BaseModel
from server_helpers import TINY_MAX_SEQ_LEN as MAX_SEQ_LEN

from superlinear import protocol
from superlinear.plugins.serve import schemas as S
from superlinear.plugins.serve.routes_api import body_model

pytestmark = pytest.mark.slow

DEEP_LIST: list = []
for _ in range(200):
    DEEP_LIST = [DEEP_LIST]
DEEP_DICT: dict = {}
for _ in range(200):
    DEEP_DICT = {"a": DEEP_DICT}

# Values that are wrong (or at the edge) for about every field.
BAD_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**32 + 1, 2**63, 2**64, 2**70, -(2**70), 0.5, 1e308, -1e308,
    float("nan"), float("inf"), "", "not-an-enum", "x" * 100_000, "\ud800", "a\udfffb", [], {}, [None],
    {"unexpected": 1}, DEEP_LIST, DEEP_DICT,
]
BAD_IDS = ["../etc", "a/b", ".hidden", "x" * 129, "", "sp ace", "ü", "..", "a..b", "\ud800", "-x"]
BY_NAME = {  # extra values for fields of these names
    "session_id": BAD_IDS, "new_session_id": BAD_IDS, "snapshot_id": BAD_IDS,
    "tags": [["spl:session-state"], ["spl:other"], [""], ["x" * 65], ["t"] * 65, ["\ud800"], "spl:session-state"],
    "chat_template_kwargs": [{"messages": []}, {"tools": True}, {"add_generation_prompt": False},
                             {"tokenize": True}, {"chat_template": "{{ 1/0 }}"}, {"conversation": 1},
                             {"enable_thinking": ["\ud800"]}, {"x": DEEP_DICT}],
    "stop": [["x"] * 17, ["x" * 5000], [1]],
    "tool_choice": [{"type": "function"}, {"type": "function", "function": {"name": "nope"}}, "required"],
    "content": [[{"type": "image_url", "image_url": {"url": "x"}}], [{"type": "text", "text": 5}],
                [{"type": "text"}]],
    "n": [2, 0], "best_of": [2], "logprobs": [1], "suffix": ["x"], "echo": [True],
    "prompt": [[10**12], [-1], ["a", "b"], [[1], [2]], [[]]], "tokens": [[10**12], [-1], [True]],
    "max_period": [10**9, 10**13], "tail_len": [10**9], "min_repeats": [10**9],
    "seed": [2**64 - 1, -(2**63), 2**64, -(2**63) - 1],
    "response_format": [{"type": "json_schema"}, {"type": "text"}, {"type": "json_object"}, {"type": "xml"}, [],
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": DEEP_DICT}}],
    "frequency_penalty": [3, -2.5, "x"], "presence_penalty": [1e308, None], "min_p": [1.5, -0.1],
    "repeat_penalty": [0, -1, 11], "repeat_last_n": [-1, 10**9], "top_logprobs": [21, -1, 5],
    "logit_bias": [{"60000": 1}, {"-1": 1}, {"x": 1}, {"5": 101}, {str(i): 1 for i in range(1100)}, []],
    "title": ["t" * 201], "description": ["d" * 10_001],
}

ROUTES: dict[tuple[str, str], tuple[type[BaseModel], dict]] = {
    ("POST", "/v1/chat/completions"): (S.ChatCompletionRequest, {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}),
    ("POST", "/v1/completions"): (S.CompletionRequest, {"prompt": "Hi", "max_tokens": 1, "temperature": 0}),
    ("POST", "/tokenize"): (S.TokenizeRequest, {"content": "Hi"}),
    ("POST", "/detokenize"): (S.DetokenizeRequest, {"tokens": [1, 2]}),
    **{(op.http.method, op.http.route): (body_model(op), base) for op, base in (
        (protocol.CreateSession, {"max_seq_len": 32}), (protocol.Fork, {}), (protocol.Rollback, {"n_messages": 2}),
        (protocol.Resize, {"max_seq_len": MAX_SEQ_LEN}), (protocol.Save, {"title": "t"}),
        (protocol.UpdateSnapshot, {"title": "t"}), (protocol.Load, {"session_id": "sweep-load", "force": True}))},
}
SWEPT_PREFIXES = ("/v1", "/health", "/metrics", "/tokenize", "/detokenize")
RAW_BODY_ROUTES = {("POST", "/v1/snapshots/import")}  # a tar file, not JSON
NO_BODY_ROUTES = {("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id:path}"),
                  ("GET", "/v1/sessions"), ("GET", "/v1/sessions/{session_id}"),
                  ("DELETE", "/v1/sessions/{session_id}"), ("GET", "/v1/sessions/{session_id}/history"),
                  ("GET", "/v1/snapshots"), ("GET", "/v1/snapshots/{snapshot_id}"),
                  ("DELETE", "/v1/snapshots/{snapshot_id}"), ("GET", "/v1/snapshots/{snapshot_id}/export")}
NOT_JSON_OBJECTS = [b"", b"   ", b"{", b"[]", b"null", b"3", b'"s"', b"\xff\xfe", b'{"a": NaN}', b'{"a": -Infinity}',
                    b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                    b'{"a": "\\ud800"}', b'{"\\udc00": 1}', b'{"a": 1' + b"0" * 5000 + b"}",
                    b'{"a": 1e999999}', json.dumps({"x": "y" * 1_000_000}).encode()]


def _models_in(annotation) -> list[type[BaseModel]]:
    """Request models a field's annotation may hold (``list[Message] | None`` -> [Message])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _is_list(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is list:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


def _minimal(model: type[BaseModel]) -> dict:
    """A value of ``model`` with only its required fields."""
    out = {}
    for name, field in model.model_fields.items():
        if not field.is_required():
            continue
        nested = _models_in(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal:
            out[name] = "user" if "user" in typing.get_args(field.annotation) else typing.get_args(field.annotation)[0]
        elif nested:
            out[name] = [_minimal(nested[0])] if _is_list(field.annotation) else _minimal(nested[0])
        else:
            out[name] = "text" if name == "type" else "f"
    return out


def bodies(model: type[BaseModel], base: dict):
    """``(label, body)``: ``base`` with one field of ``model``, or of a model nested in it, set to
    each bad value, and with each required field left out."""
    for name, field in model.model_fields.items():
        for value in BAD_VALUES + BY_NAME.get(name, []):
            yield f"{name}={str(value)[:40]!r}", {**base, name: value}
        if field.is_required():
            yield f"{name} missing", {k: v for k, v in base.items() if k != name}
        for nested in _models_in(field.annotation):
            listed = _is_list(field.annotation)
            have = base.get(name)
            inner = (have[0] if listed and isinstance(have, list) and have and isinstance(have[0], dict)
                     else have if isinstance(have, dict) else _minimal(nested))
            for label, inner_body in bodies(nested, inner):
                yield f"{name}.{label}", {**base, name: [inner_body] if listed else inner_body}


def check_answer(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, (what, err)
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), (what, err)


def check_alive(server, c: httpx.Client, after: str) -> None:
    assert server.proc.poll() is None, f"the server died after {after}"
    assert c.get("/health").status_code == 200, f"/health does not answer after {after}"


@pytest.fixture(scope="module")
def server(tiny_server):
    """A tiny random llama (real model code, the default model's tokenizer): the sweep's valid
    requests generate in milliseconds; its default max_seq_len is small."""
    return tiny_server


@pytest.fixture(scope="module")
def c(server):
    with server.http(timeout=120) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "session_id": "sweep", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        yield client


def _send(c: httpx.Client, method: str, path: str, body) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN/Infinity as JS literals
    return c.request(method, path, content=raw, headers={"Content-Type": "application/json"})


def test_every_route_is_swept(server):
    from superlinear.plugins.serve.app import create_app
    from superlinear.plugins.serve.runtime import Runtime
    from superlinear.settings.options import ServeOptions

    rt = Runtime(ServeOptions())
    try:
        app = create_app(rt)
    finally:
        rt.worker.stop(0.1)
    served = {(m, r.path) for r in app.routes if r.path != "/openapi.json" and r.path.startswith(SWEPT_PREFIXES)
              for m in getattr(r, "methods", ()) if m != "HEAD"}
    assert served == set(ROUTES) | RAW_BODY_ROUTES | NO_BODY_ROUTES


def test_sweep_request_bodies(server, c):
    snap = c.post("/v1/sessions/sweep/save", json={"title": "sweep"}).json()["id"]
    ids = {"session_id": "sweep", "snapshot_id": snap}
    total = 0
    for (method, template), (model, base) in ROUTES.items():
        path = template.format(**ids)
        for label, body in bodies(model, base):
            r = _send(c, method, path, body)
            check_answer(r, f"{method} {path} {label}")
            total += 1
            if r.status_code == 201 and template in ("/v1/sessions", "/v1/sessions/{session_id}/fork"):
                c.delete(f"/v1/sessions/{r.json()['id']}")
        for raw in NOT_JSON_OBJECTS:
            check_answer(_send(c, method, path, raw), f"{method} {path} body {raw[:40]!r}")
            total += 1
        check_alive(server, c, f"the {method} {template} batch")
    assert total > 1000  # hundreds of bodies per big schema
    print(f"\nbad-input sweep: {total} malformed bodies over {len(ROUTES)} routes, no 5xx")


def test_sweep_ids_and_queries(server, c):
    for raw_id in BAD_IDS + ["%00", "%ED%A0%80", "x" * 5000]:
        seg = raw_id if raw_id.startswith("%") else _quote(raw_id)
        for method, template in sorted(NO_BODY_ROUTES | set(ROUTES)):
            if "{" not in template:
                continue
            path = template.replace("{model_id:path}", seg).replace("{session_id}", seg).replace("{snapshot_id}", seg)
            check_answer(c.request(method, path, json={}), f"{method} {path[:80]}")
    for query in ("tag=%ED%A0%80", "all=maybe", "all=2", "tag=" + "x" * 10_000, "tag=spl:session-state&all=1"):
        check_answer(c.get(f"/v1/snapshots?{query}"), query)
    check_alive(server, c, "the id and query sweep")


def _quote(text: str) -> str:
    """URL-encoded, lone surrogates included (as the UTF-8 bytes a client could send)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in entries:
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def test_sweep_snapshot_import(server, c):
    export = c.get(f"/v1/snapshots/{c.post('/v1/sessions/sweep/save', json={}).json()['id']}/export").content
    link = tarfile.TarInfo("s/manifest.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bodies = [b"", b"not a tar", b"\x1f\x8b" + b"\x00" * 100, bytes(range(256)) * 40, export[:len(export) // 2],
              _tar([(tarfile.TarInfo("../evil"), b"x")]), _tar([(link, None)]),
              _tar([(tarfile.TarInfo("s/manifest.json"), b"{")]), _tar([(tarfile.TarInfo("a/b/c"), b"x")])]
    for body in bodies:
        r = c.post("/v1/snapshots/import", content=body)
        check_answer(r, f"import {body[:20]!r}")
        assert r.status_code >= 400
        assert "spl-import-" not in r.text  # the message never names the server's temporary file
    for query in [f"snapshot_id={_quote(i)}" for i in BAD_IDS] + ["replace=maybe",
                                                                       "snapshot_id=session-sweep&replace=true"]:
        r = c.post(f"/v1/snapshots/import?{query}", content=export)
        check_answer(r, f"import ?{query}")
        assert r.status_code >= 400, (query, r.text)
    check_alive(server, c, "the import sweep")
