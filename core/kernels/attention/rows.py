"""``KVRows``: the per-sequence K/V of one attention layer as device tables, for a batched
decode over sequences of different lengths (``superlinear_decode_rows``)."""

from __future__ import annotations

import torch


class KVRows:
    """Where B sequences' K/V of one attention layer live, as device tables a kernel (and a
    replayed CUDA graph) reads: ``k_ptrs``/``v_ptrs`` int64 ``[B]`` base addresses of
    ``[1, HKV, capacity_b, D]`` contiguous tensors, ``capacity`` int64 ``[B]``. ``bound``: no
    row's capacity exceeds it (it sizes the grid). ``keys``/``values``: the tensors themselves
    when known (the reference backend reads them; they keep the memory alive)."""

    def __init__(self, k_ptrs, v_ptrs, capacity, *, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 bound: int, keys=None, values=None):
        self.k_ptrs, self.v_ptrs, self.capacity = k_ptrs, v_ptrs, capacity
        self.num_kv_heads, self.head_dim, self.dtype, self.bound = num_kv_heads, head_dim, dtype, int(bound)
        self.keys, self.values = keys, values

    @classmethod
    def of(cls, keys, values, bound: int | None = None) -> KVRows:
        """The table of these per-sequence tensors (``[1, HKV, capacity, D]`` each, contiguous)."""
        first = keys[0]
        for k, v in zip(keys, values, strict=True):
            if k.dim() != 4 or k.shape[0] != 1 or v.shape != k.shape or not (k.is_contiguous() and v.is_contiguous()):
                raise ValueError(f"each sequence's k and v must be one contiguous [1, HKV, L, D], "
                                 f"got {tuple(k.shape)} and {tuple(v.shape)}")
            if k.data_ptr() % 16 or v.data_ptr() % 16:  # the kernels assume it (torch allocates at 512)
                raise ValueError("each sequence's k and v must start at a 16-byte boundary")
            if k.shape[1] != first.shape[1] or k.shape[3] != first.shape[3] or k.dtype != first.dtype:
                raise ValueError("every sequence's k/v must have the same heads, head dim and dtype")
        caps = [int(k.shape[2]) for k in keys]
        table = torch.tensor([[k.data_ptr() for k in keys], [v.data_ptr() for v in values], caps],
                             dtype=torch.int64).to(first.device)
        return cls(table[0], table[1], table[2], num_kv_heads=int(first.shape[1]), head_dim=int(first.shape[3]),
                   dtype=first.dtype, bound=max(caps if bound is None else [*caps, bound]),
                   keys=list(keys), values=list(values))

    def __len__(self) -> int:
        return int(self.k_ptrs.numel())
