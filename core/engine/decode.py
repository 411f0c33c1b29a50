"""The one decode loop of chat turns and plain completions: sample, stop, step.

``decode`` samples from ``logits`` until a stop: an end token (``stop_ids``), a stop string or
anything else the caller's text pipeline reports (``stopped()``), a loop (``detector``),
``max_tokens``, the cache's ``limit`` or ``cancel``. Each sampled token goes to ``feed(token)``,
whose events are yielded; ``after_step(token, logits)`` (chat turns: the reasoning budget) may
add tokens of its own. Returns ``(finish_reason, tokens generated)``; ``"cancelled"`` when
``cancel`` was set. ``stop_reason`` says what stopped it, as vLLM's choices do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator

from .sampling import Sampler
from .types import Event, Logprobs

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
