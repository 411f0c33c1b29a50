"""B sequences' caches as one for a batched decode step (``Model.decode_batch``).

Each session keeps its own ``Cache`` (its own K/V tensors, capacity and position); a decode
step over B of them runs every projection, norm, MLP/MoE and the LM head once on ``[B, 1, H]``
rows, and only attention and the recurrent state are per sequence:

- ``BatchCache`` speaks the transformers cache protocol (``update``) and the attention hook
  (``attend``, called by ``superlinear.model.attention.spl_attention``): each row's key and
  value go into its own cache at its own position, and each row attends to its own cache.
- Mamba layers' conv/SSM states are gathered into ``[B, ...]`` tensors before the step and
  written back after it (``conv``/``ssm``, ``scatter``).

Two forms:

- ``BatchCache.rows(caches)`` (eager): per-row copies; attention per row through the
  single-sequence path (the reference kernels off CUDA: bit for bit the same function as a
  ``decode_step``) or, on the Triton backend, one ``superlinear_decode_rows`` launch per stage.
- ``StaticRows`` (what a CUDA graph captures, one per batch-size bucket): device tables of K/V
  base addresses, capacities and positions (``superlinear.kernels.KVRows``) and static
  recurrent-state buffers, rewritten before each replay (``load``), so one graph serves any B
  sessions of its bucket, after a cache growth too. Rows past B are padding: they point at a
  one-token scratch cache at position 0 and their outputs are never read.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from superlinear.kernels import KVRows, append_kv_rows, resolve_backend, superlinear_decode_rows
from superlinear.model.attention import attend
from superlinear.model.cache import Cache

# batch-size buckets, one CUDA graph each; a larger batch runs in slices of the largest
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket_for(rows: int) -> int:
    """The smallest bucket holding ``rows`` (1 <= rows <= max(BUCKETS))."""
    for bucket in BUCKETS:
        if rows <= bucket:
            return bucket
    raise ValueError(f"{rows} rows exceed the largest bucket ({BUCKETS[-1]}): decode in slices")


def bound_for(capacity: int) -> int:
    """The K/V bound a graph is captured for: a power of two (at least 1024) holding
    ``capacity``, so caches that grow recapture only when they double."""
    return max(1024, 1 << max(0, int(capacity) - 1).bit_length())


class BatchCache:
    """One decode step of B sequences over their own caches (see the module docstring)."""

    partition = None  # every sequence's keys are here (context parallelism runs one sequence)

    def __init__(self, caches: list[Cache], positions: torch.Tensor, conv: dict, ssm: dict, backend: str,
                 tables: dict[int, KVRows] | None = None):
        self.caches = caches
        self.positions = positions  # int64 [B] on the device
        self.conv, self.ssm = conv, ssm  # per Mamba layer: [B, ...] stacked states
        self.backend = backend  # "triton": the rows kernels; "reference": the single-sequence path per row
        self._tables = tables if tables is not None else {}  # static (a graph), or built per layer on first use
        self._host_positions = [c.position for c in caches]

    @classmethod
    def rows(cls, caches: list[Cache], backend: str) -> BatchCache:
        """The eager form over ``caches`` (each already reserved for one more token)."""
        first = caches[0]
        positions = torch.tensor([c.position for c in caches], dtype=torch.long, device=first.device)
        conv = {i: torch.cat([c.conv[i] for c in caches]) for i in first.conv}
        ssm = {i: torch.cat([c.ssm[i] for c in caches]) for i in first.ssm}
        return cls(list(caches), positions, conv, ssm, backend)

    def scatter(self) -> None:
        """Write the stepped recurrent states back into each cache."""
        for i in self.conv:
            for b, cache in enumerate(self.caches):
                cache.conv[i].copy_(self.conv[i][b:b + 1])
                cache.ssm[i].copy_(self.ssm[i][b:b + 1])

    def table(self, layer: int) -> KVRows:
        if layer not in self._tables:
            self._tables[layer] = KVRows.of([c.keys[layer] for c in self.caches],
                                            [c.values[layer] for c in self.caches])
        return self._tables[layer]

    # -- the transformers cache protocol (the Llama attention module writes through it) ---------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.backend == "triton":
            append_kv_rows(key_states, value_states, self.table(layer_idx), self.positions, backend="triton")
        else:
            for b, (cache, t) in enumerate(zip(self.caches, self._host_positions, strict=True)):
                cache.keys[layer_idx][:, :, t:t + 1].copy_(key_states[b:b + 1])
                cache.values[layer_idx][:, :, t:t + 1].copy_(value_states[b:b + 1])
        return key_states, value_states  # attention reads each row's own cache (``attend``)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are passed per row; transformers asks only when they are not

    # -- the attention hook ---------------------------------------------------------------------
    def attend(self, layer: int, q1: torch.Tensor, query: torch.Tensor, ctx, scaling) -> torch.Tensor:
        """Each row's attention over its own cache: ``[B, HQ, 1, D]``."""
        if self.backend == "triton" and ctx.mode == "superlinear":
            return superlinear_decode_rows(q1, query, self.table(layer), self.positions, ctx.params,
                                           backend="triton")
        outs = []
        for b, (cache, t) in enumerate(zip(self.caches, self._host_positions, strict=True)):
            row = dataclasses.replace(ctx, start=t, length=1, positions=self.positions[b:b + 1], graph=False,
                                      batch=None)
            outs.append(attend(q1[b:b + 1], query[b:b + 1], cache.keys[layer], cache.values[layer], row, scaling))
        return torch.cat(outs)


