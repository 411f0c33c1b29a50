"""The per-sequence cache: preallocated KV for attention layers, conv/SSM state for Mamba layers.

It also speaks the small part of transformers' cache protocol that the Llama and Nemotron-H
modules call (``update``, ``get_conv_state``, ``update_conv_state``, ...), so transformers
writes straight into our preallocated tensors. The model tells the cache where the current
chunk goes (``_begin``) before each forward; ``position`` advances only when a chunk finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from superlinear.errors import InvalidRequest, TooLarge


@dataclass(frozen=True)
class CacheLayout:
    """Shapes of one sequence's state, derived from the model config."""

    attention_layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    mamba_layers: tuple[int, ...] = ()
    conv_shape: tuple[int, ...] = ()  # per Mamba layer, without batch: (conv_dim, kernel)
    ssm_shape: tuple[int, ...] = ()  # (heads, head_dim, state)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return len(self.attention_layers) * 2 * self.num_kv_heads * self.head_dim * elem

    def recurrent_bytes(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        conv = 1
        for n in self.conv_shape:
            conv *= n
        ssm = 1
        for n in self.ssm_shape:
            ssm *= n
        # SSM state is kept in fp32 (it accumulates over the whole sequence).
        return len(self.mamba_layers) * (conv * elem + ssm * 4)


def _resize_hint(needed: int, max_seq_len: int) -> str:
    return (f"the context needs {needed} tokens but this cache holds at most {max_seq_len}; resize it "
            f"(Cache.resize / `spl session resize ID --max-seq-len N`) or start a session with a larger "
            f"--max-seq-len")


class Cache:
    """State of one sequence (batch 1), holding at most ``max_seq_len`` tokens.

    KV memory is allocated lazily: an empty cache holds only the (small) recurrent state, and
    the KV tensors grow when a forward needs room (``reserve``). Growth reallocates and copies
    one tensor at a time (never two copies of the cache: ``_reallocate``), in steps (see
    ``_GRANULE``); a prefill reserves its whole length plus decode headroom (0.8% of it, at least
    1024 tokens) at once, so a long context is allocated once. ``capacity`` is what is allocated
    now, ``nbytes()`` its size: an idle session costs what it holds, not its limit.
    """

    partition = None  # all positions are here (superlinear.distributed.SlicedCache holds a slice)

    def __init__(self, layout: CacheLayout, max_seq_len: int, device, dtype: torch.dtype):
        self.layout = layout
        self.max_seq_len = int(max_seq_len)
        self.device = torch.device(device)
        self.dtype = dtype
        self.position = 0
        self.capacity = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        # Where the current forward writes: eager chunks use python ints, a graph-captured
        # decode step uses a device tensor (``_write_index``).
        self._start = 0
        self._length = 0
        self._write_index: torch.Tensor | None = None
        self._graph = None  # the captured decode step bound to these tensors (model.py)
        self._allocate_recurrent()

    # -- allocation ---------------------------------------------------------------------------
    def _allocate_recurrent(self) -> None:
        lay = self.layout
        with _too_large_on_oom(lambda: lay.recurrent_bytes(self.dtype), self.device, "the recurrent state"):
            for i in lay.mamba_layers:
                self.conv[i] = torch.zeros((1, *lay.conv_shape), dtype=self.dtype, device=self.device)
                self.ssm[i] = torch.zeros((1, *lay.ssm_shape), dtype=torch.float32, device=self.device)

    def capacity_for(self, tokens: int, exact: bool = False) -> int:
        """The capacity ``reserve(tokens, exact)`` would allocate (the current one if enough)."""
        if not self.layout.attention_layers:
            return self.capacity
        return capacity_to_hold(tokens, self.max_seq_len, self.capacity, exact)

    def growth_bytes(self, tokens: int, exact: bool = False) -> int:
        """Bytes ``reserve(tokens, exact)`` adds at its peak, what a memory budget must allow
        first: the KV of the added capacity plus one KV tensor at the current capacity (the
        growth moves the cache one tensor at a time, ``_reallocate``)."""
        grown = self.capacity_for(min(int(tokens), self.max_seq_len), exact)
        if grown <= self.capacity:
            return 0
        return (grown - self.capacity) * self.layout.kv_bytes_per_token(self.dtype) + self.transient_bytes()

    def transient_bytes(self) -> int:
        """Bytes a growth (or a shrinking ``resize``) holds twice while it moves the KV: one
        layer's K at the current capacity; 0 while nothing is allocated."""
        lay = self.layout
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.capacity * lay.num_kv_heads * lay.head_dim * elem if lay.attention_layers else 0

    def reserve(self, tokens: int, exact: bool = False) -> None:
        """Make room for ``tokens`` tokens in all (``TooLarge`` past ``max_seq_len`` or when the
        device has no memory for it). The content up to ``position`` is kept. Not ``exact``:
        a growth step (``_GRANULE`` below), so that decoding token by token reallocates rarely."""
        tokens = int(tokens)
        if tokens > self.max_seq_len:
            raise TooLarge(_resize_hint(tokens, self.max_seq_len))
        if tokens <= self.capacity or not self.layout.attention_layers:
            return
        grown = self.capacity_for(tokens, exact)
        try:
            self._reallocate(grown)
        except TooLarge:
            if grown == tokens:
                raise
            self._reallocate(tokens)  # the geometric step did not fit: take exactly what is needed

    def _reallocate(self, capacity: int) -> None:
        """Give every KV tensor ``capacity`` tokens, keeping the first ``position`` ones.

        One tensor at a time: a layer's new K is allocated, filled and the old one dropped before
        its V, then the next layer's, are moved. So the cache never exists twice; the peak is
        the new cache plus one old tensor (``growth_bytes``), 1/12 of the old cache for a model
        with 6 attention layers. If an allocation fails halfway, the tensors moved so far keep
        their new size and ``capacity`` is the smallest one's: the content is intact either way.
        """
        lay = self.layout
        shape = (1, lay.num_kv_heads, capacity, lay.head_dim)
        keep = min(self.position, capacity)
        self._graph = None  # captured decode steps read the old tensors: drop them (and their pools) first
        try:
            with _too_large_on_oom(lambda: capacity * lay.kv_bytes_per_token(self.dtype), self.device,
                                   f"a cache of {capacity} tokens"):
                for i in lay.attention_layers:
                    for tensors in (self.keys, self.values):
                        old = tensors.get(i)
                        if old is not None and old.shape[2] == capacity:
                            continue
                        tensors[i] = self._moved(old, shape, keep)
                        if old is not None:
                            del old  # the last reference: one tensor exists twice at most
                            _release_cached(self.device)
        finally:
            self.capacity = min(tensors[i].shape[2] if i in tensors else 0
                                for i in lay.attention_layers for tensors in (self.keys, self.values))

    def _moved(self, old: torch.Tensor | None, shape: tuple[int, ...], keep: int) -> torch.Tensor:
        """A KV tensor of ``shape`` holding ``old``'s first ``keep`` tokens and zeros after them
        (zeros, not garbage: dense attention in a CUDA graph multiplies the masked-out keys past
        the position by zero weights, and 0 * NaN would be NaN)."""
        new = torch.empty(shape, dtype=self.dtype, device=self.device)
        if keep:
            new[:, :, :keep].copy_(old[:, :, :keep])
        new[:, :, keep:].zero_()
        return new

    @property
    def has_recurrent_state(self) -> bool:
        return bool(self.layout.mamba_layers)

    def nbytes(self) -> int:
        return sum(t.nbytes for d in (self.keys, self.values, self.conv, self.ssm) for t in d.values())

    # -- the Cache API of docs/architecture.md --------------------------------------------------
    def truncate(self, position: int, recurrent_state: dict | None = None) -> None:
        """Forget everything after ``position``. A Mamba hybrid cannot rewind its recurrent state,
        so it needs the state saved at ``position`` (``recurrent_state()`` taken there)."""
        position = int(position)
        if not 0 <= position <= self.position:
            raise InvalidRequest(f"cannot truncate to {position}: the cache holds {self.position} tokens")
        if self.has_recurrent_state and position != self.position:
            if recurrent_state is None:
                raise InvalidRequest("this model has recurrent (Mamba) state: truncate(position, "
                                     "recurrent_state=...) needs the state saved at that position")
            self.load_recurrent_state(recurrent_state)
        self.position = position

    def recurrent_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for i in self.layout.mamba_layers:
            state[f"layers.{i}.conv"] = self.conv[i].clone()
            state[f"layers.{i}.ssm"] = self.ssm[i].clone()
        return state

    def load_recurrent_state(self, state: dict[str, torch.Tensor]) -> None:
        for i in self.layout.mamba_layers:
            for name, target in ((f"layers.{i}.conv", self.conv[i]), (f"layers.{i}.ssm", self.ssm[i])):
                if name not in state:
                    raise InvalidRequest(f"recurrent state lacks {name!r}")
                target.copy_(state[name].to(device=target.device, dtype=target.dtype))

    def clone(self) -> Cache:
        other = Cache(self.layout, self.max_seq_len, self.device, self.dtype)
        other.reserve(self.position)
        for i in self.keys:
            if self.position:
                other.keys[i][:, :, :self.position].copy_(self.keys[i][:, :, :self.position])
                other.values[i][:, :, :self.position].copy_(self.values[i][:, :, :self.position])
        for i in self.conv:
            other.conv[i].copy_(self.conv[i])
            other.ssm[i].copy_(self.ssm[i])
        other.position = self.position
        return other

    def resize(self, max_seq_len: int) -> None:
        """Change the limit to ``max_seq_len`` tokens, keeping the content (in place). Growing
        allocates nothing; shrinking below what is allocated gives the memory back."""
        max_seq_len = int(max_seq_len)
        if max_seq_len < self.position:
            raise TooLarge(f"cannot resize to {max_seq_len} tokens: the cache already holds "
                           f"{self.position}; truncate first or pick a larger size")
        if max_seq_len < 1:
            raise InvalidRequest(f"max_seq_len must be positive, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        if self.capacity > max_seq_len:
            self._reallocate(max_seq_len)

    def state_tensors(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """KV trimmed to ``position`` (contiguous copies; with ``copy=False`` views into the
        cache, so a snapshot writer streams them without doubling device memory) plus the
        recurrent state."""
        p = self.position
        lay = self.layout
        out = {}
        for i in lay.attention_layers:
            if i not in self.keys:  # nothing allocated yet: an empty context
                empty = torch.empty((1, lay.num_kv_heads, 0, lay.head_dim), dtype=self.dtype, device=self.device)
                out[f"layers.{i}.key"], out[f"layers.{i}.value"] = empty, empty.clone()
                continue
            k, v = self.keys[i][:, :, :p], self.values[i][:, :, :p]
            out[f"layers.{i}.key"] = k.contiguous() if copy else k
            out[f"layers.{i}.value"] = v.contiguous() if copy else v
        out.update(self.recurrent_state())
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], position: int) -> None:
        position = int(position)
        if position > self.max_seq_len:
            raise TooLarge(_resize_hint(position, self.max_seq_len))
        expected = set(self.layout_names())
        got = set(tensors)
        if expected != got:
            missing, unexpected = sorted(expected - got), sorted(got - expected)
            raise InvalidRequest(f"state does not match this model's cache: missing {missing[:6]}, "
                                 f"unexpected {unexpected[:6]}")
        lay = self.layout
        expected_shape = (1, lay.num_kv_heads, position, lay.head_dim)
        for i in lay.attention_layers:
            for name in (f"layers.{i}.key", f"layers.{i}.value"):
                if tuple(tensors[name].shape) != expected_shape:
                    raise InvalidRequest(f"state tensor {name} has shape {tuple(tensors[name].shape)}, "
                                         f"expected {expected_shape}")
        self.reserve(position)
        for i in self.keys:
            for name, target in ((f"layers.{i}.key", self.keys[i]), (f"layers.{i}.value", self.values[i])):
                target[:, :, :position].copy_(tensors[name].to(device=target.device, dtype=target.dtype))
        self.load_recurrent_state(tensors)
        self.position = position

    def layout_names(self) -> list[str]:
        names = []
        for i in self.layout.attention_layers:
            names += [f"layers.{i}.key", f"layers.{i}.value"]
        for i in self.layout.mamba_layers:
            names += [f"layers.{i}.conv", f"layers.{i}.ssm"]
        return names

    # -- called by the model around a forward ---------------------------------------------------
    def _check_room(self, n: int) -> None:
        """Called before a forward that appends ``n`` tokens: the limit, then the memory."""
        self.reserve(self.position + n)

    def _begin(self, start: int, length: int, write_index: torch.Tensor | None = None) -> None:
        self._start, self._length, self._write_index = start, length, write_index

    # -- the transformers cache protocol (what Llama / Nemotron-H modules call) ------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._write_index is not None:
            keys.index_copy_(2, self._write_index, key_states.to(keys.dtype))
            values.index_copy_(2, self._write_index, value_states.to(values.dtype))
        else:
            end = self._start + key_states.shape[2]
            keys[:, :, self._start:end].copy_(key_states)
            values[:, :, self._start:end].copy_(value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def get_conv_state(self, layer_idx, state_idx=0):
        return self.conv[layer_idx]

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.ssm[layer_idx]

    def is_recording_past(self, layer_idx=0) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx=0) -> int:
        return 0  # intermediate states are for speculative decoding, which we do not run

    def increase_count(self, layer_idx=0, state_idx=0) -> None:
        pass  # transformers counts in-place conv updates for its own caches; ours needs no count

    def update_conv_state(self, conv_states, layer_idx, state_idx=0, conv_kernel_size=None, **kwargs):
        state = self.conv[layer_idx]
        full = torch.cat([state.to(conv_states.dtype), conv_states], dim=-1)
        state.copy_(full[..., -state.shape[-1]:])
        return full

    def update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kwargs):
        state = self.ssm[layer_idx]
        state.copy_(recurrent_states)
        return state


