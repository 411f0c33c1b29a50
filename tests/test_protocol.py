"""The protocol (``superlinear.protocol``) declares every operation once; the remote API and the
server's routes are built from it. Here every declared field of a chat turn (each field of
``SamplingParams``, ``ChatRequest`` and ``ChatTurn``), of a completion (``Completion``'s, its
sampling's, logprobs with and without echo) and of each served operation is set to a value
other than its default and sent both ways, in process (``connect("local")``) and to a
real server on a free port (``connect(url)``): the events and results must be the same.

The tables below must name every field: adding one to the request types without a value here
fails the test, so a new field cannot be left out of the wire (a field declared for clients,
``request_field`` with a ``doc``, gets one from its type and bounds)."""

from __future__ import annotations

import dataclasses
import shutil

from server_helpers import comparable, declared_values, start_server

import superlinear
from superlinear import protocol
from superlinear.api import chat_turn
from superlinear.api.types import Completion
from superlinear.engine import ChatRequest, Logprobs, RepetitionConfig, SamplingParams
from superlinear.errors import NotFound
from superlinear.service.chat_service import ChatTurn

BASE = {"temperature": 0.9, "seed": 5, "max_tokens": 4}


def sampling_values(ids: list[int]) -> dict:
    """A value other than the default for each field of ``SamplingParams``: those declared for
    clients from their bounds (``declared_values``), unless chosen here."""
    return {**declared_values(SamplingParams),
            "temperature": 1.4, "top_p": 0.6, "top_k": 7, "seed": 17, "max_tokens": 2, "stop": ["e"],
            "stop_token_ids": [ids[0]], "frequency_penalty": 1.5, "presence_penalty": 1.0, "repeat_penalty": 1.8,
            "repeat_last_n": 8, "min_p": 0.2, "logit_bias": {ids[1]: 100.0}, "logprobs": 2,
            "structured": {"choice": ["red", "green"]}, "min_tokens": 3, "ignore_eos": True,
            "skip_special_tokens": True}


REQUEST_VALUES = {
    **declared_values(ChatRequest),
    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    "tool_choice": "none", "reasoning_budget": 1, "repetition": RepetitionConfig(tail_len=4, min_repeats=2),
    "chat_template_kwargs": {"enable_thinking": False}, "keep_thinking": True, "parallel_tool_calls": True,
}
# the service's own choices, not fields of a request: keep_partial (a cancelled turn's answer) and
# close_turn (whether the end-of-turn tokens are prefilled before Done)
NOT_SENT = {"messages", "sampling", "keep_partial", "close_turn"}


def turns(ids: list[int]) -> list[tuple[str, ChatTurn]]:
    """One turn per declared field, that field set (the rest as in ``BASE``)."""
    base = chat_turn([{"role": "user", "content": "Name a colour."}], **BASE)
    values = sampling_values(ids)
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(values) == names, f"fields without a value here: {sorted(names - set(values))}"
    out = [(f"sampling.{name}", dataclasses.replace(
        base, request=dataclasses.replace(base.request, sampling=dataclasses.replace(base.request.sampling,
                                                                                       **{name: value}))))
           for name, value in values.items()]
    for label, structured in (("json", {"json": {"type": "object"}, "strict": True}), ("json_object",
                                                                                      {"json_object": True})):
        sampling = dataclasses.replace(base.request.sampling, structured=structured)
        out.append((f"sampling.structured.{label}",
                    dataclasses.replace(base, request=dataclasses.replace(base.request, sampling=sampling))))
    names = {f.name for f in dataclasses.fields(ChatRequest)} - NOT_SENT
    assert set(REQUEST_VALUES) == names, f"fields without a value here: {sorted(names - set(REQUEST_VALUES))}"
    out += [(name, dataclasses.replace(base, request=dataclasses.replace(base.request, **{name: value})))
            for name, value in REQUEST_VALUES.items()]
    names = {f.name for f in dataclasses.fields(ChatTurn)} - {"request"}
    assert names == {"session_id", "session_mode"}
    out.append(("session_id+session_mode", dataclasses.replace(base, session_id="walk", session_mode="append")))
    return out


def completions(ids: list[int]) -> list[tuple[str, Completion]]:
    """One completion per declared field of ``Completion`` and of its ``sampling``, that field
    set (the rest as in ``BASE``); the prompt's logprobs (``echo`` with ``logprobs``) too."""
    base = Completion("Once upon", SamplingParams(**BASE))
    values = {"prompt": ids * 3, "sampling": SamplingParams(**{**BASE, "logprobs": 2}),
              "repetition": RepetitionConfig(tail_len=4, min_repeats=2), "echo": True}
    names = {f.name for f in dataclasses.fields(Completion)}
    assert set(values) == names, f"fields without a value here: {sorted(names - set(values))}"
    out = [(f"completion.{name}", dataclasses.replace(base, **{name: value})) for name, value in values.items()]
    out += [(f"completion.sampling.{name}", dataclasses.replace(
        base, sampling=dataclasses.replace(base.sampling, **{name: value})))
        for name, value in sampling_values(ids).items()]
    out.append(("completion.echo+logprobs", dataclasses.replace(base, echo=True, sampling=values["sampling"])))
    return out


