"""Token logprobs (the engine's ``TokenLogprob``) in OpenAI's two shapes: the chat completion's
``logprobs.content`` list and the legacy completion's parallel lists (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``), which evaluation harnesses read."""

from __future__ import annotations

from superlinear.engine.types import TokenLogprob


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``, each item with
    its token ``id`` too (spl's: the remote API reads the engine's ``TokenLogprob`` back)."""
    return {"content": [{**_chat_item(e.id, e.text, e.logprob),
                         "top_logprobs": [_chat_item(i, text, lp) for i, text, lp in e.top or ()]}
                        for e in entries],
            "refusal": None}


def _chat_item(token_id: int, text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")), "id": token_id}


def read_chat_logprobs(logprobs: dict) -> list[TokenLogprob]:
    """The ``TokenLogprob`` s of a chat chunk's ``logprobs`` (the inverse of ``chat_logprobs``)."""
    return [TokenLogprob(item["id"], item["token"], item["logprob"],
                         [(top["id"], top["token"], top["logprob"]) for top in item.get("top_logprobs") or []])
            for item in logprobs.get("content") or []]


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0, prompt: list[TokenLogprob] = ()) -> dict:
    """The legacy ``logprobs`` object of the generated ``entries``, after the echoed ``prompt``'s.
    ``text_offset`` counts characters of the choice's text: the prompt's from 0 (the echo is the
    prompt as sent), the generated tokens' from ``offset`` (where their text starts). A position
    without alternatives (the first prompt token) has ``top_logprobs`` None, as vLLM answers.
    spl adds ``token_ids`` (each token's id) and ``top_tokens`` (each position's alternatives as
    ``[id, text, logprob]``): ``top_logprobs`` is keyed by text, so it has no ids and keeps one of
    two tokens of the same text. The remote API reads the engine's ``TokenLogprob`` back from them."""
    everything = [*prompt, *entries]
    return {"tokens": [e.text for e in everything],
            "token_logprobs": [e.logprob for e in everything],
            "top_logprobs": [None if e.top is None else {text: lp for _, text, lp in e.top} for e in everything],
            "text_offset": _offsets(prompt, 0) + _offsets(entries, offset),
            "token_ids": [e.id for e in everything],
            "top_tokens": [None if e.top is None else [list(t) for t in e.top] for e in everything]}


def read_completion_logprobs(logprobs: dict) -> list[TokenLogprob]:
    """The ``TokenLogprob`` s of a completion's ``logprobs`` (the inverse of ``completion_logprobs``)."""
    return [TokenLogprob(token_id, text, logprob, None if top is None else [tuple(t) for t in top])
            for token_id, text, logprob, top in zip(logprobs["token_ids"], logprobs["tokens"],
                                                    logprobs["token_logprobs"], logprobs["top_tokens"], strict=True)]


def _offsets(entries: list[TokenLogprob], start: int) -> list[int]:
    offsets = []
    for e in entries:
        offsets.append(start)
        start += len(e.text)
    return offsets
