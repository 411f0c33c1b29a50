"""Sizes bounded before work, and big bodies and replies encoded off the event loop.

Each route declares its ``Bounds`` beside it (``declare``): the most bytes its body may have
(refused while it streams in, before any parsing), the most characters of text that reach the
model, the most items of its lists, and what its reply may hold. docs/server.md lists them;
tests/test_server_bounds.py checks the table against ``table()``.

A body larger than ``PARSE_ON_LOOP_BYTES`` is parsed and validated in a thread, so ``/health`` and
other requests keep being answered; a reply that can be large is encoded in one (``json_reply``). Token ids are counted
against the longest conversation the server can hold; text is bounded by its characters before
it is tokenized (a token stands for at most ``max_token_bytes`` of text), and every string a
prompt is made of counts (message contents, names, tool calls' arguments, the tools' names,
descriptions and schemas): an oversized prompt is a 413 at once instead of minutes on the
model's worker.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from superlinear.engine import limits
from superlinear.errors import BodyTooLarge, TooLarge

from .http import MAX_BODY_BYTES, read_body
from .schemas import MAX_JSON_DEPTH, parse_body

PARSE_ON_LOOP_BYTES = 256 << 10  # parses (or encodes) in about a millisecond
ID_JSON_BYTES = 16  # the most bytes one token id takes in a JSON list ("4294967295, ")
_SLACK = 64 << 10  # the rest of a body around its list of ids
SMALL_BODY_BYTES = 64 << 10  # the API's operations: ids, a title, tags
MAX_RESPONSE_FORMAT_CHARS = 1 << 20  # a JSON schema compiled into a grammar on the worker
MAX_LOGIT_BIAS = 1024  # entries; OpenAI takes 300
MAX_TOKENIZE_CHARS = 4 << 20  # one tokenization holds ~100 bytes per character while it runs
TOKENIZE_BODY_BYTES = MAX_TOKENIZE_CHARS * 6 + _SLACK  # a character is at most 6 bytes of JSON ("\\u00e9")
SAMPLING_ITEMS = (f"stop {limits.MAX_STOPS} of {limits.MAX_STOP_CHARS} characters; logit_bias {MAX_LOGIT_BIAS}; "
                  f"response_format {MAX_RESPONSE_FORMAT_CHARS:,} characters")
TOKEN_LIMIT = "the conversation limit"  # ``token_limit``: what the memory budget lets one session hold


@dataclass(frozen=True)
class Bounds:
    """What one route takes and gives, checked before any work (``None``: not applicable)."""

    method: str
    path: str
    body_bytes: int | str = SMALL_BODY_BYTES  # or how it is computed
    depth: int | None = MAX_JSON_DEPTH  # JSON nesting of the body
    text: str | None = None  # the characters that become tokens: at most what fits TOKEN_LIMIT
    items: str | None = None  # list lengths
    reply: str | None = None  # what the answer may hold
    body: type | str | None = None  # the request body's schema (a pydantic model) or media type, for /openapi.json

    def row(self) -> str:
        size = f"{self.body_bytes:,} bytes" if isinstance(self.body_bytes, int) else self.body_bytes
        cells = [f"`{self.method} {self.path}`", size, "-" if self.depth is None else str(self.depth),
                 self.text or "-", self.items or "-", self.reply or "-"]
        return "| " + " | ".join(cells) + " |"


ROUTES: dict[tuple[str, str], Bounds] = {}


def declare(method: str, path: str, **fields) -> Bounds:
    """Declare the bounds of the route ``method path`` (next to its handler)."""
    bounds = Bounds(method, path, **fields)
    ROUTES[(method, path)] = bounds
    return bounds


def document_bodies(schema: dict) -> dict:
    """Add each declared route's request body to an OpenAPI ``schema`` (the routes read their
    bodies themselves, so FastAPI cannot see them)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for (method, path), bounds in ROUTES.items():
        operation = schema.get("paths", {}).get(path, {}).get(method.lower())
        if operation is None or bounds.body is None:
            continue
        if isinstance(bounds.body, str):
            content = {bounds.body: {"schema": {"type": "string", "format": "binary"}}}
        else:
            own = bounds.body.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(own.pop("$defs", {}))
            components[bounds.body.__name__] = own
            content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{bounds.body.__name__}"}}}
        operation["requestBody"] = {"required": True, "content": content}
    return schema


def table() -> str:
    """The bounds of every declared route as a markdown table (docs/server.md holds it)."""
    head = ["| Route | Body | JSON depth | Text to the model | Items | Reply |",
            "|---|---|---|---|---|---|"]
    return "\n".join(head + [b.row() for _, b in sorted(ROUTES.items())])


