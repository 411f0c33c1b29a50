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

import logging
import threading

from superlinear.engine.limits import MAX_TOKENS
from superlinear.errors import OverBudget, TooLarge, UserError
from superlinear.model.cache import capacity_to_hold
from superlinear.sessions.memory import allocate, default_budget

log = logging.getLogger(__name__)

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


class MemoryBudget:
    """The bytes all resident sessions (``sessions``, the registry) may hold together: ``limit``
    (``"auto"``: a fraction of the device's free memory measured now, ``memory.default_budget``;
    None: no limit). An operation that needs more makes room by evicting idle sessions to disk
    when it may (``evict``: session -> whether it went; None: never), else it is refused."""

    def __init__(self, model, sessions, limit: int | str | None = "auto", *, evict=None):
        if limit == "auto":
            limit = default_budget(model.device)
        self.limit = int(limit) if limit else None
        self.sizes = CacheSizes(model)
        self.sessions = sessions
        self.evict = evict
        # Held from the budget check to the end of the allocation, so two threads cannot both
        # pass the check and together overshoot the budget. Never waits for a session lock.
        self._alloc_lock = threading.RLock()

    def max_seq_len_limit(self) -> int:
        """The longest max_seq_len a session may have (the model's limit, a full cache within the budget)."""
        return self.sizes.max_seq_len_for(self.limit)

    def check_len(self, max_seq_len) -> None:
        """A max_seq_len the model supports and the budget can hold once full (else 400 / 413)."""
        self.sizes.check_len(max_seq_len, self.limit)

    def free_bytes(self) -> int | None:
        """Budget not held by any session (None: no budget)."""
        if self.limit is None:
            return None
        return self.limit - self.sessions.bytes_in_use()

    def reserve(self, need: int, *, exclude=None, what: str) -> None:
        """Make room for ``need`` more bytes under the budget: evict idle sessions to disk (if
        allowed) or raise ``OverBudget`` (429); ``TooLarge`` (413) if the budget could never
        hold it. ``exclude`` is never evicted (the session being worked on)."""
        if self.limit is None or need <= 0:
            return
        held = exclude.nbytes() if exclude is not None else 0
        if need + held > self.limit:
            raise TooLarge(
                f"{what} needs {fmt_bytes(need)}, more than the whole session memory budget "
                f"({fmt_bytes(self.limit)}) allows{' next to what it holds' if held else ''}; "
                "ask for a smaller max_seq_len or raise the memory budget",
                param="max_seq_len")
        failed: set[str] = set()
        while True:
            used = self.sessions.bytes_in_use()
            if used + need <= self.limit:
                return
            victims = sorted((s for s in self.sessions.all()
                              if s.resident and not s.ephemeral and s is not exclude and not s.lock.locked()
                              and s.id not in failed), key=lambda s: s.last_used)
            hint = ("every other session is busy; try again shortly" if self.evict else
                    "close or save idle sessions, or ask for a smaller max_seq_len")
            if self.evict is None or not victims:
                raise OverBudget(
                    f"{what} needs {fmt_bytes(need)} but sessions already hold {fmt_bytes(used)} of the "
                    f"{fmt_bytes(self.limit)} session memory budget; {hint}", param="max_seq_len")
            victim = victims[0]
            try:
                if not self.evict(victim):
                    failed.add(victim.id)
            except (UserError, OSError) as exc:  # cannot write it out (disk full): keep it, try another
                log.warning("could not evict session %s: %s", victim.id, exc)
                failed.add(victim.id)

    def allocate(self, need: int, build, *, max_seq_len: int, exclude=None, what: str):
        """``build()`` (which allocates a cache of ``max_seq_len``) once ``need`` bytes are
        reserved; an out-of-memory becomes ``TooLarge``."""
        with self._alloc_lock:
            self.reserve(need, exclude=exclude, what=what)
            return allocate(build, max_seq_len)


class SessionMemory:
    """The memory guard a session's ``Conversation`` calls (``Conversation.memory``): before its
    cache grows, and for how far a generation may go."""

    def __init__(self, budget: MemoryBudget, session):
        self.budget = budget
        self.session = session

    def reserve(self, conv, position: int) -> None:
        """Before the cache grows to ``position`` tokens: make room (evicting idle sessions if
        the budget may) or raise ``OverBudget`` (429) / ``TooLarge`` (413)."""
        need = self.budget.sizes.growth(conv, position)
        if need <= 0:
            return
        what = f"session {self.session.id!r} growing to {position} tokens"
        try:
            self.budget.reserve(need, exclude=self.session, what=what)
        except (OverBudget, TooLarge):
            # A cache growing in 1.5x steps may still fit taking less: as much of the step as the
            # budget has room for (not one token at a time, which would copy the cache per token).
            cache = conv.cache
            if cache.growth_bytes(position, exact=True) >= need:
                raise
            free = max(0, (self.budget.free_bytes() or 0) - cache.transient_bytes())
            room = cache.capacity + free // self.budget.sizes.kv_bytes_per_token
            target = max(position, min(cache.capacity_for(position), room))
            self.budget.reserve(cache.growth_bytes(target, exact=True), exclude=self.session, what=what)
            cache.reserve(target, exact=True)

    def room(self, conv) -> int | None:
        """Tokens this conversation may still add within the budget (None: no budget)."""
        free = self.budget.free_bytes()
        if free is None:
            return None
        sizes = self.budget.sizes
        # past the spare rows the cache grows, which briefly needs one of its tensors twice
        return sizes.spare_tokens(conv) + max(0, free - conv.cache.transient_bytes()) // sizes.kv_bytes_per_token
