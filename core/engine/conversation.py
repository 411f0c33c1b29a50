"""A conversation held in a model cache: token ids, transcript, message boundaries.

The cache always holds a token prefix of some rendering of the transcript. ``sync(messages)``
renders the messages with the chat template, keeps the longest common token prefix of what the
cache holds and prefills only the rest, so a chat whose history is unchanged prefills just the
new message. Models with recurrent (Mamba) state cannot rewind, so a hybrid also keeps copies of
its recurrent state at message boundaries and rewinds to the last of them at or before the
common prefix, then prefills forward from there.
"""

from __future__ import annotations

import bisect
import copy
import time
from array import array
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from operator import attrgetter

import torch

from superlinear.errors import InvalidRequest, TooLarge

from . import scheduler
from .template import ChatTemplate
from .types import PrefillProgress

# Texts at least this long remember their tokenization for the next render (prefix reuse).
_MEMO_MIN_CHARS = 4096

# Recurrent-state copies kept per conversation (besides position 0); the oldest go first. A copy
# is the whole Mamba state (tens of MB for a 9B hybrid), and rollbacks rarely go further back
# than a few turns; an older target is reached from an older copy (or 0) by prefilling forward.
MAX_RECURRENT_CHECKPOINTS = 8
# Prefill chunk when every token's logits are kept: 512 x a 49K vocabulary is 100 MB of fp32.
EVERY_LOGITS_CHUNK = 512


@dataclass
class Rendered:
    text: str
    ids: list[int]
    boundaries: list[int | None]  # token position after each message (None: not on a token edge)


@dataclass
class SyncStats:
    cached_tokens: int = 0  # kept from what the cache held
    prefill_tokens: int = 0  # run through the model
    prefill_s: float = 0.0


@dataclass
class Checkpoint:
    position: int
    ids: list[int]
    transcript: list[dict]
    boundaries: list[int | None]
    tools: list[dict] | None
    template_kwargs: dict | None
    edit_seq: int  # len(Conversation._edits) when taken
    recurrent: dict | None
    logits: torch.Tensor | None
    states: dict = field(default_factory=dict)


def _model_chunk(model) -> int:
    """The model's prefill chunk (a model without the method prefills any length at once)."""
    chunk_size = getattr(model, "prefill_chunk_size", None)
    return chunk_size() if chunk_size is not None else 1 << 30