async def parse_request(request: Request, model, *, limit: int = MAX_BODY_BYTES, allow_empty: bool = False,
                        lenient: bool = False):
    raw = await read_body(request, limit)
    if len(raw) <= PARSE_ON_LOOP_BYTES:
        return parse_body(raw, model, allow_empty=allow_empty, lenient=lenient)
    return await asyncio.to_thread(parse_body, raw, model, allow_empty=allow_empty, lenient=lenient)


def encode_json(content) -> bytes:
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


async def json_reply(content, *, status_code: int = 200) -> Response:
    """``content`` as a JSON response, encoded in a thread: a long list of token ids, pieces or
    messages takes seconds to encode, never on the event loop."""
    return Response(await asyncio.to_thread(encode_json, content), status_code=status_code,
                    media_type="application/json")


def token_limit(rt) -> int:
    """The most tokens any conversation on this server can hold."""
    return rt.api.get_model()["max_seq_len_limit"]


def ids_body_limit(rt) -> int:
    """The largest body that can carry ``token_limit`` ids: a longer one is refused as it streams."""
    return min(MAX_BODY_BYTES, token_limit(rt) * ID_JSON_BYTES + _SLACK)


def check_ids(rt, ids: list, param: str) -> None:
    limit = token_limit(rt)
    if len(ids) > limit:
        raise TooLarge(f"{param} has {len(ids)} token ids; a conversation here holds at most {limit}", param=param)


def check_sampling(body) -> None:
    """The sampling fields' sizes (``SAMPLING_ITEMS``; stop sequences are bounded by the schema)."""
    check_items(len(body.logit_bias or ()), MAX_LOGIT_BIAS, "logit_bias")
    check_chars(string_chars(body.response_format), MAX_RESPONSE_FORMAT_CHARS, "response_format")


def check_items(count: int, limit: int, param: str) -> None:
    if count > limit:
        raise BodyTooLarge(f"{param} has {count} entries; at most {limit} are allowed", param=param)


def check_chars(chars: int, limit: int, param: str) -> None:
    if chars > limit:
        raise BodyTooLarge(f"{param} has {chars} characters; at most {limit} are allowed", param=param)


_TOKENS_PER_MESSAGE: dict[int, int] = {}


def tokens_per_message(tokenizer) -> int:
    """The fewest tokens the chat template adds for one message (its role markers), measured once
    per tokenizer from two renderings; 1 when the template cannot say."""
    key = id(tokenizer)
    if key not in _TOKENS_PER_MESSAGE:
        from superlinear.engine import tokens

        turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}] * 2
        try:  # what one more user message adds, and one more assistant message: the fewer of the two
            lengths = [len(tokens.tokenize_messages(tokenizer, turns[:n], False)) for n in (2, 3, 4)]
            _TOKENS_PER_MESSAGE[key] = max(1, min(lengths[1] - lengths[0], lengths[2] - lengths[1]))
        except Exception:  # noqa: BLE001 - a template that refuses empty messages: the safe floor
            _TOKENS_PER_MESSAGE[key] = 1
    return _TOKENS_PER_MESSAGE[key]


async def check_text(rt, chars: int, param: str, *, messages: int = 0, pieces: int = 0) -> None:
    """Refuse a text of ``chars`` characters in ``messages`` messages (each at least the template's
    own tokens) and ``pieces`` other parts (tools: at least a token each) that cannot fit in
    ``token_limit`` tokens: counted before anything is rendered or tokenized."""
    limit = token_limit(rt)
    tokenizer = rt.api.model.tokenizer
    per = 1 if tokenizer is None or not messages else await asyncio.to_thread(tokens_per_message, tokenizer)
    floor = messages * per + pieces  # tokens the template and the tools add, whatever the text
    if floor > limit:
        raise TooLarge(f"{param} has {messages} messages and {pieces} other entries: at least {floor} tokens, more "
                       f"than the {limit} tokens a conversation here holds", param=param)
    if chars + floor <= limit or tokenizer is None:  # every token stands for at least one character
        return
    from superlinear.engine import tokens

    at_least = -(-chars // await asyncio.to_thread(tokens.max_token_bytes, tokenizer)) + floor
    if at_least > limit:
        raise TooLarge(f"{param} has {chars} characters, at least {at_least} tokens: more than the {limit} "
                       "tokens a conversation here holds; send less text", param=param)


def string_chars(value) -> int:
    """The characters of every string (keys included) inside ``value``: parsed JSON or pydantic
    models, walked without recursion (a tool's schema may nest)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__pydantic_fields__"):
            stack.extend(item.__dict__.values())
            stack.extend((item.__pydantic_extra__ or {}).items())
    return total
