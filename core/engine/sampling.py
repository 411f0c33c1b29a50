"""Next-token choice from fp32 logits: greedy, temperature, top-k, top-p, seeded.

Sampling draws one uniform number from a seeded generator and inverts the cumulative
distribution over the candidates (exact, and much cheaper on CPU than ``torch.multinomial`` or
sorting the whole vocabulary): top-p first looks at the 256 most likely tokens and sorts the
whole vocabulary only when those do not reach ``top_p``.
"""

from __future__ import annotations

import os

import torch

from .types import SamplingParams

_TOP_P_CANDIDATES = 256


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        self.generator: torch.Generator | None = None  # made on the logits' device at first use

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits.float() / p.temperature
        index = None  # candidate ids (None: the whole vocabulary, in order)
        if p.top_k and p.top_k < logits.numel():
            logits, index = torch.topk(logits, p.top_k)  # sorted, most likely first
        probs = torch.softmax(logits, dim=-1)
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
