"""A fake model for engine tests: real tokenizer, deterministic "forward", checked cache edits.

Its logits depend on every token in the cache (through a rolling hash), and its "recurrent
state" is that hash, so a hybrid whose state was not restored correctly gives other logits and
the cache's own checks fail loudly.
"""

from __future__ import annotations

import torch

from superlinear.errors import InvalidRequest, TooLarge

_P = 1_000_003


def _roll(h: int, t: int) -> int:
    return (h * 31 + t + 1) % _P



class FakeCache:
    def __init__(self, max_seq_len: int, hybrid: bool):
        self.max_seq_len = max_seq_len
        self.hybrid = hybrid
        self.tokens: list[int] = []
        self.hashes = [0]  # hash after each prefix (attention-only: "the KV")
        self.state = 0  # recurrent state: hash of everything seen

    @property
    def position(self) -> int:
        return len(self.tokens)

    def append(self, t: int) -> None:
        if self.position >= self.max_seq_len:
            raise TooLarge("fake cache full")
        self.tokens.append(t)
        self.state = _roll(self.state, t)
        self.hashes.append(self.state)

    def nbytes(self) -> int:
        return 8 * self.max_seq_len

    # The Cache API's allocation side (superlinear.model.cache): this cache is preallocated.
    @property
    def capacity(self) -> int:
        return self.max_seq_len

    def capacity_for(self, tokens: int, exact: bool = False) -> int:
        return self.capacity

    def growth_bytes(self, tokens: int, exact: bool = False) -> int:
        return 0

    def transient_bytes(self) -> int:
        return 0

    def reserve(self, tokens: int, exact: bool = False) -> None:
        if tokens > self.max_seq_len:
            raise TooLarge("fake cache full")

    def truncate(self, position: int, recurrent_state=None) -> None:
        if position > self.position:
            raise InvalidRequest("beyond position")
        if self.hybrid and position != self.position:
            if recurrent_state is None:
                raise InvalidRequest("hybrid needs the state")
            self.load_recurrent_state(recurrent_state)
            assert self.state == self.hashes[position], "restored state does not match the position"
        del self.tokens[position:]
        del self.hashes[position + 1:]
        if not self.hybrid:
            self.state = self.hashes[-1]

    def recurrent_state(self) -> dict:
        return {"h": torch.tensor([self.state])} if self.hybrid else {}

    def load_recurrent_state(self, state: dict) -> None:
        self.state = int(state["h"][0])

    def clone(self) -> FakeCache:
        c = FakeCache(self.max_seq_len, self.hybrid)
        c.tokens, c.hashes, c.state = list(self.tokens), list(self.hashes), self.state
        return c

    def resize(self, n: int) -> None:
        self.max_seq_len = n


class FakeModel:
    """``vocab_ids``: the tokens the fake may produce (ordinary text tokens of the tokenizer)."""

    def __init__(self, tokenizer, hybrid: bool = False, script: list[int] | None = None):
        self.tokenizer = tokenizer
        self.has_recurrent_state = hybrid
        self.device = torch.device("cpu")
        self.vocab = len(tokenizer)
        self.prefilled = 0  # tokens run through prefill, all calls
        self.decoded = 0
        self.cancel_checks = 0
        words = tokenizer.encode(" the quick brown fox jumps over a lazy dog and then", add_special_tokens=False)
        self.words = words
        # A script: the n-th decode step's logits favour script[n] (then end of turn).
        self.script = script

    def new_cache(self, max_seq_len: int) -> FakeCache:
        return FakeCache(max_seq_len, self.has_recurrent_state)

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def kv_bytes_per_token(self) -> int:
        return 8  # FakeCache.nbytes() per max_seq_len token

    def _logits(self, cache: FakeCache) -> torch.Tensor:
        # Consistent with the whole content: the hash the cache would have from its tokens.
        h = 0
        for t in cache.tokens:
            h = _roll(h, t)
        assert h == cache.state, "cache state diverged from its tokens"
        logits = torch.full((self.vocab,), -10.0)
        g = torch.Generator().manual_seed(h)
        w = torch.randn(len(self.words), generator=g)
        logits[torch.tensor(self.words)] = w
        if self.script is not None:
            n = self.decoded
            logits[self.script[n] if n < len(self.script) else self.tokenizer.eos_token_id] = 100.0
        return logits

    def prefill(self, cache, token_ids, chunk_size=None, should_cancel=None, on_logits=None):
        from superlinear.model import Cancelled

        ids = list(token_ids)
        chunk_size = chunk_size or 8192
        for i in range(0, len(ids), chunk_size):
            self.cancel_checks += 1
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled")
            rows = []
            for t in ids[i:i + chunk_size]:
                cache.append(int(t))
                if on_logits is not None:
                    rows.append(self._logits(cache))
            if on_logits is not None:
                on_logits(torch.stack(rows))
            self.prefilled += len(ids[i:i + chunk_size])
        return self._logits(cache)

    def decode_step(self, cache, token_id):
        cache.append(int(token_id))
        self.decoded += 1
        return self._logits(cache)
