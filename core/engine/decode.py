"""Decoding: the one decode loop of chat turns and plain completions, how it picks each token,
and the text stages both loops put the picked tokens through.

``decode`` samples from ``logits`` until a stop: an end token (``stop_ids``), a stop string or
anything else the caller's text pipeline reports (``stopped()``), a loop (``detector``),
``max_tokens``, the cache's ``limit`` or ``cancel``. Each sampled token goes to ``feed(token)``,
whose events are yielded; ``after_step(token, logits)`` (chat turns: the reasoning budget) may
add tokens of its own. Returns ``(finish_reason, tokens generated)``; ``"cancelled"`` when
``cancel`` was set. ``stop_reason`` says what stopped it, as vLLM's choices do.

``Sampler`` picks every token from fp32 logits: penalties, grammar mask, greedy or temperature,
top-k, min-p, top-p, seeded; and each token's logprobs when asked. The steps, in order (vLLM's):
the logprobs are read from the raw logits; the penalties change the logits (OpenAI's
``frequency_penalty`` and ``presence_penalty`` over the tokens generated so far, llama.cpp's
``repeat_penalty`` over the last ``repeat_last_n`` tokens of prompt and output: a positive logit
divided by it, a negative one multiplied), then OpenAI's ``logit_bias`` is added; the
``structured`` constraint's grammar masks the tokens it does not allow (and ``min_tokens`` the
end tokens); then greedy (``temperature == 0``) or: temperature, top-k, min-p (drop tokens less
likely than ``min_p`` times the most likely), top-p.

Sampling draws one uniform number from a seeded generator and inverts the cumulative
distribution over the candidates (exact, and much cheaper on CPU than ``torch.multinomial`` or
sorting the whole vocabulary): top-p first looks at the 256 most likely tokens and sorts the
whole vocabulary only when those do not reach ``top_p``. Every step is a few tensor operations
over the vocabulary; no Python loop runs over it.

The text stages (``IncrementalDetokenizer``, ``StopCutter``) hold back just enough text that
they never emit something they might have to take back: half a multi-byte character, half a
stop string.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator

import torch

from .types import Event, Logprobs, SamplingParams, TokenLogprob

# -- picking a token -------------------------------------------------------------------------------
_TOP_P_CANDIDATES = 256


class Sampler:
    """Picks the tokens of one generation. ``tokenizer`` names tokens in logprobs and builds a
    ``structured`` grammar; ``end_ids`` are the tokens that end the generation (a grammar
    allows them once its text is complete); ``prompt_ids`` seed ``repeat_penalty``'s window."""

    def __init__(self, params: SamplingParams, *, tokenizer=None, end_ids: Iterable[int] = (),
                 prompt_ids: Iterable[int] = ()):
        self.params = params
        self.tokenizer = tokenizer
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        self.generator: torch.Generator | None = None  # made on the logits' device at first use
        self.generated: list[int] = []
        self.counts: torch.Tensor | None = None  # how often each token was generated (made when needed)
        self.recent: deque[int] = deque(maxlen=max(0, params.repeat_last_n))
        if params.repeat_penalty != 1.0 and self.recent.maxlen:
            self.recent.extend(list(prompt_ids)[-self.recent.maxlen:])
        self.grammar = None
        if params.structured is not None:
            from .grammar import Grammar, grammar_of

            spec = grammar_of(params.structured)
            if spec is not None:
                self.grammar = Grammar(tokenizer, spec, list(end_ids))

    def __call__(self, logits: torch.Tensor) -> int:
        return self.pick(logits)[0]

    def pick(self, logits: torch.Tensor, ban: Iterable[int] = ()) -> tuple[int, TokenLogprob | None]:
        """The next token, recorded as generated, and its logprob entry (None unless asked).
        ``ban``: tokens that may not come now (the end tokens before ``min_tokens``), unless
        the grammar allows nothing else."""
        p = self.params
        ban = [t for t in ban if 0 <= t < logits.numel()]
        changed = (self._penalized(logits.float().clone()) if self._penalizes() or self.grammar or ban
                   else logits.float())
        if self.grammar is not None:
            changed = self.grammar.mask(changed)
        if ban:
            kept = changed.clone()
            changed[torch.tensor(ban, dtype=torch.long, device=changed.device)] = float("-inf")
            if not bool(torch.isfinite(changed).any()):
                changed = kept
        token = int(torch.argmax(changed)) if p.temperature <= 0 else self._sample(changed)
        entry = token_logprob(logits, token, p.logprobs, self.tokenizer) if p.logprobs is not None else None
        self.accept([token])
        return token, entry

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar allows alone from here (none without a grammar)."""
        return list(self.grammar.matcher.compute_ff_tokens()) if self.grammar is not None else []

    def accept(self, ids: Iterable[int]) -> None:
        """Record tokens as generated: what was picked, and what the engine inserts itself."""
        for t in ids:
            self.generated.append(t)
            if self.counts is not None and 0 <= t < self.counts.numel():
                self.counts[t] += 1
            self.recent.append(t)
            if self.grammar is not None:
                self.grammar.accept(t)

    def _penalizes(self) -> bool:
        p = self.params
        return bool(p.frequency_penalty or p.presence_penalty or p.logit_bias
                    or (p.repeat_penalty != 1.0 and self.recent))

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """The penalties applied to ``logits`` (a copy of the model's, changed in place)."""
        p = self.params
        if p.frequency_penalty or p.presence_penalty:
            if self.counts is None:
                self.counts = torch.zeros(logits.numel(), device=logits.device)
                ids = torch.tensor([t for t in self.generated if 0 <= t < logits.numel()], dtype=torch.long)
                self.counts.index_add_(0, ids.to(logits.device), torch.ones(len(ids), device=logits.device))
            logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0)
        if p.repeat_penalty != 1.0 and self.recent:
            ids = torch.tensor(sorted({t for t in self.recent if 0 <= t < logits.numel()}), dtype=torch.long,
                               device=logits.device)
            seen = logits[ids]
            logits[ids] = torch.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < logits.numel()], dtype=torch.long, device=logits.device)
            logits[ids] += torch.tensor([float(p.logit_bias[t]) for t in ids.tolist()], device=logits.device)
        return logits

    def _sample(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = logits / p.temperature
        index = None  # candidate ids (None: the whole vocabulary, in order)
        if p.top_k and p.top_k < logits.numel():
            logits, index = torch.topk(logits, p.top_k)  # sorted, most likely first
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs = probs * (probs >= p.min_p * probs.max())
            probs = probs / probs.sum()
        if p.top_p < 1.0:
            if index is None:
                k = min(_TOP_P_CANDIDATES, probs.numel())
                top, top_index = torch.topk(probs, k)
                if float(top.sum()) < p.top_p:
                    top, top_index = torch.sort(probs, descending=True)
                probs, index = top, top_index
            # keep the smallest set of most likely tokens that reaches top_p
            probs = probs * ((torch.cumsum(probs, 0) - probs) < p.top_p)
        if self.generator is None:
            self.generator = torch.Generator(device=logits.device)
            self.generator.manual_seed(self.seed)
        cdf = torch.cumsum(probs, 0)
        u = torch.rand(1, generator=self.generator, device=logits.device) * cdf[-1]
        j = min(int(torch.searchsorted(cdf, u)), probs.numel() - 1)
        return int(index[j]) if index is not None else j


def token_logprob(logits: torch.Tensor, token: int, top_n: int, tokenizer) -> TokenLogprob:
    """``token``'s logprob under ``logits [V]`` (their log-softmax) and the ``top_n`` most likely."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = None
    if top_n:
        values, ids = torch.topk(logprobs, min(top_n, logprobs.numel()))
        top = [(i, token_text(tokenizer, i), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return TokenLogprob(token, token_text(tokenizer, token), float(logprobs[token]), top)


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], top_n: int, tokenizer) -> list[TokenLogprob]:
    """The logprobs of ``next_ids`` under ``logits [T, V]`` (row i predicts ``next_ids[i]``)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(next_ids, device=logprobs.device)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    tops: list = [None] * len(next_ids)
    if top_n:
        values, index = torch.topk(logprobs, min(top_n, logprobs.shape[-1]), dim=-1)
        tops = [[(i, token_text(tokenizer, i), v) for i, v in zip(row_ids, row_values, strict=True)]
                for row_ids, row_values in zip(index.tolist(), values.tolist(), strict=True)]
    return [TokenLogprob(t, token_text(tokenizer, t), lp, top)
            for t, lp, top in zip(next_ids, chosen, tops, strict=True)]


def token_text(tokenizer, token: int) -> str:
    """A token's own text (a token ending inside a multi-byte character shows U+FFFD)."""
    if tokenizer is None:
        return str(token)
    return tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)


