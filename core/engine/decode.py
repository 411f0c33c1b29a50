"""The one decode loop of chat turns and plain completions: sample, stop, step.

``decode`` samples from ``logits`` until a stop: an end token (``stop_ids``), a stop string or
anything else the caller's text pipeline reports (``stopped()``), a loop (``detector``),
``max_tokens``, the cache's ``limit`` or ``cancel``. Each sampled token goes to ``feed(token)``,
whose events are yielded; ``after_step(token, logits)`` (chat turns: the reasoning budget) may
add tokens of its own. Returns ``(finish_reason, tokens generated)``; ``"cancelled"`` when
``cancel`` was set.
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
        token, entry = sampler.pick(logits)
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
