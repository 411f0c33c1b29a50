"""Sizes bounded before work, and big bodies parsed off the event loop.

A body is capped while it streams in (``http.read_body``); one larger than ``PARSE_ON_LOOP_BYTES``
is parsed and validated in a thread, so ``/health`` and other requests keep being answered. Token
ids are counted against the longest conversation the server can hold; a text is bounded by its
characters before it is tokenized (a token stands for at most ``max_token_bytes`` of text), so an
oversized prompt is a 413 at once instead of minutes of tokenizing on the model's worker.
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from superlinear.errors import TooLarge

from .http import MAX_BODY_BYTES, read_body
from .schemas import parse_body

PARSE_ON_LOOP_BYTES = 256 << 10  # parses in about a millisecond
ID_JSON_BYTES = 16  # the most bytes one token id takes in a JSON list ("4294967295, ")
_SLACK = 64 << 10  # the rest of a body around its list of ids


async def parse_request(request: Request, model, *, limit: int = MAX_BODY_BYTES, allow_empty: bool = False,
                        lenient: bool = False):
    raw = await read_body(request, limit)
    if len(raw) <= PARSE_ON_LOOP_BYTES:
        return parse_body(raw, model, allow_empty=allow_empty, lenient=lenient)
    return await asyncio.to_thread(parse_body, raw, model, allow_empty=allow_empty, lenient=lenient)


def token_limit(rt) -> int:
    """The most tokens any conversation on this server can hold."""
    return rt.manager.max_seq_len_limit()


def ids_body_limit(rt) -> int:
    """The largest body that can carry ``token_limit`` ids: a longer one is refused as it streams."""
    return min(MAX_BODY_BYTES, token_limit(rt) * ID_JSON_BYTES + _SLACK)


def check_ids(rt, ids: list, param: str) -> None:
    limit = token_limit(rt)
    if len(ids) > limit:
        raise TooLarge(f"{param} has {len(ids)} token ids; a conversation here holds at most {limit}", param=param)


async def check_text(rt, chars: int, param: str) -> None:
    """Refuse a text of ``chars`` characters that cannot fit in ``token_limit`` tokens."""
    limit = token_limit(rt)
    tokenizer = rt.model.tokenizer
    if chars <= limit or tokenizer is None:  # every token stands for at least one character
        return
    from superlinear.engine import tokens

    at_least = -(-chars // await asyncio.to_thread(tokens.max_token_bytes, tokenizer))
    if at_least > limit:
        raise TooLarge(f"{param} has {chars} characters, at least {at_least} tokens: more than the {limit} "
                       "tokens a conversation here holds; send less text", param=param)
