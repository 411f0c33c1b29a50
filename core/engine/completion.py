"""A plain text completion (``/v1/completions``): the prompt as given, no chat template.

The prompt's tokens go through the same cache sync as a chat turn (a prompt that extends the
previous one reuses its prefix), then tokens are sampled until a stop string, the end-of-text
token, ``max_tokens`` or the cache's end. Events are the chat turn's: ``TextDelta`` and ``Done``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from superlinear.errors import InvalidRequest, TooLarge

from .conversation import Conversation
from .decode import (
    IncrementalDetokenizer,
    Sampler,
    StopCutter,
    decode,
    prompt_logprobs,
    stop_reason,
    token_text,
    turn_usage,
)
from .limits import check_sampling
from .repetition import RepetitionDetector
from .tokens import check_ids, tokenize_text
from .types import Done, Event, Logprobs, RepetitionConfig, SamplingParams, TextDelta, TokenLogprob

# The OpenAI API's default for /v1/completions.
DEFAULT_MAX_TOKENS = 16


def prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of a completion prompt: a string (special tokens added as the tokenizer does
    for a plain text, e.g. a BOS) or the ids themselves."""
    ids = tokenize_text(tokenizer, prompt) if isinstance(prompt, str) else check_ids(tokenizer, prompt, "prompt")
    if not ids:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    return ids


def run_completion(conv: Conversation, ids: list[int], sampling: SamplingParams, *,
                   repetition: RepetitionConfig | None = None, echo: bool = False,
                   cancel: threading.Event | None = None) -> Iterator[Event]:
    """Complete the token ids ``ids`` on ``conv`` (blocking). The conversation then holds the
    prompt and the generated tokens, with an empty transcript (it is no chat).

    With ``sampling.logprobs`` every picked token's ``Logprobs`` comes before its text, the token
    that stopped the generation included (as vLLM reports it); with ``echo`` too, the prompt's
    come first (``Logprobs(prompt=True)``, the first token's logprob None): the whole prompt is
    prefilled again for them."""
    from superlinear.model.model import Cancelled

    check_sampling(sampling, len(conv.model.tokenizer))
    cancel = cancel or threading.Event()
    t_start = time.perf_counter()
    if len(ids) >= conv.max_seq_len:
        raise TooLarge(f"the prompt has {len(ids)} tokens but the context holds at most "
                       f"{conv.max_seq_len} (it needs room for one generated token)", param="prompt")
    tok = conv.model.tokenizer
    scorer = _PromptScorer(ids, sampling.logprobs, tok) if echo and sampling.logprobs is not None else None
    try:
        stats = conv.sync_tokens(ids, should_cancel=cancel.is_set, on_logits=scorer)
    except Cancelled:
        return
    finally:
        conv.set_transcript([], [])
    prefill_s = time.perf_counter() - t_start
    if scorer is not None:
        yield Logprobs(scorer.entries, prompt=True)
    max_tokens = sampling.max_tokens if sampling.max_tokens is not None else DEFAULT_MAX_TOKENS
    stop_ids = set(sampling.stop_token_ids)
    if tok.eos_token_id is not None and not sampling.ignore_eos:
        stop_ids.add(int(tok.eos_token_id))
    sampler = Sampler(sampling, tokenizer=tok, end_ids=sorted(stop_ids), prompt_ids=ids)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=sampling.skip_special_tokens)
    cutter = StopCutter(sampling.stop, unarmed=sampling.min_tokens)

    def feed(token: int) -> Iterator[Event]:
        text = cutter.push(detok.push(token))
        if text:
            yield TextDelta(text)

    t_decode = time.perf_counter()
    finish, completion = yield from decode(
        conv, conv.logits, sampler, stop_ids=stop_ids, max_tokens=max_tokens, limit=conv.max_seq_len,
        cancel=cancel, feed=feed, stopped=lambda: cutter.stopped,
        detector=RepetitionDetector(repetition) if repetition else None, stop_token_logprobs=True)
    if not cutter.stopped:  # what the detokenizer and the stop cutter still hold
        tail = cutter.push(detok.flush()) + cutter.flush()
        if tail:
            yield TextDelta(tail)
    decode_s = time.perf_counter() - t_decode
    usage, timings = turn_usage(len(ids), completion, stats, prefill_s, decode_s)
    yield Done(finish, {"role": "assistant", "content": None}, usage, timings,
               stop_reason=stop_reason(finish, sampler, cutter.matched))


class _PromptScorer:
    """Collects the prompt's logprobs from the prefill's logits, chunk by chunk: row ``i``
    predicts token ``i + 1``; the first token has nothing before it (logprob None)."""

    def __init__(self, ids: list[int], top_n: int, tokenizer):
        self.ids, self.top_n, self.tokenizer = ids, top_n, tokenizer
        self.entries = [TokenLogprob(ids[0], token_text(tokenizer, ids[0]), None, None)]

    def __call__(self, logits) -> None:
        done = len(self.entries)
        following = self.ids[done:done + logits.shape[0]]  # the last row predicts the first generated token
        if following:
            self.entries.extend(prompt_logprobs(logits[:len(following)], following, self.top_n, self.tokenizer))