def rows_backend(backend: str | None, device: torch.device, mode: str) -> str:
    """``triton`` when a step's attention runs the batched kernels, else ``reference`` (each row
    through the single-sequence path: dense attention, or the reference kernels)."""
    if mode != "superlinear":
        return "reference"
    return resolve_backend(backend, device)


class StaticRows:
    """The fixed buffers of a batched step for ``bucket`` rows (what a CUDA graph captures):
    token ids, positions, K/V tables per attention layer (for caches of capacity <= ``bound``)
    and stacked recurrent states. ``load`` points them at B <= bucket caches."""

    def __init__(self, layout, bucket: int, bound: int, device: torch.device, dtype: torch.dtype):
        self.layout, self.bucket, self.bound = layout, bucket, int(bound)
        layers = layout.attention_layers
        n = len(layers)
        # one device tensor for every table, filled by one copy: k ptrs, v ptrs, capacities
        # (per layer: a growth that failed halfway leaves layers of different capacities), then
        # the positions and the token ids
        self.packed = torch.zeros((3 * n + 2, bucket), dtype=torch.long, device=device)
        self.ids = self.packed[3 * n + 1][:, None]
        self.positions = self.packed[3 * n]
        self.tables = {layer: KVRows(self.packed[j], self.packed[n + j], self.packed[2 * n + j],
                                     num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=dtype,
                                     bound=bound)
                       for j, layer in enumerate(layers)}
        self.scratch = Cache(layout, 1, device, dtype)  # the padding rows' one-token cache
        self.scratch.reserve(1, exact=True)
        self.conv = {i: torch.zeros((bucket, *layout.conv_shape), dtype=dtype, device=device)
                     for i in layout.mamba_layers}
        self.ssm = {i: torch.zeros((bucket, *layout.ssm_shape), dtype=torch.float32, device=device)
                    for i in layout.mamba_layers}
        self._pairs = None  # the last batch's state copy lists (_state_pairs)

    def fits(self, caches: list[Cache]) -> bool:
        return len(caches) <= self.bucket and all(c.capacity <= self.bound for c in caches)

    def load(self, caches: list[Cache], token_ids: list[int]) -> BatchCache:
        """Point the buffers at ``caches`` (padding rows at the scratch cache) and gather their
        recurrent states; the returned ``BatchCache`` is the step's cache (captured or eager)."""
        padded = list(caches) + [self.scratch] * (self.bucket - len(caches))
        layers = self.layout.attention_layers
        host = torch.tensor(
            [[c.keys[i].data_ptr() for c in padded] for i in layers]
            + [[c.values[i].data_ptr() for c in padded] for i in layers]
            + [[c.keys[i].shape[2] for c in padded] for i in layers]
            + [[c.position for c in padded], list(token_ids) + [0] * (self.bucket - len(caches))],
            dtype=torch.long)
        self.packed.copy_(host, non_blocking=False)
        for stacked, own in self._state_pairs(caches):
            torch._foreach_copy_(stacked, own)
        return BatchCache(padded, self.positions, self.conv, self.ssm, "triton", tables=self.tables)

    def store(self, caches: list[Cache]) -> None:
        """Write the stepped recurrent states of the real rows back into their caches."""
        for stacked, own in self._state_pairs(caches):
            torch._foreach_copy_(own, stacked)

    def _state_pairs(self, caches: list[Cache]) -> list[tuple[list, list]]:
        """(rows of the stacked buffers, the caches' own tensors), conv and SSM apart (one dtype
        per list: ``_foreach_copy_``'s fused kernel, not a copy per tensor; a 64-row step of the
        30B moves 2,944 of them). Kept while the batch's members stay the same (weak references to
        the caches; a finished session's recurrent tensors stay referenced until the next batch
        of other members)."""
        if not self.conv:
            return []
        memo = self._pairs
        if memo is not None and len(memo[0]) == len(caches) \
                and all(r() is c for r, c in zip(memo[0], caches, strict=True)):
            return memo[1]
        rows = [(i, b) for i in self.conv for b in range(len(caches))]
        pairs = [([self.conv[i][b:b + 1] for i, b in rows], [caches[b].conv[i] for i, b in rows]),
                 ([self.ssm[i][b:b + 1] for i, b in rows], [caches[b].ssm[i] for i, b in rows])]
        self._pairs = ([weakref.ref(c) for c in caches], pairs)
        return pairs
