"""Structured output: one constraint per generation, as a token mask at every step (llguidance).

Every way a request constrains its output comes here in one shape, ``structured`` (vLLM's
``structured_outputs``): exactly one of ``{"json": schema}`` (``"strict": true`` beside it: no
extra keys, every property required), ``{"json_object": true}``, ``{"regex": "..."}``,
``{"choice": ["a", "b"]}``, ``{"grammar": "..."}`` (Lark, or llama.cpp's GBNF, converted) and
``{"tools": {"tools": [...], "choice": "required" | "auto" | name, "format": "hermes" | "xml"}}``
(the model's tool-call markup over the declared tools' names and parameter schemas). The server
turns OpenAI's ``response_format``, vLLM's ``guided_*`` and llama.cpp's ``grammar`` /
``json_schema`` into it (``from_response_format`` and the request schemas).

JSON comes without free whitespace (a small model given room for blanks tends to fill it).
llguidance computes each step's mask from the grammar's state in Rust and applies it as a
bitmask to the logits tensor: no Python work per vocabulary entry. It cost the least per token
of the three libraries measured (docs/server.md, scripts/bench_grammar_libs.py).
"""

from __future__ import annotations

import copy
import json
import threading

from superlinear.errors import InvalidRequest

from .tools import THINK_CLOSE, TOOL_CLOSE, TOOL_OPEN

STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar", "tools")
_JSON_DEFAULTS = {"whitespace_flexible": False}
_LOCK = threading.Lock()
_TOKENIZERS: dict[tuple[int, tuple[int, ...]], tuple[object, object]] = {}  # (id(hf), ends) -> (hf, LLTokenizer)


