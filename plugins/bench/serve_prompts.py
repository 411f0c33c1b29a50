"""Prompts for ``spl bench serve``: real English text sized to a number of tokens of the server's
own tokenizer, made on the client without downloading anything.

The text is the Python documentation that every Python installation carries
(``pydoc_data.topics``: the language reference, ~460K characters); where a distribution left it
out, the needle bench's generated sentences stand in. The server tokenizes a slice of it once
(``/tokenize``, a route spl, vLLM and llama.cpp's server have); a prompt of n tokens is then the
text of n consecutive corpus tokens (``/detokenize``) from an offset drawn per request, so no two
prompts share a prefix a cache could reuse. The chat template's own tokens (counted once with
``/tokenize`` on messages) are taken off, so the prompt the server prefills has about n tokens.
A server without these routes gets text sized by characters (about 4 per token): ``sizing``
says which was used, and every request's real prompt length comes back in its usage anyway.
"""

from __future__ import annotations

import random

import httpx

CORPUS_CHARS = 200_000  # tokenized once: ~45K tokens of distinct text; longer prompts wrap around
SMALL_CORPUS_CHARS = 8_000
DETOKENIZE_CHUNK = 32_768  # token ids per /detokenize call
CHARS_PER_TOKEN = 4.0  # the estimate where the server cannot tokenize


def corpus_text(limit: int = CORPUS_CHARS) -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its documentation data
        from superlinear.plugins.bench.niah import filler

        source = filler("varied", random.Random(0))
        return " ".join(next(source) for _ in range(limit // 40))[:limit]
    text = "\n\n".join(topics[name].strip() for name in sorted(topics))
    return text[:limit]


class PromptMaker:
    """User messages of a given number of tokens (``make``), after ``calibrate`` asked the
    server for its tokenization of the corpus."""

    def __init__(self, http: httpx.AsyncClient, model: str):
        self.http, self.model = http, model
        self.text = corpus_text()
        self.ids: list[int] = []
        self.template_tokens = 0
        self.sizing = "approximate"

    async def calibrate(self) -> None:
        try:
            self.ids = await self._corpus_ids()
            empty = [{"role": "user", "content": ""}]
            counted = await self._post("/tokenize", {"model": self.model, "messages": empty,
                                                     "add_generation_prompt": True})
            self.template_tokens = int(counted.get("count", len(counted.get("tokens", []))))
            await self._detokenize(self.ids[:4])
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            self.ids, self.template_tokens = [], 0  # this server cannot tokenize for us: estimate
            return
        if len(self.ids) >= 64:
            self.sizing = "tokenize"
        else:
            self.ids = []

    async def _corpus_ids(self) -> list[int]:
        """The corpus in tokens; a server that refuses a text longer than its context (vLLM's
        /tokenize may) gets a slice of a few thousand tokens."""
        body = {"model": self.model, "add_special_tokens": False}
        try:
            return (await self._post("/tokenize", {**body, "prompt": self.text}))["tokens"]
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in (400, 413):
                raise
            return (await self._post("/tokenize", {**body, "prompt": self.text[:SMALL_CORPUS_CHARS]}))["tokens"]

    async def make(self, tokens: int, rng: random.Random, *, first_turn: bool = True) -> str:
        """A user message whose turn prefills about ``tokens`` tokens (the template's share is
        taken off a conversation's first turn only: later turns add a smaller header)."""
        n = max(1, tokens - (self.template_tokens if first_turn else 0))
        if not self.ids:
            start = rng.randrange(len(self.text))
            chars = int(n * CHARS_PER_TOKEN)
            return _cyclic(self.text, start, chars)
        start = rng.randrange(len(self.ids))
        return await self.text_of(_cyclic(self.ids, start, n))

    async def text_of(self, ids: list[int]) -> str:
        parts = [await self._detokenize(ids[i:i + DETOKENIZE_CHUNK]) for i in range(0, len(ids), DETOKENIZE_CHUNK)]
        return "".join(parts)

    async def _detokenize(self, ids: list[int]) -> str:
        body = await self._post("/detokenize", {"model": self.model, "tokens": ids})
        text = body.get("prompt", body.get("content"))  # vLLM's name, llama.cpp's name
        if not isinstance(text, str):
            raise ValueError("/detokenize answered without text")
        return text

    async def _post(self, path: str, body: dict) -> dict:
        response = await self.http.post(path, json=body)
        response.raise_for_status()
        return response.json()


def _cyclic(seq, start: int, n: int):
    """``n`` items of ``seq`` from ``start``, wrapping around to its beginning."""
    out = seq[start:start + n]
    while len(out) < n:
        out += seq[:n - len(out)]
    return out
