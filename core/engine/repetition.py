"""Loop detection on generated token ids, O(max_period) per token."""

from __future__ import annotations

from .types import RepetitionConfig


class RepetitionDetector:
    """``push(token) -> True`` once the tokens end in a loop (see ``RepetitionConfig``).

    For every period p it keeps the length of the current run of positions i with
    ``tok[i] == tok[i - p]``; a run of r such positions means the last ``r + p`` tokens are
    p-periodic.
    """

    def __init__(self, config: RepetitionConfig):
        self.config = config
        self.max_period = max(1, config.max_period)
        self.history: list[int] = []
        self.runs = [0] * (self.max_period + 1)
        self.period: int | None = None  # the period found

    def push(self, token: int) -> bool:
        h = self.history
        h.append(token)
        n = len(h)
        cfg = self.config
        for p in range(1, min(self.max_period, n - 1) + 1):
            if h[-1] == h[-1 - p]:
                self.runs[p] += 1
                span = self.runs[p] + p
                if span >= max(cfg.tail_len, cfg.min_repeats * p):
                    self.period = p
                    return True
            else:
                self.runs[p] = 0
        return False