def from_response_format(response_format) -> dict | None:
    """OpenAI's ``response_format`` as a ``structured`` constraint (None: plain text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidRequest("response_format must be an object", param="response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                                 param="response_format.json_schema.schema")
        return {"json": schema, "strict": spec.get("strict") is True}
    raise InvalidRequest(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                         param="response_format.type", code="unsupported_value")


def strict_schema(schema: dict, *, require_all: bool = True) -> dict:
    """OpenAI's ``strict: true``: every object schema closed (``additionalProperties: false``)
    with all its properties required, at every depth (a copy; ``schema`` is left as it is).
    ``require_all=False`` only closes the objects that list properties and do not say whether
    they are open."""
    out = copy.deepcopy(schema)
    stack: list = [out]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if node.get("type") == "object" or isinstance(node.get("properties"), dict):
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            if require_all:
                node["additionalProperties"] = False
                node["required"] = list(props)
            elif "properties" in node:  # a bare {"type": "object"} stays any object
                node.setdefault("additionalProperties", False)
        for key, value in node.items():
            if key not in ("enum", "const") and isinstance(value, (dict, list)):
                stack.append(value)
    return out


def grammar_of(structured: dict | None, param: str = "structured_outputs") -> str | None:
    """The llguidance grammar of a ``structured`` constraint (None: plain text);
    ``InvalidRequest`` for one it cannot take. Cheap enough that the server checks it before
    any work."""
    if structured is None:
        return None
    if not isinstance(structured, dict):
        raise InvalidRequest(f"{param} must be an object", param=param)
    kinds = [k for k in STRUCTURED_KINDS if structured.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise InvalidRequest(f"{param} takes exactly one of {', '.join(STRUCTURED_KINDS)}; got "
                             f"{', '.join(kinds) or 'none'}", param=param)
    kind = kinds[0]
    value = structured[kind]
    import llguidance

    try:
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else _schema(value, param)
            if structured.get("strict"):
                schema = strict_schema(schema)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_DEFAULTS)
        elif kind == "regex":
            if not isinstance(value, str):
                raise InvalidRequest(f"{param}: a regex is a string", param=param)
            grammar = llguidance.LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise InvalidRequest(f"{param}: choice is a non-empty list of non-empty strings", param=param)
            grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(map(json.dumps, value)))
        elif kind == "grammar":
            grammar = llguidance.LLMatcher.grammar_from_lark(_lark(value, param))
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(tools_lark(**_tools_spec(value, param)))
    except (ValueError, TypeError, RuntimeError) as exc:  # llguidance's parse errors
        raise InvalidRequest(f"{param}: the {kind} is not usable: {exc}", param=param) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(f"{param}: the {kind} is not usable: {error}", param=param)
    return grammar


def _schema(value, param: str) -> dict:
    if isinstance(value, str):  # vLLM's guided_json may be a JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRequest(f"{param}: the JSON schema is not valid JSON", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param}: a JSON schema is an object", param=param)
    return value


def _lark(text, param: str) -> str:
    """A grammar in Lark syntax (llguidance's); llama.cpp's GBNF (``root ::= ...``) converted."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"{param}: a grammar is a non-empty string (Lark or GBNF)", param=param)
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(text)
    except Exception as exc:  # noqa: BLE001 - the converter raises its own and plain errors on bad input
        raise InvalidRequest(f"{param}: the GBNF grammar does not parse: {exc}", param=param) from None


def _tools_spec(value, param: str) -> dict:
    if not isinstance(value, dict) or not isinstance(value.get("tools"), list) or not value["tools"]:
        raise InvalidRequest(f"{param}: tools needs a list of tools", param=param)
    return {"tools": value["tools"], "choice": value.get("choice", "required"), "fmt": value.get("format", "hermes"),
            "reasoning": bool(value.get("reasoning")), "parallel": bool(value.get("parallel"))}


def tools_lark(tools: list[dict], choice: str = "required", fmt: str = "hermes", reasoning: bool = False,
               parallel: bool = False) -> str:
    """A Lark grammar of tool calls in the model's markup: ``choice`` "required" (a call to any
    tool), "auto" (free text without the markup, or such text and then a call) or a tool's name
    (a call to it). Each call's arguments follow that tool's parameter schema.
    ``reasoning``: the prompt opened a ``<think>`` block, free until it closes; ``parallel``:
    several calls may follow each other (else one: a small model given the choice tends to call
    again and again)."""
    functions = [t.get("function", t) for t in tools]
    if choice not in ("required", "auto"):
        functions = [f for f in functions if f.get("name") == choice]
        if not functions:
            raise InvalidRequest(f"tool_choice names {choice!r}, which is not in tools", param="tool_choice")
    calls = [_xml_call(f) if fmt == "xml" else _hermes_call(f) for f in functions]
    # llguidance's lexemes are greedy and never backtrack: free text that may be followed by a
    # marker is one lexeme ending at the marker's first occurrence (a regex with its complement)
    lines = [f"call_{i}: {body}" for i, body in enumerate(calls)]
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(calls))))
    opener, closer = json.dumps(TOOL_OPEN + "\n"), json.dumps("\n" + TOOL_CLOSE)
    lines.append(f"block: {opener} call {closer}")
    more = ' ("\\n" block)*' if parallel else ""
    if choice == "auto":
        lines.append(f"TEXT: {_free_text(TOOL_OPEN, '')}")
        lines.append(f"TEXT_OPEN: {_free_text(TOOL_OPEN, TOOL_OPEN + chr(10))}")
        lines.append(f"answer: TEXT | TEXT_OPEN call {closer}{more}")
    elif choice == "required":
        lines.append(f"answer: block{more}")
    else:
        lines.append("answer: block")
    if reasoning:
        lines.append(f"THOUGHT: {_free_text(THINK_CLOSE, THINK_CLOSE)}")
        lines.append("start: THOUGHT /[ \\t\\n]*/ answer")
    else:
        lines.append("start: answer")
    return "\n".join(lines)


def _free_text(marker: str, end: str) -> str:
    """A regex lexeme: text without ``marker`` (``end`` empty, at least one character), or text
    ending in ``end`` (which starts with ``marker``) with no ``marker`` before it."""
    m = marker.replace("/", "\\/")
    if not end:
        return f"/(?s:.+)/ & ~/(?s:.*){m}(?s:.*)/"
    e = end.replace("/", "\\/").replace("\n", "\\n")
    return f"/(?s:.*){e}/ & ~/(?s:.*){m}(?s:.*){m}(?s:.*)/"


