"""Structured output: OpenAI's ``response_format`` as a token mask at every step (llguidance).

``json_object`` allows any JSON object, ``json_schema`` the JSON its schema describes; both
without free whitespace (a small model given room for blanks tends to fill it). llguidance
computes each step's mask from the grammar's state in Rust and applies it as a bitmask to the
logits tensor: no Python work per vocabulary entry. It cost the least per token of the three
libraries measured (docs/server.md, scripts/bench_grammar_libs.py).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import torch

from superlinear.errors import InvalidRequest

_JSON_DEFAULTS = {"whitespace_flexible": False}
_LOCK = threading.Lock()
_TOKENIZERS: dict[tuple[int, tuple[int, ...]], tuple[object, object]] = {}  # (id(hf), ends) -> (hf, LLTokenizer)


def grammar_of(response_format: dict | None) -> str | None:
    """The llguidance grammar of a ``response_format`` (None: plain text); ``InvalidRequest``
    for a format or schema it cannot take. Cheap: the server checks it before any work."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidRequest("response_format must be an object", param="response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: object = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                                 param="response_format.json_schema.schema")
    else:
        raise InvalidRequest(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                             param="response_format.type", code="unsupported_value")
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_DEFAULTS)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(f"response_format: the JSON schema is not usable: {error}",
                             param="response_format.json_schema.schema")
    return grammar


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

        self.lltok = _lltokenizer(tokenizer, end_ids)
        self.matcher = llguidance.LLMatcher(self.lltok, grammar)
        if self.matcher.is_error():
            raise InvalidRequest(f"response_format: {self.matcher.get_error()}", param="response_format")
        self.bitmask = lt.allocate_token_bitmask(1, self.lltok.vocab_size)  # int32 words: token 32w+i is bit i of w
        self._fill = lt.fill_next_token_bitmask
        self._minus_inf = torch.tensor(float("-inf"))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [V]`` with the tokens the grammar does not allow next at -inf. The bitmask
        is unpacked by numpy (little-endian words, so the bytes' bits in order are the tokens');
        llguidance's own apply is a torch.compile kernel: seconds of compiling on a server's
        first structured request, and a compiler needed on the machine."""
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
