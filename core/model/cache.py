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
    """State of one sequence (batch 1) preallocated to ``max_seq_len`` tokens."""

    def __init__(self, layout: CacheLayout, max_seq_len: int, device, dtype: torch.dtype, *, _empty=False):
        self.layout = layout
        self.max_seq_len = int(max_seq_len)
        self.device = torch.device(device)
        self.dtype = dtype
        self.position = 0
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
        if not _empty:
            self._allocate()

    # -- allocation ---------------------------------------------------------------------------
    def _allocate(self) -> None:
        lay = self.layout
        shape = (1, lay.num_kv_heads, self.max_seq_len, lay.head_dim)
        try:
            for i in lay.attention_layers:
                self.keys[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
                self.values[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            for i in lay.mamba_layers:
                self.conv[i] = torch.zeros((1, *lay.conv_shape), dtype=self.dtype, device=self.device)
                self.ssm[i] = torch.zeros((1, *lay.ssm_shape), dtype=torch.float32, device=self.device)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            self.keys.clear(), self.values.clear(), self.conv.clear(), self.ssm.clear()
            need = self.max_seq_len * lay.kv_bytes_per_token(self.dtype) + lay.recurrent_bytes(self.dtype)
            raise TooLarge(f"cannot allocate a cache of {self.max_seq_len} tokens "
                           f"({need / 2**30:.2f} GiB on {self.device}): {str(exc).splitlines()[0]}; "
                           f"use a smaller --max-seq-len") from exc

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
        self._copy_into(other)
        return other

    def resize(self, max_seq_len: int) -> None:
        """Reallocate to ``max_seq_len`` tokens, keeping the content (in place)."""
        max_seq_len = int(max_seq_len)
        if max_seq_len < self.position:
            raise TooLarge(f"cannot resize to {max_seq_len} tokens: the cache already holds "
                           f"{self.position}; truncate first or pick a larger size")
        if max_seq_len == self.max_seq_len:
            return
        other = Cache(self.layout, max_seq_len, self.device, self.dtype)
        self._copy_into(other)
        self.max_seq_len = max_seq_len
        self.keys, self.values, self.conv, self.ssm = other.keys, other.values, other.conv, other.ssm
        self._graph = None

    def _copy_into(self, other: Cache) -> None:
        p = self.position
        for i in self.keys:
            other.keys[i][:, :, :p].copy_(self.keys[i][:, :, :p])
            other.values[i][:, :, :p].copy_(self.values[i][:, :, :p])
        for i in self.conv:
            other.conv[i].copy_(self.conv[i])
            other.ssm[i].copy_(self.ssm[i])
        other.position = p

    def state_tensors(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """KV trimmed to ``position`` (contiguous copies; with ``copy=False`` views into the
        cache, so a snapshot writer streams them without doubling device memory) plus the
        recurrent state."""
        p = self.position
        out = {}
        for i in self.keys:
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
        for i in self.keys:
            for name, target in ((f"layers.{i}.key", self.keys[i]), (f"layers.{i}.value", self.values[i])):
                src = tensors[name]
                if src.shape[2] != position or src.shape[1] != target.shape[1] or src.shape[3] != target.shape[3]:
                    raise InvalidRequest(f"state tensor {name} has shape {tuple(src.shape)}, expected "
                                         f"(1, {target.shape[1]}, {position}, {target.shape[3]})")
                target[:, :, :position].copy_(src.to(device=target.device, dtype=target.dtype))
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
        if self.position + n > self.max_seq_len:
            raise TooLarge(_resize_hint(self.position + n, self.max_seq_len))

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

    def update_conv_state(self, conv_states, layer_idx, state_idx=0, conv_kernel_size=None, **kwargs):
        state = self.conv[layer_idx]
        full = torch.cat([state.to(conv_states.dtype), conv_states], dim=-1)
        state.copy_(full[..., -state.shape[-1]:])
        return full

    def update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kwargs):
        state = self.ssm[layer_idx]
        state.copy_(recurrent_states)
        return state
