"""Request bodies of the HTTP API (pydantic). The generation routes take the fields of one table
(``fields.py``: a field outside it is a 400 naming it); every known field is type-checked and every
number is bounded: a wrong type or a value out of range is a 400 that names the field (``param``).

The chat and completion bodies derive from the engine's request types (``SamplingParams``,
``ChatRequest``, ``RepetitionConfig``): a field declared there with a ``doc`` is a field of the
body by the same name, type and bounds, passed through to the engine as it is; what stays
written here are the adapters, OpenAI's (vLLM's, llama.cpp's) names and shapes that differ from
the engine's (``max_completion_tokens``, ``response_format``, ``logprobs``, ``repetition_penalty``…).

Before the schema sees a body, ``parse_body`` refuses what would break the code behind it: JSON
nested deeper than ``MAX_JSON_DEPTH``, ``NaN``/``Infinity`` and lone UTF-16 surrogates in strings
(the tokenizer cannot encode them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, create_model, field_validator

from superlinear.api.types import Completion
from superlinear.defaults import TEMPERATURE as DEFAULT_TEMPERATURE
from superlinear.engine import limits
from superlinear.engine.types import ChatRequest, RepetitionConfig, SamplingParams
from superlinear.errors import BodyTooLarge, InvalidRequest

from .fields import CONSTRAINTS, check_fields

MAX_JSON_DEPTH = 64  # tool schemas nest a few levels; nothing legitimate comes close
MAX_MESSAGES = 100_000
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKENS = Field(None, ge=1, le=limits.MAX_TOKENS)

_ALLOW = ConfigDict(extra="allow")
_FORBID = ConfigDict(extra="forbid")


class ContentPart(BaseModel):
    model_config = _ALLOW
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = _ALLOW
    name: str
    arguments: str | dict = ""


class ToolCall(BaseModel):
    model_config = _ALLOW
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = _ALLOW
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(BaseModel):
    model_config = _ALLOW
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    model_config = _ALLOW
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(BaseModel):
    model_config = _ALLOW
    include_usage: StrictBool = False


def wire_fields(request_type: type, *, default_from_engine: bool = False) -> dict[str, Any]:
    """The fields of the engine's dataclass ``request_type`` that a client sets by their own name
    (``types.request_field`` with a ``doc``; ``default_from_engine``: every bounded field), as
    pydantic fields of the same type and bounds. Left out, a field is None: the engine's default."""
    hints = typing.get_type_hints(request_type)
    out = {}
    for f in dataclasses.fields(request_type):
        if "doc" not in f.metadata and not (default_from_engine and f.metadata.get("bounds")):
            continue
        kind = StrictBool if hints[f.name] is bool else hints[f.name]
        default = f.default if default_from_engine else None
        out[f.name] = (kind if default_from_engine else kind | None,
                       Field(default, description=f.metadata.get("doc"), **f.metadata["bounds"]))
    return out


def given(body: BaseModel, request_type: type) -> dict:
    """The fields of ``request_type`` that ``body`` sets (``wire_fields``), for its constructor."""
    return {f.name: getattr(body, f.name) for f in dataclasses.fields(request_type)
            if "doc" in f.metadata and getattr(body, f.name) is not None}


RepetitionOptions = create_model("RepetitionOptions", __config__=_FORBID,
                                 **wire_fields(RepetitionConfig, default_from_engine=True))


_SAMPLING_WIRE = wire_fields(SamplingParams)