# -- the text of the picked tokens -----------------------------------------------------------------
def partial_marker_start(text: str, markers: list[str]) -> int:
    """Index where a suffix of ``text`` that could still grow into one of ``markers`` starts
    (``len(text)`` when there is none)."""
    longest = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), longest, -1):
            if text.endswith(m[:n]):
                longest = n
                break
    return len(text) - longest


def find_first(text: str, markers: list[str], start: int = 0) -> tuple[int, str | None]:
    """Earliest occurrence of any marker at or after ``start``: (index, marker) or (-1, None)."""
    best, which = -1, None
    for m in markers:
        i = text.find(m, start)
        if i != -1 and (best == -1 or i < best or (i == best and len(m) > len(which))):
            best, which = i, m
    return best, which


class IncrementalDetokenizer:
    """Token ids in, text out, never a broken UTF-8 character: tokenizers' ``DecodeStream``,
    which decodes each id against the ids before it (tokenizers' context-dependent spacing) and
    holds back a token that ends inside a multi-byte character until the character is whole.
    ``flush`` gives what is still held at the end, replacement characters included."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream

        # a transformers tokenizer wraps the Rust one (``backend_tokenizer``); a bare one is itself
        self.backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
        self.skip = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.held: list[int] = []  # ids pushed since the last text came out

    def push(self, token_id: int) -> str:
        text = self.stream.step(self.backend, token_id)
        if text is None:
            self.held.append(token_id)
            return ""
        self.held.clear()
        return text

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), replacement chars included."""
        held, self.held = self.held, []
        return self.backend.decode(held, skip_special_tokens=self.skip) if held else ""


