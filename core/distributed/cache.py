"""One rank's cache of a context-parallel sequence, and its state across world sizes.

``SlicedCache`` speaks the ``Cache`` interface the model, sessions and snapshots use, with
global positions, but keeps only the KV of its rank's slice (in a plain ``Cache`` of the slice's
length) plus the recurrent state, which every rank computes identically. Its ``state_tensors``
is collective and returns the whole sequence's state, in exactly the form a one-process cache
returns it, so a snapshot taken on N ranks loads on one (``Cache.load_state_tensors``) and a
one-process snapshot loads on N (``SlicedCache.load_state_tensors`` keeps its slice).
"""

from __future__ import annotations

from operator import attrgetter

import torch

from superlinear.distributed.slices import ContextParallel, ContextSlices, all_gather, group_shape
from superlinear.errors import InvalidRequest, TooLarge
from superlinear.model.cache import Cache, CacheLayout


class SlicedCache:
    """The part of one sequence's cache that this rank holds (batch 1, at most ``max_seq_len``
    tokens in all)."""

    def __init__(self, layout: CacheLayout, max_seq_len: int, device, dtype: torch.dtype,
                 partition: ContextParallel):
        self.layout = layout
        self.partition = partition
        self.max_seq_len = int(max_seq_len)
        partition.length_bound = max(partition.length_bound, self.max_seq_len)
        self.device = torch.device(device)
        self.dtype = dtype
        self.local = Cache(layout, self._slice_limit(self.max_seq_len), device, dtype)
        self._position = 0
        self._start = 0
        self._write_index: torch.Tensor | None = None  # a graph-captured step's position, on the device
        self.decode_graphs: dict = {}  # Model keeps captured decode steps here (bound to the slice's tensors)

    # -- positions ------------------------------------------------------------------------------
    def _slice_limit(self, max_seq_len: int) -> int:
        return max(1, self.partition.slices.held(self.partition.rank, max_seq_len))

    def _held(self, position: int) -> int:
        return self.partition.slices.held(self.partition.rank, position)

    @property
    def position(self) -> int:
        """Tokens in the sequence (on every rank, wherever they are held)."""
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        self._position = int(value)
        self.local.position = self._held(self._position)

    # -- memory ---------------------------------------------------------------------------------
    # read from the slice's own cache: its KV tokens allocated on this rank, and the recurrent
    # state (every rank holds all of it)
    capacity = property(attrgetter("local.capacity"))
    has_recurrent_state = property(attrgetter("local.has_recurrent_state"))
    conv = property(attrgetter("local.conv"))
    ssm = property(attrgetter("local.ssm"))

    def nbytes(self) -> int:
        return self.local.nbytes()

    def growth_bytes(self, tokens: int, exact: bool = False) -> int:
        return self.local.growth_bytes(self._held(min(int(tokens), self.max_seq_len)), exact)

    def transient_bytes(self) -> int:
        return self.local.transient_bytes()

    def reserve(self, tokens: int, exact: bool = False) -> None:
        if int(tokens) > self.max_seq_len:
            raise TooLarge(f"the context needs {tokens} tokens but this cache holds at most {self.max_seq_len}")
        before = self.local.capacity
        self.local.reserve(self._held(int(tokens)), exact)
        if self.local.capacity != before:
            self.decode_graphs = {}  # a captured decode step points at the old tensors

    def begin_forward(self, start: int, length: int, write_index: torch.Tensor | None = None) -> None:
        self._start, self._write_index = start, write_index

    # -- the Cache API --------------------------------------------------------------------------
    # Cache's rewind, in global positions: it reads only position, has_recurrent_state and
    # load_recurrent_state, and sets position (which moves the slice's own position with it)
    truncate = Cache.truncate

    def recurrent_state(self) -> dict[str, torch.Tensor]:
        return self.local.recurrent_state()

    def load_recurrent_state(self, state: dict[str, torch.Tensor]) -> None:
        self.local.load_recurrent_state(state)

    def clone(self) -> SlicedCache:
        other = SlicedCache(self.layout, self.max_seq_len, self.device, self.dtype, self.partition)
        other.local = self.local.clone()
        other.position = self.position
        return other

    def resize(self, max_seq_len: int) -> None:
        max_seq_len = int(max_seq_len)
        if max_seq_len < self.position:
            raise TooLarge(f"cannot resize to {max_seq_len} tokens: the cache already holds {self.position}")
        self.local.resize(self._slice_limit(max_seq_len))
        self.max_seq_len = max_seq_len
        self.partition.length_bound = max(self.partition.length_bound, max_seq_len)

    def state_tensors(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Collective (every rank calls it): the whole sequence's state, as ``Cache.state_tensors``."""
        return gather_state(self)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], position: int) -> None:
        """The whole sequence's state (from any world size); this rank keeps its slice."""
        position = int(position)
        if position > self.max_seq_len:
            raise TooLarge(f"the state holds {position} tokens but this cache holds at most {self.max_seq_len}")
        start, _ = self.partition.slices.bounds(self.partition.rank)
        held = self._held(position)
        mine = dict(tensors)
        for i in self.layout.attention_layers:
            for name in (f"layers.{i}.key", f"layers.{i}.value"):
                if name in mine:
                    if mine[name].dim() != 4 or mine[name].shape[2] != position:
                        raise InvalidRequest(f"state tensor {name} has shape {tuple(mine[name].shape)}, "
                                             f"expected {position} positions")
                    mine[name] = mine[name][:, :, start:start + held]
        self.local.load_state_tensors(mine, held)
        self.position = position

    def layout_names(self) -> list[str]:
        return self.local.layout_names()

    # -- the transformers cache protocol ---------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Keep the part of the chunk's keys that falls into this rank's slice; returns the slice's
        keys and values (the attention reads them through ``partition``)."""
        start, _ = self.partition.slices.bounds(self.partition.rank)
        if layer_idx not in self.local.keys:  # nothing of this sequence here yet
            empty = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[3]))
            return empty, empty
        keys, values = self.local.keys[layer_idx], self.local.values[layer_idx]
        if self._write_index is not None:  # one token at a device-side position: no host sync
            at = self._write_index - start
            mine = ((at >= 0) & (at < keys.shape[2])).view(1, 1, -1, 1)
            at = at.clamp(0, keys.shape[2] - 1)
            for cache, new in ((keys, key_states), (values, value_states)):
                cache.index_copy_(2, at, torch.where(mine, new.to(cache.dtype), cache.index_select(2, at)))
            return keys, values
        first = max(self._start, start)
        stop = min(self._start + key_states.shape[2], start + self.local.capacity)
        if stop > first:
            keys[:, :, first - start:stop - start].copy_(key_states[:, :, first - self._start:stop - self._start])
            values[:, :, first - start:stop - start].copy_(value_states[:, :, first - self._start:stop - self._start])
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def get_conv_state(self, layer_idx, state_idx=0):
        return self.local.get_conv_state(layer_idx, state_idx)

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.local.get_recurrent_state(layer_idx, state_idx)

    def is_recording_past(self, layer_idx=0) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx=0) -> int:
        return self.local.get_recurrent_states_to_keep(layer_idx)

    def increase_count(self, layer_idx=0, state_idx=0) -> None:
        self.local.increase_count(layer_idx, state_idx)

    def update_conv_state(self, conv_states, layer_idx, state_idx=0, conv_kernel_size=None, **kwargs):
        return self.local.update_conv_state(conv_states, layer_idx, state_idx, conv_kernel_size, **kwargs)

    def update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kwargs):
        return self.local.update_recurrent_state(recurrent_states, layer_idx, state_idx, **kwargs)


def new_cache(model, max_seq_len: int, group=None, slices: ContextSlices | None = None) -> SlicedCache:
    """A cache of ``model`` whose KV is split over the ranks of ``group`` (the default group;
    a process without torch.distributed is one rank holding everything). Every rank must run
    the same calls on its own cache. ``slices``: even slices of ``max_seq_len`` by default."""
    if max_seq_len < 1:
        raise InvalidRequest(f"max_seq_len must be positive, got {max_seq_len}")
    _, world = group_shape(group)
    partition = ContextParallel(slices or ContextSlices.even(max_seq_len, world), group)
    return SlicedCache(model.layout, max_seq_len, model.device, model.dtype, partition)


def gather_state(cache: SlicedCache) -> dict[str, torch.Tensor]:
    """Collective: the whole sequence's state tensors on every rank (the KV slices joined in
    rank order, the recurrent state of this rank, which is every rank's)."""
    part = cache.partition
    slices = part.slices
    held = [slices.held(r, cache.position) for r in range(slices.world_size)]
    widest = max(held)
    local = cache.local.state_tensors(copy=True)
    out = {}
    for i in cache.layout.attention_layers:
        for name in (f"layers.{i}.key", f"layers.{i}.value"):
            mine = local[name]
            padded = mine.new_zeros((*mine.shape[:2], widest, mine.shape[3]))
            padded[:, :, :mine.shape[2]] = mine
            every = all_gather(padded, part.group)  # [N, 1, HKV, widest, D]
            out[name] = torch.cat([every[r][:, :, :held[r]] for r in range(slices.world_size)], dim=2)
    for name, value in local.items():
        out.setdefault(name, value)
    return out