def _parameters(function: dict) -> dict:
    """A tool's parameter schema, its objects closed unless they say otherwise (a call's arguments
    are the declared ones; a small model left free invents more and never ends); all required
    too with the function's ``strict: true``."""
    params = function.get("parameters")
    params = params if isinstance(params, dict) and params else {"type": "object", "properties": {}}
    return strict_schema(params, require_all=function.get("strict") is True)


def _json(schema: dict) -> str:
    """Lark's embedded JSON of ``schema``, compact as the response formats' (no free blanks)."""
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_DEFAULTS})


def _hermes_call(function: dict) -> str:
    """``{"name": NAME, "arguments": {...}}`` (the Hermes / Qwen markup's JSON)."""
    return _json({"type": "object", "properties": {"name": {"const": function.get("name")},
                                                   "arguments": _parameters(function)},
                  "required": ["name", "arguments"], "additionalProperties": False})


def _xml_call(function: dict) -> str:
    """``<function=NAME>`` then ``<parameter=P>value</parameter>`` per property (Nemotron /
    Qwen3-Coder): a string value is raw text without ``<``, any other a JSON value of its schema."""
    params = _parameters(function)
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    parts = [json.dumps(f"<function={function.get('name')}>\n")]
    for name, schema in props.items():
        opener = json.dumps(f"<parameter={name}>\n")
        if isinstance(schema, dict) and schema.get("type") == "string":  # the value and its closing: one lexeme
            item = f"{opener} /[^<]*\\n<\\/parameter>\\n/"
        else:
            item = f'{opener} {_json(schema if isinstance(schema, dict) else {})} "\\n</parameter>\\n"'

        parts.append(item if name in required else f"({item})?")
    parts.append(json.dumps("</function>"))
    return " ".join(parts)


def _lltokenizer(tokenizer, end_ids: list[int]):
    """llguidance's view of ``tokenizer`` with ``end_ids`` as its end tokens; built once per
    tokenizer (it reads the whole vocabulary)."""
    import llguidance.hf

    key = (id(tokenizer), tuple(end_ids))
    with _LOCK:
        hit = _TOKENIZERS.get(key)
        if hit is None or hit[0] is not tokenizer:
            hit = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, eos_token=list(end_ids) or None))
            _TOKENIZERS[key] = hit
        return hit[1]


class Grammar:
    """One generation's grammar state: ``mask(logits)`` before a pick, ``accept(token)`` after."""

    def __init__(self, tokenizer, grammar: str, end_ids: list[int]):
        import llguidance
        import llguidance.torch as lt
        import torch

        self.lltok = _lltokenizer(tokenizer, end_ids)
        self.matcher = llguidance.LLMatcher(self.lltok, grammar)
        if self.matcher.is_error():
            raise InvalidRequest(f"structured output: {self.matcher.get_error()}", param="structured_outputs")
        self.bitmask = lt.allocate_token_bitmask(1, self.lltok.vocab_size)  # int32 words: token 32w+i is bit i of w
        self._fill = lt.fill_next_token_bitmask
        self._minus_inf = torch.tensor(float("-inf"))

    @property
    def finished(self) -> bool:
        """The grammar's text is complete and nothing may follow (only an end token)."""
        return self.matcher.is_stopped()

    def mask(self, logits):
        """``logits [V]`` with the tokens the grammar does not allow next at -inf. The bitmask
        is unpacked by numpy (little-endian words, so the bytes' bits in order are the tokens');
        llguidance's own apply is a torch.compile kernel: seconds of compiling on a server's
        first structured request, and a compiler needed on the machine."""
        import numpy as np
        import torch

        if self.matcher.is_error():  # a token the engine inserted broke it: constrain no more
            return logits
        self._fill(self.matcher, self.bitmask, 0)
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little").view(np.bool_)
        allowed = torch.from_numpy(bits)
        if allowed.numel() < logits.numel():  # ids past the tokenizer's vocabulary (padded embeddings)
            allowed = torch.cat([allowed, allowed.new_zeros(logits.numel() - allowed.numel())])
        allowed = allowed[:logits.numel()].to(logits.device)
        return torch.where(allowed, logits, self._minus_inf.to(logits.device))

    def accept(self, token: int) -> None:
        if not self.matcher.is_error():
            self.matcher.consume_token(token)