class StopCutter:
    """Cuts the text stream before the first stop string; never emits part of one. The first
    ``unarmed`` pushes (one per token: ``min_tokens``) pass through uncut; ``matched`` is the
    stop string that cut it."""

    def __init__(self, stops: list[str], unarmed: int = 0):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False
        self.matched: str | None = None
        self.unarmed = unarmed

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf += text
        if not self.stops or self.unarmed > 0:
            self.unarmed -= 1
            out, self.buf = self.buf, ""
            return out
        i, stop = find_first(self.buf, self.stops)
        if i != -1:
            out, self.buf, self.stopped, self.matched = self.buf[:i], "", True, stop
            return out
        k = partial_marker_start(self.buf, self.stops)
        out, self.buf = self.buf[:k], self.buf[k:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


# -- the loop --------------------------------------------------------------------------------------
# after_step(token, logits) -> (logits, tokens it added, finish reason or None)
AfterStep = Callable[[int, object], Generator[Event, None, tuple[object, int, str | None]]]


def decode(conv, logits, sampler: Sampler, *, stop_ids: set[int], max_tokens: int, limit: int,
           cancel: threading.Event, feed: Callable[[int], Iterator[Event]], stopped: Callable[[], bool],
           detector=None, length_reason: str = "length", completion: int = 0,
           after_step: AfterStep | None = None, stop_token_logprobs: bool = False
           ) -> Generator[Event, None, tuple[str, int]]:
    """``limit``: the cache position generation must stay below (the caller keeps room there for
    what follows, e.g. the end-of-turn tokens); reaching it finishes with ``length_reason``. With
    ``sampling.logprobs`` each picked token's ``Logprobs`` comes before its text;
    ``stop_token_logprobs``: the end token that stops the generation gets one too (as vLLM
    reports a completion's)."""

    def length() -> str:
        return "length" if completion >= max_tokens else length_reason

    while True:
        if cancel.is_set():
            return "cancelled", completion
        if completion >= max_tokens or conv.position >= limit:
            return length(), completion
        # before min_tokens no end token may come (vLLM's min_tokens)
        token, entry = sampler.pick(logits, stop_ids if completion < sampler.params.min_tokens else ())
        if entry is not None and (stop_token_logprobs or token not in stop_ids):
            yield Logprobs([entry])
        if token in stop_ids:
            return "stop", completion
        completion += 1
        yield from feed(token)
        if stopped():
            return "stop", completion
        if detector is not None and detector.push(token):
            return "repetition", completion
        if completion >= max_tokens or conv.position + 1 >= limit:
            return length(), completion
        logits = conv.step(token)
        if after_step is not None:
            logits, added, finish = yield from after_step(token, logits)
            completion += added
            if finish is not None:
                return finish, completion


def stop_reason(finish: str, sampler: Sampler, matched: str | None) -> str | int | None:
    """vLLM's ``stop_reason``: the stop string that matched (``matched``), or the token of
    ``stop_token_ids`` that ended the generation; None for an end-of-text token or a length."""
    if finish != "stop":
        return None
    if matched is not None:
        return matched
    last = sampler.generated[-1] if sampler.generated else None
    return last if last in sampler.params.stop_token_ids else None


def turn_usage(prompt_tokens: int, completion: int, stats, prefill_s: float, decode_s: float) -> tuple[dict, dict]:
    """``(usage, timings)`` of a finished turn or completion (``Done``'s), from the prompt's
    ``SyncStats`` and the measured prefill and decode seconds."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
             "total_tokens": prompt_tokens + completion, "cached_tokens": stats.cached_tokens,
             "prefill_tokens": stats.prefill_tokens}
    timings = {"prefill_s": round(prefill_s, 4),
               "prefill_tokens_per_s": round(stats.prefill_tokens / prefill_s, 1) if prefill_s > 0 else None,
               "decode_s": round(decode_s, 4),
               "decode_tokens_per_s": round(completion / decode_s, 1) if decode_s > 0 else None}
    return usage, timings