# KV capacity grows in multiples of this many tokens, by at least 1.5x while small (amortised
# O(1) copies per token) and by at most _MAX_STEP tokens or the headroom once large. Every growth
# leaves decode headroom free, so the decode after a prefill does not reallocate at once:
# _HEADROOM tokens, or 1/_HEADROOM_DIVISOR of the context if that is more (0.8%: 80K tokens at
# 10M, 480 MiB of KV for the 30B hybrid, so a long answer to a 10M-token prompt needs no growth;
# past it, one copy of the 60 GiB cache, tens of ms on an H200, per 80K generated tokens).
_GRANULE = 256
_HEADROOM = 1024
_HEADROOM_DIVISOR = 128
_MAX_STEP = 65536


def capacity_to_hold(tokens: int, max_seq_len: int, capacity: int = 0, exact: bool = False) -> int:
    """The KV capacity a cache of ``capacity`` (limit ``max_seq_len``) grows to for ``tokens``."""
    tokens = int(tokens)
    if tokens <= capacity:
        return capacity
    if exact:
        return tokens
    step = min(capacity * 3 // 2, capacity + _MAX_STEP)
    headroom = max(_HEADROOM, tokens // _HEADROOM_DIVISOR)
    return min(int(max_seq_len), _round_up(max(tokens + headroom, step), _GRANULE))


def _release_cached(device: torch.device) -> None:
    """Give the block of a moved KV tensor back to the device. The CUDA caching allocator would
    keep it, and it cannot serve the next, larger tensor: reserved memory would double."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule


class _too_large_on_oom:
    """Turn an allocation failure into ``TooLarge`` with what was asked for and where."""

    def __init__(self, need_bytes, device, what: str):
        self.need_bytes, self.device, self.what = need_bytes, device, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, (torch.OutOfMemoryError, MemoryError, RuntimeError)):
            return False
        if isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError) \
                and "memory" not in str(exc).lower():
            return False
        raise TooLarge(f"cannot allocate {self.what} ({self.need_bytes() / 2**30:.2f} GiB on {self.device}): "
                       f"{str(exc).splitlines()[0]}; use a smaller --max-seq-len") from exc
