"""Sizes for the session memory budget: what a session holds, what an operation will add, and
the longest ``max_seq_len`` the budget can ever hold.

The budget is enforced on what sessions hold *now* (``Conversation.nbytes``: the cache as
allocated, recurrent checkpoints, logits) plus what an operation is about to need, checked
before it allocates: a new session (a fresh cache), a prefill or a decode (``kv_bytes_per_token``
for every token it adds to the cache), a resize, a fork, a snapshot load. This works for a cache
allocated up front (a fresh one already holds ``max_seq_len`` tokens, so a prefill adds nothing)
and for one that grows on demand (a fresh one holds almost nothing, every token adds its KV).

Which of the two a model's cache is, is measured, not assumed: two tiny caches are allocated once
and their sizes compared.
"""

from __future__ import annotations

from superlinear.engine.limits import MAX_TOKENS
from superlinear.errors import OverBudget, TooLarge
from superlinear.model.cache import capacity_to_hold

# Python objects of a resident session besides its tensors (conversation, cache bookkeeping,
# token id list, template): counted so that many empty sessions still add up. Each session also
# keeps its next-token logits (vocabulary x 4 bytes), counted from the start.
SESSION_OVERHEAD_BYTES = 64 << 10


def model_max_seq_len(model) -> int | None:
    """A hard limit on the cache length, if the model declares one (``max_seq_len``)."""
    value = getattr(model, "max_seq_len", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class CacheSizes:
    """Byte sizes of one model's session caches."""

    def __init__(self, model):
        self.model = model
        self._probe: tuple[int, int] | None = None  # (fixed bytes, bytes allocated per max_seq_len token)
        self.overhead = SESSION_OVERHEAD_BYTES + 4 * model.vocab_size  # the logits a session keeps

    def _measure(self) -> tuple[int, int]:
        if self._probe is None:
            a = self.model.new_cache(16).nbytes()
            b = self.model.new_cache(32).nbytes()
            per_token = max(0, (b - a) // 16)
            self._probe = (max(0, a - 16 * per_token), per_token)
        return self._probe

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one cached token holds (the model says)."""
        return self.model.kv_bytes_per_token()

    @property
    def fixed_bytes(self) -> int:
        """What every cache holds whatever its length (recurrent state of a hybrid)."""
        return self._measure()[0]

    def fresh(self, max_seq_len: int) -> int:
        """Bytes a new, empty session of ``max_seq_len`` holds."""
        fixed, per_token = self._measure()
        return fixed + per_token * int(max_seq_len) + self.overhead

    def holding(self, max_seq_len: int, position: int) -> int:
        """Bytes a session of ``max_seq_len`` holding ``position`` tokens needs (load, fork)."""
        fixed, per_token = self._measure()
        # a cache that grows on demand allocates a step beyond ``position`` (model/cache.py)
        grown = capacity_to_hold(position, max_seq_len) if position > 0 else 0
        return (fixed + max(per_token * int(max_seq_len), self.kv_bytes_per_token * grown)
                + self.overhead)

    def full(self, max_seq_len: int) -> int:
        """Bytes a session of ``max_seq_len`` holds once its cache is full."""
        return self.fixed_bytes + self.kv_bytes_per_token * int(max_seq_len) + self.overhead

    def growth(self, conv, position: int) -> int:
        """Bytes ``conv``'s cache must add to hold ``position`` tokens (0 when allocated already)."""
        return int(conv.cache.growth_bytes(position))

    def spare_tokens(self, conv) -> int:
        """Tokens ``conv``'s cache can take without allocating (preallocated, unused rows)."""
        have = conv.cache.nbytes() - self.fixed_bytes
        return max(0, have // self.kv_bytes_per_token - conv.position)

    def max_seq_len_for(self, budget: int | None) -> int:
        """The longest ``max_seq_len`` a session can have: what the model supports, what a full
        cache of it fits in ``budget``, and the engine's bound."""
        limits = [MAX_TOKENS]
        model_limit = model_max_seq_len(self.model)
        if model_limit:
            limits.append(model_limit)
        if budget is not None:
            limits.append(max(0, (budget - self.fixed_bytes - self.overhead) // self.kv_bytes_per_token))
        return min(limits)

    def check_len(self, max_seq_len, budget: int | None) -> None:
        """``TooLarge`` (413) for a ``max_seq_len`` the model or the memory budget can never hold."""
        from superlinear.errors import InvalidRequest

        if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
            raise InvalidRequest(f"max_seq_len must be a positive integer, got {max_seq_len!r}",
                                 param="max_seq_len")
        limit = self.max_seq_len_for(budget)
        if max_seq_len <= limit:
            return
        model_limit = model_max_seq_len(self.model)
        if model_limit and max_seq_len > model_limit:
            raise TooLarge(f"max_seq_len {max_seq_len} is more than the model supports ({model_limit})",
                           param="max_seq_len")
        if budget is not None and self.full(max_seq_len) > budget:
            raise TooLarge(
                f"max_seq_len {max_seq_len} needs {fmt_bytes(self.full(max_seq_len))} once full, more than the "
                f"whole session memory budget ({fmt_bytes(budget)}): at most {limit} tokens per session; ask "
                "for a smaller max_seq_len or raise the memory budget",
                param="max_seq_len")
        raise TooLarge(f"max_seq_len {max_seq_len} is more than spl supports ({limit})", param="max_seq_len")


class SessionMemory:
    """The memory guard a session's ``Conversation`` calls (``Conversation.memory``): before its
    cache grows, and for how far a generation may go."""

    def __init__(self, manager, session):
        self.manager = manager
        self.session = session

    def reserve(self, conv, position: int) -> None:
        """Before the cache grows to ``position`` tokens: make room (evicting idle sessions if
        the manager may) or raise ``OverBudget`` (429) / ``TooLarge`` (413)."""
        need = self.manager.sizes.growth(conv, position)
        if need <= 0:
            return
        what = f"session {self.session.id!r} growing to {position} tokens"
        try:
            self.manager.reserve(need, exclude=self.session, what=what)
        except (OverBudget, TooLarge):
            # A cache growing in 1.5x steps may still fit taking less: as much of the step as the
            # budget has room for (not one token at a time, which would copy the cache per token).
            cache = conv.cache
            if cache.growth_bytes(position, exact=True) >= need:
                raise
            free = max(0, (self.manager.free_bytes() or 0) - cache.transient_bytes())
            room = cache.capacity + free // self.manager.sizes.kv_bytes_per_token
            target = max(position, min(cache.capacity_for(position), room))
            self.manager.reserve(cache.growth_bytes(target, exact=True), exclude=self.session, what=what)
            cache.reserve(target, exact=True)

    def room(self, conv) -> int | None:
        """Tokens this conversation may still add within the budget (None: no budget)."""
        free = self.manager.free_bytes()
        if free is None:
            return None
        sizes = self.manager.sizes
        # past the spare rows the cache grows, which briefly needs one of its tensors twice
        return sizes.spare_tokens(conv) + max(0, free - conv.cache.transient_bytes()) // sizes.kv_bytes_per_token