class GenerationBody(create_model("SamplingWire", __config__=_ALLOW, **_SAMPLING_WIRE)):
    """What chat and plain completions share: every ``SamplingParams`` field a client sets by its
    name (derived), and the adapters: OpenAI's, vLLM's and llama.cpp's names and shapes for the
    engine's fields that differ (``fields.py`` is the table of them all). ``ROUTE``: the route's
    name in that table."""

    ROUTE: ClassVar[str]
    model: str | None = None
    top_k: int | None = Field(None, ge=-1, le=limits.MAX_TOP_K)  # -1 or 0: off (vLLM's and llama.cpp's)
    repetition_penalty: float | None = Field(None, gt=0.0, le=limits.MAX_REPEAT_PENALTY)  # vLLM's name
    stop: str | list[str] | None = None
    n_predict: int | None = Field(None, ge=-1, le=limits.MAX_TOKENS)  # llama.cpp's max_tokens (-1: no limit)
    repetition_detection: StrictBool | RepetitionOptions | None = None
    # the output constraints, at most one (fields.CONSTRAINTS); each becomes the engine's ``structured``
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, max_length=4096)
    guided_grammar: str | None = None
    structured_outputs: dict | None = None
    grammar: str | None = None  # llama.cpp's GBNF
    json_schema: dict | None = None  # llama.cpp's

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > limits.MAX_STOPS:
            raise ValueError(f"at most {limits.MAX_STOPS} stop sequences")
        if any(len(s) > limits.MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has at most {limits.MAX_STOP_CHARS} characters")
        return v

    @classmethod
    def check_body(cls, data: dict, *, lenient: bool) -> None:
        """Before validation (``parse_body``): only the fields of the route's table."""
        check_fields(data, cls.ROUTE, lenient=lenient)

    def structured(self) -> dict | None:
        """The one output constraint as the engine's ``structured`` (checked: a 400 names the
        field it came from)."""
        from superlinear.engine.grammar import from_response_format, grammar_of

        for name, make in (("response_format", lambda v: from_response_format(v)),
                           ("guided_json", lambda v: {"json": v}), ("json_schema", lambda v: {"json": v}),
                           ("guided_regex", lambda v: {"regex": v}), ("guided_choice", lambda v: {"choice": v}),
                           ("guided_grammar", lambda v: {"grammar": v}), ("grammar", lambda v: {"grammar": v}),
                           ("structured_outputs", _structured_outputs)):
            value = getattr(self, name)
            if value is not None:
                structured = make(value)
                grammar_of(structured, name)
                return structured
        return None

    def token_limit(self, max_tokens: int | None) -> int | None:
        """``max_tokens`` or llama.cpp's ``n_predict`` (-1: no limit)."""
        if max_tokens is not None or self.n_predict is None:
            return max_tokens
        return None if self.n_predict < 0 else self.n_predict

    def sampling_params(self, defaults: dict, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's sampling: the fields set, else the server's ``defaults``, else the engine's."""
        server = {"temperature": DEFAULT_TEMPERATURE, **defaults}
        fields = {**{k: v for k, v in server.items() if k in _SAMPLING_WIRE}, **given(self, SamplingParams)}
        if self.repetition_penalty is not None and self.repeat_penalty is None:
            fields["repeat_penalty"] = self.repetition_penalty
            fields.setdefault("repeat_last_n", limits.MAX_REPEAT_LAST_N)  # vLLM's: the whole prompt and output
        return SamplingParams(**fields, top_k=max(0, self.top_k or 0), max_tokens=max_tokens,
                              stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                              logprobs=logprobs, structured=self.structured())

    def repetition(self) -> RepetitionConfig | None:
        if self.repetition_detection is True:
            return RepetitionConfig()
        if self.repetition_detection in (None, False):
            return None
        return RepetitionConfig(**self.repetition_detection.model_dump())


def _structured_outputs(value: dict) -> dict:
    """vLLM's ``structured_outputs`` (``{"json" | "regex" | "choice" | "grammar" | "json_object": ...}``)."""
    if not isinstance(value, dict):
        raise InvalidRequest("structured_outputs must be an object", param="structured_outputs")
    allowed = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace", "whitespace_pattern"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidRequest(f"structured_outputs: unknown key {unknown[0]!r} (json, regex, choice, grammar, "
                             "json_object)", param=f"structured_outputs.{unknown[0]}", code="unknown_parameter")
    return {k: v for k, v in value.items() if k in ("json", "regex", "choice", "grammar", "json_object")}


class ChatCompletionRequest(create_model("ChatWire", __base__=GenerationBody, **wire_fields(ChatRequest))):
    """``/v1/chat/completions``: the ``ChatRequest`` fields a client sets by name (derived), and
    the adapters of the others."""

    ROUTE = "chat"
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = _TOKENS
    max_completion_tokens: int | None = _TOKENS
    n: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    # spl extensions (OpenAI clients send them with extra_body=...)
    session_id: str | None = None
    session_mode: Literal["auto", "append", "replace"] = "auto"
    # llama.cpp's conventions: prompt_progress chunks while the prompt is prefilled (stream only),
    # and the seconds of silence after which a ": keep-alive" comment goes out (-1: none)
    return_progress: StrictBool = False
    sse_ping_interval: float | None = Field(None, ge=-1, le=3600)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v):
        try:
            limits.check_template_kwargs(v)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return v

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest(f"n={self.n} is not supported: spl returns one choice per request (n=1)",
                                 param="n", code="unsupported_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        if isinstance(self.tool_choice, dict):
            fn = self.tool_choice.get("function")
            if self.tool_choice.get("type") != "function" or not isinstance(fn, dict) or not fn.get("name"):
                raise InvalidRequest('tool_choice must be "none", "auto", "required" or '
                                     '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, dict):
            name, known = self.tool_choice["function"]["name"], [t.function.name for t in self.tools]
            if name not in known:
                raise InvalidRequest(f"tool_choice names function {str(name)[:100]!r}, which is not in tools "
                                     f"({', '.join(known)[:300]})", param="tool_choice.function.name")
        constraint = next((n for n in CONSTRAINTS if getattr(self, n) is not None), None)
        if constraint and (self.tool_choice == "required" or isinstance(self.tool_choice, dict)):
            raise InvalidRequest(f"tool_choice {self.tool_choice!r} is a constraint of its own: send it or "
                                 f"{constraint}, not both", param=constraint, code="conflicting_parameters")
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type not in ("text", "input_text") or part.text is None:
                        raise InvalidRequest(
                            f"content part type {part.type!r} is not supported (text only)",
                            param=f"messages.{i}.content.{j}", code="unsupported_value")

    def plain_messages(self) -> list[dict]:
        return plain_messages(self.messages)

    def engine_request(self, messages: list[dict], defaults: dict) -> ChatRequest:
        """The engine's request of this body (``messages``: ``plain_messages()``)."""
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.token_limit(self.max_completion_tokens or self.max_tokens) or defaults.get("max_tokens")
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        return ChatRequest(messages=messages, tools=tools, tool_choice=self.tool_choice,
                           sampling=self.sampling_params(defaults, logprobs=logprobs, max_tokens=max_tokens),
                           repetition=self.repetition(), chat_template_kwargs=self.chat_template_kwargs,
                           **given(self, ChatRequest))


def plain_messages(messages: list[Message]) -> list[dict]:
    """Messages as plain dicts with text content (parts joined), as the engine takes them."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role}
        if isinstance(m.content, list):
            d["content"] = "".join(p.text or "" for p in m.content)
        else:
            d["content"] = m.content if m.content is not None else ""
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": tc.id, "type": "function",
                 "function": {"name": tc.function.name,
                              "arguments": tc.function.arguments if isinstance(tc.function.arguments, str)
                              else json.dumps(tc.function.arguments)}}
                for tc in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


class CompletionRequest(GenerationBody):
    """``/v1/completions``: one prompt (a string or token ids), continued as plain text."""

    ROUTE = "completions"
    prompt: str | list[int] | list[str] | list[list[int]]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=0, le=limits.MAX_TOKENS)  # 0 with echo: the prompt scored only
    echo: StrictBool = False
    n: int | None = None
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)  # the legacy API: how many alternatives

    def check_supported(self) -> None:
        for name in ("n", "best_of"):
            if getattr(self, name) not in (None, 1):
                raise InvalidRequest(f"{name}={getattr(self, name)} is not supported: one completion per request",
                                     param=name, code="unsupported_value")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens 0 generates nothing: it needs echo (the prompt, scored with logprobs)",
                                 param="max_tokens")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise InvalidRequest(f"one prompt per request, got {len(self.prompt)}", param="prompt",
                                     code="unsupported_value")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a string or token ids (a list of one of them unwrapped)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]
        return p

    def engine_request(self, prompt: str | list[int], defaults: dict) -> Completion:
        """The API's request of this body (``prompt``: ``single_prompt()``)."""
        sampling = self.sampling_params(defaults, max_tokens=self.token_limit(self.max_tokens), logprobs=self.logprobs)
        return Completion(prompt, sampling, self.repetition(), echo=self.echo)


class TokenizeRequest(BaseModel):
    """``/tokenize``: llama.cpp's ``content`` or vLLM's ``prompt`` (a text), or ``messages``
    (rendered with the chat template, as a chat turn prefills them)."""

    model_config = _ALLOW
    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special: StrictBool | None = None  # llama.cpp's name
    add_special_tokens: StrictBool | None = None  # vLLM's
    add_generation_prompt: StrictBool = True
    with_pieces: StrictBool = False

    def text_or_messages(self) -> str | list[dict]:
        given = [x for x in (self.content, self.prompt, self.messages) if x is not None]
        if len(given) != 1:
            raise InvalidRequest("send exactly one of content (or prompt) and messages", param="content")
        return plain_messages(self.messages) if self.messages is not None else given[0]

    def special(self) -> bool:
        for value in (self.add_special, self.add_special_tokens):
            if value is not None:
                return value
        return True  # what a /v1/completions prompt gets


class DetokenizeRequest(BaseModel):
    model_config = _ALLOW
    model: str | None = None
    tokens: list[int] = Field(max_length=limits.MAX_TOKENS)


def parse_body(raw: bytes, model: type[BaseModel], *, allow_empty: bool = False,
               max_bytes: int | None = None, lenient: bool = False) -> BaseModel:
    """Bytes -> a validated request model; anything malformed is ``InvalidRequest`` (400). A
    model's ``check_body(data, lenient=...)`` sees the parsed JSON first (a generation request
    takes only the fields of ``fields.py``'s table; ``lenient``: unknown ones are dropped)."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise BodyTooLarge(f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    if not raw.strip():
        if allow_empty:
            raw = b"{}"
        else:
            raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequest(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                             code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not {type(data).__name__}",
                             code="invalid_json")
    check_json_values(data)
    check_body = getattr(model, "check_body", None)
    if check_body is not None:
        check_body(data, lenient=lenient)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data) from exc


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def check_json_values(data) -> None:
    """Refuse nesting deeper than ``MAX_JSON_DEPTH``, non-finite numbers and strings (or keys)
    with lone surrogates; iterative, so a hostile body cannot exhaust the stack. The error
    names the field (``messages.0.content``)."""
    stack: list[tuple[Any, int, tuple]] = [(data, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                _bad(path, "contains a lone UTF-16 surrogate (not valid Unicode text)")
        elif isinstance(value, float):
            if not math.isfinite(value):
                _bad(path, "is not a finite number")
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                _bad(path, f"is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    _bad(path, "has a key with a lone UTF-16 surrogate")
                if isinstance(item, (str, float, dict, list)):
                    stack.append((item, depth + 1, (path, key)))


def _bad(path: tuple, problem: str):
    parts = []
    while path:
        path, key = path
        parts.append(str(key))
    name = ".".join(reversed(parts))
    raise InvalidRequest(f"{name or 'the request body'} {problem}", param=name or None, code="invalid_value")


def validation_error(exc: ValidationError, data: Any = None) -> InvalidRequest:
    """The most telling problem as one 400: for a field that may be one of several types (a
    union) pydantic reports every alternative; the one that got furthest into the value says
    what is wrong (``repetition_detection.max_period: ... less than or equal to 1024``)."""
    errors = exc.errors()
    if not errors:
        return InvalidRequest(f"body: {exc}", code="invalid_value")
    paths = [_real_path(e.get("loc", ()), data, e.get("type") == "missing") for e in errors]
    best = max(range(len(errors)), key=lambda i: len(paths[i]))
    first, loc = errors[best], ".".join(str(p) for p in paths[best])
    others = {tuple(p[:1]) for p in paths} - {tuple(paths[best][:1])}
    more = f" (and {len(others)} more problem(s))" if others else ""
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return InvalidRequest(f"{loc or 'body'}: {msg}{more}", param=loc or None, code="invalid_value")


def _real_path(loc: tuple, data: Any, missing: bool) -> list:
    """``loc`` without pydantic's union-member steps (``bool``, ``RepetitionOptions``): the keys
    and indices that exist in the body, plus the name of a missing required field."""
    if data is None:
        return list(loc)
    path, node = [], data
    for i, step in enumerate(loc):
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif not (missing and i == len(loc) - 1 and isinstance(node, dict)):
            continue
        path.append(step)
    return path
