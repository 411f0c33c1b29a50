"""Public entries: argument checks and backend choice."""

from __future__ import annotations

import os

import torch

from .params import SpanParams
from .rows import KVRows

BACKENDS = ("reference", "triton")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def available_backends() -> list[str]:
    return ["reference"] + (["triton"] if _triton_importable() else [])


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``backend`` argument, else ``SPL_ATTENTION_BACKEND``, else Triton on CUDA / reference."""
    choice = backend if backend not in (None, "auto") else os.environ.get("SPL_ATTENTION_BACKEND") or "auto"
    choice = choice.strip().lower()
    if choice == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "reference"
    if choice not in BACKENDS:
        raise ValueError(f"unknown attention backend {choice!r}; choose auto, reference or triton")
    return choice


def _check(q1, q2, k, v, params, key_mask):
    if not isinstance(params, SpanParams):
        raise TypeError(f"params must be a SpanParams, got {type(params).__name__}")
    if q1.dim() != 4 or q2.shape != q1.shape:
        raise ValueError(f"q1 and q2 must both be [B,HQ,LQ,D], got {tuple(q1.shape)} and {tuple(q2.shape)}")
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [B,HKV,LKV,D], got {tuple(k.shape)} and {tuple(v.shape)}")
    B, HQ, _, D = q2.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q2.shape)} (batch / head dim)")
    if HQ % k.shape[1]:
        raise ValueError(f"HQ={HQ} is not a multiple of HKV={k.shape[1]}")
    for name, x in (("q1", q1), ("q2", q2), ("k", k), ("v", v)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32/float16/bfloat16, got {x.dtype}")
    if key_mask is not None and (key_mask.dim() != 2 or tuple(key_mask.shape) != (B, k.shape[2])):
        raise ValueError(f"key_mask must be [B, LKV] = {(B, k.shape[2])}, got {tuple(key_mask.shape)}")


def superlinear_prefill(q1, q2, k, v, positions, params: SpanParams, key_mask=None, backend=None):
    """q1, q2 [B,HQ,LQ,D]; k, v [B,HKV,LKV,D]; positions [LQ] int64; key_mask [B,LKV] bool.
    Returns [B,HQ,LQ,D] in q2's dtype."""
    _check(q1, q2, k, v, params, key_mask)
    if positions.dim() != 1 or positions.numel() != q2.shape[2]:
        raise ValueError(f"positions must be [LQ={q2.shape[2]}], got {tuple(positions.shape)}")
    name = resolve_backend(backend, q2.device)
    if name == "triton":
        from .triton_prefill import triton_prefill

        return triton_prefill(q1, q2, k, v, positions, params, key_mask)
    from .reference import reference_prefill

    return reference_prefill(q1, q2, k, v, positions, params, key_mask)


def superlinear_decode(q1, q2, k, v, positions, params: SpanParams, key_mask=None, backend=None):
    """q1, q2 [B,HQ,1,D]; positions int64 [B] (one per sequence, on the device). -> [B,HQ,1,D].
    No host sync on the Triton backend, so it can be captured in a CUDA graph."""
    _check(q1, q2, k, v, params, key_mask)
    if q2.shape[2] != 1:
        raise ValueError(f"superlinear_decode takes one query per sequence, got LQ={q2.shape[2]}")
    if positions.numel() != q2.shape[0]:
        raise ValueError(f"positions must have one entry per sequence (B={q2.shape[0]}), "
                         f"got {tuple(positions.shape)}")
    name = resolve_backend(backend, q2.device)
    if name == "triton":
        from .triton_decode import triton_decode

        return triton_decode(q1, q2, k, v, positions.reshape(-1), params, key_mask)
    from .reference import reference_decode

    return reference_decode(q1, q2, k, v, positions.reshape(-1), params, key_mask)


def superlinear_decode_rows(q1, q2, rows: KVRows, positions, params: SpanParams, backend=None):
    """B sequences of different lengths, one query each: ``q1, q2 [B,HQ,1,D]``, row b's keys and
    values where ``rows`` (``KVRows``) says, filled up to ``positions[b]`` (int64 ``[B]``, on the
    device) -> ``[B,HQ,1,D]``, row b equal to ``superlinear_decode`` of that sequence alone. The
    Triton backend is one launch per stage for all rows and reads only device tables (a CUDA graph
    replays it for other sequences); the reference decodes the rows one by one."""
    if not isinstance(params, SpanParams):
        raise TypeError(f"params must be a SpanParams, got {type(params).__name__}")
    B, HQ, LQ, D = q2.shape
    if q1.shape != q2.shape or LQ != 1:
        raise ValueError(f"q1 and q2 must both be [B,HQ,1,D], got {tuple(q1.shape)} and {tuple(q2.shape)}")
    if len(rows) != B or positions.numel() != B:
        raise ValueError(f"{B} queries need {B} K/V rows and positions, got {len(rows)} and {positions.numel()}")
    if D != rows.head_dim or HQ % rows.num_kv_heads:
        raise ValueError(f"q {tuple(q2.shape)} does not match K/V rows of {rows.num_kv_heads} heads of {rows.head_dim}")
    if resolve_backend(backend, q2.device) == "triton":
        from .triton_decode_rows import triton_decode_rows

        return triton_decode_rows(q1, q2, rows, positions.reshape(-1), params)
    if rows.keys is None:
        raise ValueError("the reference backend reads the K/V tensors: build the rows with KVRows.of")
    from .reference import reference_decode

    pos = positions.reshape(-1, 1)
    return torch.cat([reference_decode(q1[b:b + 1], q2[b:b + 1], rows.keys[b], rows.values[b], pos[b], params)
                      for b in range(B)])


def append_kv_rows(k_new, v_new, rows: KVRows, positions, backend=None) -> None:
    """Write a decode step's ``k_new``/``v_new [B,HKV,1,D]`` into row b's K/V at ``positions[b]``
    (one Triton launch that reads only device tables, or a copy per row)."""
    if resolve_backend(backend, k_new.device) == "triton":
        from .triton_decode_rows import append_rows

        append_rows(k_new, v_new, rows, positions.reshape(-1))
        return
    for b, t in enumerate(positions.reshape(-1).tolist()):
        rows.keys[b][:, :, t:t + 1].copy_(k_new[b:b + 1])
        rows.values[b][:, :, t:t + 1].copy_(v_new[b:b + 1])