def _common_str_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def common_token_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    # Compare in blocks first: long conversations share long prefixes.
    i, step = 0, 4096
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Conversation:
    def __init__(self, model, max_seq_len: int, *, chunk_size: int | None = None, cache=None):
        self.model = model
        self.template = ChatTemplate(model.tokenizer)
        self.chunk_size = chunk_size
        self.cache = cache if cache is not None else model.new_cache(max_seq_len)
        self.hybrid = bool(model.has_recurrent_state)
        self._ids: list[int] = []
        self.transcript: list[dict] = []
        self.boundaries: list[int | None] = []
        self.tools: list[dict] | None = None  # tools and template kwargs of the last rendering
        self.template_kwargs: dict | None = None
        self._logits: torch.Tensor | None = None  # next-token logits at self.position
        self._states: dict[int, dict] = {}  # position -> recurrent state (hybrids)
        self._edits: list[int] = []  # positions the cache was truncated to (checkpoint validity)
        self._tok_memo = None  # (text, ids, starts, ends, special token indices) of a long render
        # Asked before the cache grows (``reserve(conv, position)``, may raise) and for how many
        # tokens a generation may still add (``room(conv)``); the session manager's budget.
        self.memory = None
        if self.hybrid and self.cache.position == 0:
            self._states[0] = self.cache.recurrent_state()

    # -- properties ---------------------------------------------------------------------------
    position = property(attrgetter("cache.position"))
    max_seq_len = property(attrgetter("cache.max_seq_len"))

    @property
    def nbytes(self) -> int:
        # Read from any thread while the worker changes the checkpoints: list() copies a dict's
        # values in one step (under the GIL), iterating the live dict could see it change size.
        extra = sum(t.nbytes for s in list(self._states.values()) for t in list(s.values()))
        return self.cache.nbytes() + extra

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def logits(self) -> torch.Tensor | None:
        """The next-token logits at ``position`` (None before the first prefill)."""
        return self._logits

    @property
    def edit_count(self) -> int:
        """How many times the cache was truncated: a journal notes it when it writes."""
        return len(self._edits)

    def lowest_edit_since(self, edit_count: int) -> int | None:
        """The lowest position the cache was truncated to after ``edit_count`` edits (rows past
        it may have been recomputed); None if it was not truncated since."""
        if len(self._edits) < edit_count:  # not the conversation that count came from
            return 0
        since = self._edits[edit_count:]
        return min(since) if since else None

    @property
    def recurrent_checkpoints(self) -> dict[int, dict]:
        """Recurrent states kept at message boundaries (position -> state; hybrids only)."""
        return dict(self._states)

    def add_recurrent_checkpoints(self, checkpoints: dict[int, dict]) -> None:
        """Take back checkpoints a snapshot saved (``recurrent_checkpoints``)."""
        self._states.update(checkpoints)

    # -- rendering ------------------------------------------------------------------------------
    def render(self, messages: list[dict], *, tools=None, template_kwargs=None,
               add_generation_prompt: bool = False) -> Rendered:
        text = self.template.render(messages, tools, add_generation_prompt, template_kwargs)
        ids, ends = self._tokenize(text)
        if len(ids) > self.max_seq_len:  # sync_tokens refuses it (TooLarge): no boundaries needed
            return Rendered(text, ids, [None] * len(messages))
        lcp = common_token_prefix(self._ids, ids)
        # Messages equal to the stored transcript keep their boundaries when those are still
        # inside the rendering's common prefix with the cache; the rest render their prefix.
        same = 0
        while (same < len(messages) and same < len(self.transcript)
               and messages[same] == self.transcript[same] and tools == self.tools
               and template_kwargs == self.template_kwargs):
            same += 1
        boundaries: list[int | None] = []
        # A boundary costs a render of the prefix (O(messages) each). Only the last few new ones
        # can matter: a hybrid keeps at most MAX_RECURRENT_CHECKPOINTS checkpoints, the newest;
        # earlier messages get None (not on a known token edge), so 100k messages cost one render.
        first_computed = len(messages) - (MAX_RECURRENT_CHECKPOINTS + 1)
        for k in range(len(messages)):
            b = self.boundaries[k] if k < same else None
            if b is not None and b <= lcp:
                boundaries.append(b)
                continue
            if k < first_computed:
                boundaries.append(None)
                continue
            last = k == len(messages) - 1 and not add_generation_prompt
            prefix = text if last else self.template.render(messages[:k + 1], tools, False, template_kwargs)
            boundaries.append(None)
            if text.startswith(prefix):
                t = bisect.bisect_left(ends, len(prefix))
                if t < len(ends) and ends[t] == len(prefix):
                    boundaries[-1] = t + 1
                elif not prefix:
                    boundaries[-1] = 0
        return Rendered(text, ids, boundaries)

    def _tokenize(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and end offsets of ``text``. Long texts that share a prefix with the last one
        tokenized reuse its tokens up to a special token (where tokenizers split the text before
        anything else, so both sides tokenize independently), checked on the segment before."""
        tok = self.model.tokenizer
        memo = self._tok_memo
        if memo is not None and len(text) >= _MEMO_MIN_CHARS:
            ptext, pids, pstarts, pends, specials = memo
            common = _common_str_prefix(ptext, text)
            k = bisect.bisect_right([pstarts[i] for i in specials], common) - 1
            if k >= 1:
                j, i = specials[k - 1], specials[k]  # re-tokenize from the special token before
                enc = tok(text[pstarts[j]:], add_special_tokens=False, return_offsets_mapping=True)
                tail = list(enc["input_ids"])
                offs = enc["offset_mapping"]
                n = i - j
                if tail[:n] == list(pids[j:i]) and len(offs) > n and offs[n][0] + pstarts[j] == pstarts[i]:
                    base = pstarts[j]
                    ids = list(pids[:j]) + tail
                    starts = array("q", pstarts[:j])
                    starts.extend(a + base for a, _ in offs)
                    ends = array("q", pends[:j])
                    ends.extend(b + base for _, b in offs)
                    self._remember(text, ids, starts, ends)
                    return ids, list(ends)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        starts = array("q", (a for a, _ in enc["offset_mapping"]))
        ends = array("q", (b for _, b in enc["offset_mapping"]))
        if len(text) >= _MEMO_MIN_CHARS:
            self._remember(text, ids, starts, ends)
        return ids, list(ends)

    def _remember(self, text, ids, starts, ends) -> None:
        special = self.template.special_ids
        self._tok_memo = (text, array("q", ids), starts, ends,
                          [i for i, t in enumerate(ids) if t in special])

    # -- cache editing ----------------------------------------------------------------------------
    def _truncate(self, position: int) -> int:
        """Make the cache hold ``self._ids[:position]``; returns how many tokens a hybrid had to
        prefill again (from its last saved state before ``position``)."""
        if position >= self.position:
            return 0
        self._edits.append(position)
        self._logits = None
        if not self.hybrid:
            self.cache.truncate(position)
            del self._ids[position:]
            return 0
        start = max(p for p in self._states if p <= position)
        replay = self._ids[start:position]
        self.cache.truncate(start, recurrent_state=self._states[start])
        del self._ids[start:]
        self._states = {p: s for p, s in self._states.items() if p <= start}
        self._extend(replay, [])
        return len(replay)

    def _extend(self, ids: list[int], checkpoint_at: list[int], should_cancel=None) -> None:
        """Prefill ``ids`` after what the cache holds; hybrids save their state at the
        positions in ``checkpoint_at``."""
        for _ in self._extend_steps(ids, checkpoint_at, should_cancel):
            pass

    def _extend_steps(self, ids: list[int], checkpoint_at: list[int], should_cancel=None,
                      on_logits=None) -> Iterator[int]:
        """``_extend`` one prefill chunk at a time, for progress: yields the cache position once
        the request passed its checks (before the first chunk) and after every chunk. Stopped
        early (cancelled, an error, the consumer closing it), the conversation holds the chunks
        done, as the cache does. ``on_logits``: ``Model.prefill``'s (every token's logits)."""
        if not ids:
            return
        if self.position + len(ids) > self.max_seq_len:
            raise TooLarge(f"the conversation needs {self.position + len(ids)} tokens but its cache holds "
                           f"at most {self.max_seq_len}; resize the session or start "
                           f"one with a larger max_seq_len")
        if self.memory is not None:
            self.memory.reserve(self, self.position + len(ids))
        base, end_all = self.position, self.position + len(ids)
        self.cache.reserve(end_all)  # once for all the pieces below: growing copies the cache
        cuts = [end_all]
        if self.hybrid:
            cuts = sorted({p for p in checkpoint_at if base < p < end_all} | {end_all})
        step = self.chunk_size or _model_chunk(self.model)
        if on_logits is not None:
            step = min(step, EVERY_LOGITS_CHUNK)
        yield base
        try:
            for end in cuts:
                while self.position < end:  # one model chunk per call: progress between chunks
                    piece = ids[self.position - base:min(end, self.position + step) - base]
                    self._logits = scheduler.prefill(self.model, self.cache, piece, chunk_size=step,
                                                     should_cancel=should_cancel, on_logits=on_logits)
                    self._ids.extend(piece)
                    if self.hybrid and self.position in checkpoint_at:
                        self._save_state(self.position)
                    yield self.position
        except BaseException:  # the cache stands at the last finished chunk
            self._ids.extend(ids[len(self._ids) - base:self.position - base])
            self._logits = None
            raise

    def _save_state(self, position: int) -> None:
        self._states[position] = self.cache.recurrent_state()
        extra = sorted(p for p in self._states if p > 0)
        for p in extra[:-MAX_RECURRENT_CHECKPOINTS]:
            del self._states[p]

    def step(self, token_id: int) -> torch.Tensor:
        """Decode one token: append it to the cache and return the next logits."""
        if self.position + 1 > self.max_seq_len:
            raise TooLarge(f"the conversation is at its cache's limit of {self.max_seq_len} tokens")
        if self.memory is not None:  # the cache may grow by a step: the budget must allow it
            self.memory.reserve(self, self.position + 1)
        self._logits = scheduler.decode(self.model, self.cache, token_id)
        self._ids.append(token_id)
        return self._logits

    def extend_tokens(self, ids: list[int], should_cancel=None) -> torch.Tensor:
        """Prefill tokens the engine itself inserts (e.g. a closing </think>)."""
        self._extend(list(ids), [], should_cancel)
        return self._logits

    def sync_tokens(self, ids: list[int], checkpoint_at: list[int] = (), should_cancel=None,
                    on_progress: Callable[[PrefillProgress], None] | None = None, on_logits=None) -> SyncStats:
        """Make the cache hold exactly ``ids`` and have next-token logits for them.
        ``on_progress`` gets a ``PrefillProgress`` when the prefill begins and after every chunk.
        ``on_logits`` gets the logits ``[T, V]`` of every token of ``ids`` in order, chunk by
        chunk (a prompt's log-likelihood): nothing is reused from the cache then."""
        steps = self.sync_steps(ids, checkpoint_at, should_cancel, on_logits)
        while True:
            try:
                event = next(steps)
            except StopIteration as stop:
                return stop.value
            if on_progress is not None:
                on_progress(event)

    def sync_steps(self, ids: list[int], checkpoint_at: list[int] = (), should_cancel=None,
                   on_logits=None) -> Generator[PrefillProgress, None, SyncStats]:
        """``sync_tokens`` as a generator of its progress; returns the ``SyncStats``."""
        if len(ids) > self.max_seq_len:
            raise TooLarge(f"the prompt has {len(ids)} tokens but this conversation's cache holds at most "
                           f"{self.max_seq_len}; resize the session or start one with a larger max_seq_len")
        t0 = time.perf_counter()
        keep = common_token_prefix(self._ids, ids) if on_logits is None else 0
        if keep == len(ids) and (keep < self.position or self._logits is None) and keep > 0:
            keep -= 1  # the last token is run again for its logits
        cached = keep - self._truncate(keep)
        for position in self._extend_steps(ids[self.position:], list(checkpoint_at), should_cancel, on_logits):
            yield PrefillProgress(position, len(ids), cached, time.perf_counter() - t0)
        return SyncStats(cached_tokens=cached, prefill_tokens=len(ids) - cached,
                         prefill_s=time.perf_counter() - t0)

    # -- the public conversation API ----------------------------------------------------------------
    def sync(self, messages: list[dict], *, tools=None, template_kwargs=None, should_cancel=None) -> SyncStats:
        """Make the cache hold exactly ``messages`` (rendered), reusing the common prefix."""
        r = self.render(messages, tools=tools, template_kwargs=template_kwargs)
        stats = self.sync_tokens(r.ids, [b for b in r.boundaries if b], should_cancel)
        self.set_transcript(messages, r.boundaries, tools, template_kwargs)
        return stats

    def set_transcript(self, messages, boundaries, tools=None, template_kwargs=None) -> None:
        self.transcript = copy.deepcopy(list(messages))
        self.boundaries = list(boundaries)
        self.tools, self.template_kwargs = tools, template_kwargs

    def append(self, messages: list[dict]) -> SyncStats:
        return self.sync(self.transcript + list(messages), tools=self.tools,
                         template_kwargs=self.template_kwargs)

    def rollback(self, n_messages: int) -> SyncStats:
        """Drop the last ``n_messages`` messages (and their tokens)."""
        if not 0 <= n_messages <= len(self.transcript):
            raise InvalidRequest(f"cannot roll back {n_messages} messages: the conversation has "
                                 f"{len(self.transcript)}")
        return self.sync(self.transcript[:len(self.transcript) - n_messages], tools=self.tools,
                         template_kwargs=self.template_kwargs)

    def fork(self) -> Conversation:
        """An independent copy (the cache is cloned, nothing is prefilled again)."""
        other = Conversation.__new__(Conversation)
        other.__dict__.update(self.__dict__)
        other.cache = self.cache.clone()
        other._ids = list(self._ids)
        other.transcript = copy.deepcopy(self.transcript)
        other.boundaries = list(self.boundaries)
        other._states = dict(self._states)
        other._edits = []
        other.memory = None  # the new owner (a session) installs its own
        return other

    def resize(self, max_seq_len: int) -> None:
        self.cache.resize(max_seq_len)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            position=self.position, ids=list(self._ids), transcript=copy.deepcopy(self.transcript),
            boundaries=list(self.boundaries), tools=self.tools, template_kwargs=self.template_kwargs,
            edit_seq=len(self._edits),
            recurrent=self.cache.recurrent_state() if self.hybrid else None,
            logits=self._logits, states=dict(self._states))

    def restore(self, cp: Checkpoint) -> None:
        """Back to exactly the state of ``checkpoint()``: transcript, tokens and cache."""
        untouched = all(p >= cp.position for p in self._edits[cp.edit_seq:])
        if untouched and self.position >= cp.position:
            self.cache.truncate(cp.position, recurrent_state=cp.recurrent)
            if self.hybrid:
                self.cache.load_recurrent_state(cp.recurrent)
            del self._ids[cp.position:]
            self._logits = cp.logits
        else:  # the cache was rewritten below the checkpoint: prefill back to it
            guard, self.memory = self.memory, None  # going back to a size it had: never refused
            try:
                self.sync_tokens(cp.ids)
            finally:
                self.memory = guard
            if cp.logits is not None:
                self._logits = cp.logits
        self._states = {**{p: s for p, s in self._states.items() if p <= cp.position}, **cp.states}
        self._edits.append(cp.position)
        self.set_transcript(cp.transcript, cp.boundaries, cp.tools, cp.template_kwargs)

    # -- snapshots ----------------------------------------------------------------------------------
    def state_meta(self) -> dict:
        """JSON-able part of the state (with ``state_tensors()`` it rebuilds the conversation)."""
        return {"transcript": self.transcript, "boundaries": self.boundaries, "tools": self.tools,
                "template_kwargs": self.template_kwargs, "position": self.position}

    def state_tensors(self, copy: bool = True) -> dict[str, torch.Tensor]:
        out = dict(self.cache.state_tensors(copy=copy))
        out["conversation.token_ids"] = torch.tensor(self._ids, dtype=torch.int64)
        if self._logits is not None:
            out["conversation.logits"] = self._logits.detach().float().cpu()
        return out

    @classmethod
    def from_state(cls, model, meta: dict, tensors: dict[str, torch.Tensor], max_seq_len: int | None = None,
                   *, chunk_size: int | None = None) -> Conversation:
        tensors = dict(tensors)
        ids = tensors.pop("conversation.token_ids").tolist()
        logits = tensors.pop("conversation.logits", None)
        position = int(meta["position"])
        if len(ids) != position:
            raise InvalidRequest(f"conversation state is inconsistent: {len(ids)} token ids for "
                                 f"position {position}")
        cache = model.cache_from_state(tensors, position, max_seq_len or max(position, 1))
        conv = cls(model, cache.max_seq_len, chunk_size=chunk_size, cache=cache)
        conv._ids = ids
        conv._logits = logits.to(model.device) if logits is not None else None
        conv.set_transcript(meta.get("transcript", []), meta.get("boundaries", []), meta.get("tools"),
                            meta.get("template_kwargs"))
        if conv.hybrid:
            state = cache.recurrent_state()
            conv._states = {0: {k: torch.zeros_like(v) for k, v in state.items()}, position: state}
        return conv
