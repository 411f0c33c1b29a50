"""Text <-> token ids with the model's tokenizer and chat template (``/tokenize``, ``/detokenize``,
and token counts for clients that budget a context, such as ``spl rag``)."""

from __future__ import annotations

from superlinear.errors import InvalidRequest

from .decode import IncrementalDetokenizer
from .template import ChatTemplate


def tokenize_text(tokenizer, text: str, add_special: bool = True) -> list[int]:
    """The ids of ``text``; ``add_special`` adds what the tokenizer adds to a plain text (e.g. a
    BOS), as a ``/v1/completions`` prompt gets."""
    return list(tokenizer.encode(text, add_special_tokens=add_special))


def tokenize_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                      template_kwargs: dict | None = None) -> list[int]:
    """The ids of ``messages`` rendered with the chat template, as a chat turn prefills them."""
    text = ChatTemplate(tokenizer).render(messages, None, add_generation_prompt, template_kwargs)
    return list(tokenizer.encode(text, add_special_tokens=False))


def check_ids(tokenizer, ids: list, param: str = "tokens") -> list[int]:
    """``ids`` if every one is a token id of this tokenizer, else ``InvalidRequest``."""
    vocab = len(tokenizer)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise InvalidRequest(f"{t!r} is not a token id of this model (0..{vocab - 1})", param=param)
    return list(ids)


def pieces(tokenizer, ids: list[int]) -> list[dict]:
    """``[{"id", "piece"}]``: the text each token adds, so that the pieces join to the decoded
    text. A token ending inside a multi-byte character has an empty piece; the next one carries
    the whole character."""
    detok = IncrementalDetokenizer(tokenizer)
    out = [{"id": t, "piece": detok.push(t)} for t in ids]
    if out:
        out[-1]["piece"] += detok.flush()
    return out


def detokenize(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


_MAX_TOKEN_BYTES: dict[int, int] = {}


def max_token_bytes(tokenizer) -> int:
    """The most bytes of text one token of ``tokenizer`` stands for (+ a margin for tokenizers
    that strip a piece's leading space): a text of n characters is at least n / this many
    tokens, known before tokenizing it. Computed once per tokenizer (~0.3 s for 49K tokens)."""
    key = id(tokenizer)
    if key not in _MAX_TOKEN_BYTES:
        pieces_ = (tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab())
        _MAX_TOKEN_BYTES[key] = max((len(p.encode()) for p in pieces_), default=1) + 4
    return _MAX_TOKEN_BYTES[key]
