"""Token logprobs (the engine's ``TokenLogprob``) in OpenAI's two shapes: the chat completion's
``logprobs.content`` list and the legacy completion's parallel lists (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``), which evaluation harnesses read."""

from __future__ import annotations

from superlinear.engine.types import TokenLogprob


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``."""
    return {"content": [{**_chat_item(e.text, e.logprob),
                         "top_logprobs": [_chat_item(text, lp) for _, text, lp in e.top or ()]}
                        for e in entries],
            "refusal": None}


def _chat_item(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict:
    """The legacy ``logprobs`` object; ``text_offset`` counts characters from ``offset`` (where
    the first entry's text starts in the choice's text). A position without alternatives (the
    first prompt token) has ``top_logprobs`` None, as vLLM and OpenAI answer."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {text: lp for _, text, lp in e.top} for e in entries],
            "text_offset": offsets}
