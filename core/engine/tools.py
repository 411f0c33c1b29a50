"""Tool calls: parsing the formats models emit, and describing tools to templates without tool support;
and the markup around them (tool-call blocks, the reasoning block), which the template, the turn
and the tool grammar share.

Formats (both inside ``<tool_call>…</tool_call>``, several per turn):
- Hermes / Qwen: a JSON object ``{"name": ..., "arguments": {...}}``.
- Nemotron / Qwen3-Coder: ``<function=NAME><parameter=P>value</parameter>…</function>``; a value
  is JSON-decoded (numbers stay numbers) unless the tool's schema says it is a string.
"""

from __future__ import annotations

import json
import re
import uuid

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
# The reasoning block's markers in a model's text (``ReasoningDelta``: the text between them).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Nemotron Nano v2 writes a JSON list: <TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>
TOOL_BLOCKS = {TOOL_OPEN: TOOL_CLOSE, "<TOOLCALL>": "</TOOLCALL>"}
_BLOCK_OPEN_RE = re.compile("|".join(map(re.escape, TOOL_BLOCKS)))  # the earliest opener (two never match at one place)

_FUNC_RE = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.S)
_PARAM_RE = re.compile(r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _param_types(tools: list[dict] | None, name: str) -> dict[str, str]:
    for t in tools or []:
        fn = t.get("function", t)
        if fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return {k: v.get("type") for k, v in props.items() if isinstance(v, dict)}
    return {}


def _typed_value(raw: str, declared: str | None):
    value = raw.strip("\n")
    if declared == "string":
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _as_object(arguments):
    """Tool call arguments as an object when they are a JSON string (left as they are otherwise)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            pass
    return arguments


def _call(name: str, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_tool_call_body(body: str, tools: list[dict] | None = None) -> list[dict]:
    """The calls in the text between one <tool_call> and its </tool_call> (may be empty)."""
    body = body.strip()
    if body.startswith("<function="):
        calls = []
        for name, inner in _FUNC_RE.findall(body):
            types = _param_types(tools, name)
            args = {p: _typed_value(v, types.get(p)) for p, v in _PARAM_RE.findall(inner)}
            calls.append(_call(name, args))
        return calls
    try:
        obj = json.loads(body)
    except ValueError:
        return []
    objs = obj if isinstance(obj, list) else [obj]
    calls = []
    for o in objs:
        if not isinstance(o, dict) or "name" not in o:
            continue
        calls.append(_call(o["name"], _as_object(o.get("arguments", o.get("parameters", {})))))
    return calls


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
    """Splits an answer into (content before the first tool-call block, calls). An unclosed last
    block (generation ended inside it) is parsed too."""
    block = _BLOCK_OPEN_RE.search(text)
    if block is None:
        return text, []
    content, calls = text[:block.start()], []
    while block is not None:
        closer = TOOL_BLOCKS[block.group()]
        end = text.find(closer, block.end())
        body = text[block.end():] if end == -1 else text[block.end():end]
        calls.extend(parse_tool_call_body(body, tools))
        if end == -1:
            break
        block = _BLOCK_OPEN_RE.search(text, end + len(closer))
    return content.rstrip(), calls


def arguments_as_objects(message: dict) -> dict:
    """A copy of an assistant message whose tool call arguments are dicts (what chat templates
    iterate over) instead of JSON strings (what the OpenAI API carries)."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for c in message["tool_calls"]:
        fn = dict(c.get("function", {}))
        if "arguments" in fn:
            fn["arguments"] = _as_object(fn["arguments"])
        calls.append({**c, "function": fn})
    return {**message, "tool_calls": calls}


def hermes_tools_system_prompt(tools: list[dict]) -> str:
    """Tool description for templates that know nothing about tools (Hermes convention)."""
    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to assist with the user query.\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{specs}\n</tools>\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def hermes_render_calls(message: dict) -> str:
    """An assistant message's tool calls as Hermes text (for templates without tool support)."""
    parts = []
    for c in message.get("tool_calls") or []:
        fn = c.get("function", {})
        call = {"name": fn.get("name"), "arguments": _as_object(fn.get("arguments", {}))}
        parts.append(f"{TOOL_OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{TOOL_CLOSE}")
    return "\n".join(parts)