def walk(api, ids: list[int]) -> dict:
    """Every field's turn and completion, and each served operation."""
    results: dict = {}
    api.create_session("walk")
    for label, turn in turns(ids):
        results[label] = [comparable(e) for e in api.chat(turn)]
    for label, completion in completions(ids):
        results[label] = [comparable(e) for e in api.complete(completion)]
    # the served operations, each field other than its default
    results["fork"] = _session(api.fork("walk", "walk-fork"))
    results["rollback"] = _session(api.rollback("walk-fork", 1))
    results["resize"] = _session(api.resize("walk-fork", 512))
    snap = api.save("walk-fork", title="t", description="d", tags=["a"])
    results["save"] = _snapshot(snap)
    results["update"] = _snapshot(api.update_snapshot(snap["id"], title="t2", description="d2", tags=["b"]))
    listed = api.list_snapshots(tag="b", include_session_state=True)
    results["list_snapshots"] = sorted(s["title"] or "" for s in listed)
    results["load"] = _session(api.load(snap["id"], session_id="walk-load", force=True, max_seq_len=256,
                                        ephemeral=True))
    results["create"] = _session(api.create_session("walk-new", 128, ephemeral=True))
    results["history"] = api.history("walk-load")
    tokens = api.tokenize("hello", add_special=False, with_pieces=True)
    results["tokens"] = {k: v for k, v in tokens.items() if k != "max_seq_len_limit"}  # the free memory's
    results["detokenize"] = api.detokenize(ids)
    model = api.get_model()
    results["model"] = {k: v for k, v in model.items() if k != "max_seq_len_limit"}  # the free memory's
    results["model by name"] = api.get_model(model["id"])["id"]
    try:
        api.get_model("no-such-model")
    except NotFound as exc:
        results["model unknown"] = (exc.code, exc.message)
    results["close"] = _session(api.close_session("walk-new"))
    api.delete_snapshot(snap["id"])
    results["sessions"] = sorted(s["id"] for s in api.list_sessions()["sessions"])
    return results


def _session(info: dict) -> dict:
    return {k: info[k] for k in ("id", "position", "max_seq_len", "message_count", "ephemeral")}


def _snapshot(info: dict) -> dict:
    return {k: info.get(k) for k in ("title", "description", "tags")}


def test_each_api_method_is_one_declared_operation_with_its_own_route():
    from superlinear.api import Api

    methods = {name for name in vars(Api) if not name.startswith("_") and callable(getattr(Api, name))} - {"close"}
    assert sorted(op.method for op in protocol.OPERATIONS) == sorted(methods)
    assert len({(op.http.method, op.http.route) for op in protocol.OPERATIONS}) == len(protocol.OPERATIONS)


def test_every_declared_field_survives_http_as_in_process(tiny_llama, tmp_path):
    local = superlinear.connect("local", model=str(tiny_llama), max_seq_len=2048,
                                snapshots_dir=str(tmp_path / "local-snapshots"))
    try:
        ids = local.tokenize("red green", add_special=False)["tokens"][:2]
        in_process = walk(local, ids)
    finally:
        local.close()
    server = start_server(api_key=None, extra_args=("--model", str(tiny_llama)))
    try:
        with superlinear.connect(server.url) as remote:
            over_http = walk(remote, ids)
    finally:
        server.stop()
        shutil.rmtree(server.tmp, ignore_errors=True)
    for label in in_process:
        assert over_http[label] == in_process[label], label
    # the fields did something: logprobs came back (the prompt's with echo), the biased token was picked
    assert any(isinstance(e, Logprobs) for e in in_process["sampling.logprobs"])
    assert any(isinstance(e, Logprobs) and not e.prompt for e in in_process["completion.sampling.logprobs"])
    prompt = [e for e in in_process["completion.echo+logprobs"] if isinstance(e, Logprobs) and e.prompt]
    assert len(prompt) == 1 and len(prompt[0].tokens) > 1 and prompt[0].tokens[1].top
    text = "".join(getattr(e, "text", "") for e in in_process["sampling.logit_bias"] if type(e).__name__ == "TextDelta")
    assert text, "the biased token was never picked"
    assert in_process["load"]["ephemeral"] is True and in_process["resize"]["max_seq_len"] == 512
    assert in_process["model unknown"][0] == "model_not_found" and in_process["model"]["fingerprint"]
