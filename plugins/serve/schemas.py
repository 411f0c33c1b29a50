"""Request bodies of the HTTP API (pydantic). Unknown fields are accepted and ignored, the way
OpenAI-compatible servers usually do, but every known field is type-checked: a wrong type is a
400 that names the field (``param``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from superlinear.errors import InvalidRequest, TooLarge

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


class RepetitionOptions(BaseModel):
    model_config = _FORBID
    tail_len: int = Field(32, ge=2)
    min_repeats: int = Field(3, ge=2)
    max_period: int = Field(64, ge=1)


class ChatCompletionRequest(BaseModel):
    model_config = _ALLOW
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    response_format: dict | None = None
    logprobs: StrictBool | None = None
    # spl extensions (OpenAI clients send them with extra_body=...)
    session_id: str | None = None
    session_mode: Literal["auto", "append", "replace"] = "auto"
    reasoning_budget: int | None = Field(None, ge=0)
    repetition_detection: StrictBool | RepetitionOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    keep_thinking: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest(f"n={self.n} is not supported: spl returns one choice per request (n=1)",
                                 param="n", code="unsupported_value")
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported", param="logprobs", code="unsupported_value")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequest(f"response_format {self.response_format.get('type')!r} is not supported",
                                 param="response_format", code="unsupported_value")
        if isinstance(self.tool_choice, dict):
            fn = self.tool_choice.get("function")
            if self.tool_choice.get("type") != "function" or not isinstance(fn, dict) or not fn.get("name"):
                raise InvalidRequest('tool_choice must be "none", "auto", "required" or '
                                     '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type not in ("text", "input_text") or part.text is None:
                        raise InvalidRequest(
                            f"content part type {part.type!r} is not supported (text only)",
                            param=f"messages.{i}.content.{j}", code="unsupported_value")

    def plain_messages(self) -> list[dict]:
        """Messages as plain dicts with text content (parts joined), as the engine takes them."""
        out = []
        for m in self.messages:
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


class CreateSession(BaseModel):
    model_config = _FORBID
    session_id: str | None = None
    max_seq_len: int | None = Field(None, ge=1)


class ForkSession(BaseModel):
    model_config = _FORBID
    new_session_id: str | None = None


class RollbackSession(BaseModel):
    model_config = _FORBID
    n_messages: int


class ResizeSession(BaseModel):
    model_config = _FORBID
    max_seq_len: int = Field(ge=1)


class SaveSession(BaseModel):
    model_config = _FORBID
    title: str | None = None
    description: str | None = None
    tags: list[str] | None = None


class PatchSnapshot(BaseModel):
    model_config = _FORBID
    title: str | None = None
    description: str | None = None
    tags: list[str] | None = None


class LoadSnapshot(BaseModel):
    model_config = _FORBID
    session_id: str | None = None
    force: StrictBool = False
    max_seq_len: int | None = Field(None, ge=1)


def parse_body(raw: bytes, model: type[BaseModel], *, allow_empty: bool = False,
               max_bytes: int | None = None) -> BaseModel:
    """Bytes -> a validated request model; anything malformed is ``InvalidRequest`` (400)."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise TooLarge(f"request body is {len(raw)} bytes; the limit is {max_bytes}", code="body_too_large")
    if not raw.strip():
        if allow_empty:
            raw = b"{}"
        else:
            raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not {type(data).__name__}",
                             code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def validation_error(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return InvalidRequest(f"{loc or 'body'}: {msg}{more}", param=loc or None, code="invalid_value")
